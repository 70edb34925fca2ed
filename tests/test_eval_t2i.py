"""Text-to-image evaluation on a tiny random model: GenEval layout, CLIP score, resume."""
from __future__ import annotations

import json

import pytest

from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
from mmada_jax.eval import runner
from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
from mmada_jax.model import MMaDAConfig
from mmada_jax.prompting import SpecialTokens, train_tiny_tokenizer
from mmada_jax.train.config_files import load_config_file
from test_eval_clip import write_clip

BITS = 6


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_clip_score_task_layout_and_resume(tmp_path):
  tok = train_tiny_tokenizer(["a red cat on the mat", "a blue dog"] * 20, vocab_size=300)
  tok.save(str(tmp_path / "tok"))
  sp = SpecialTokens.from_tokenizer(tok)
  vq = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(), z_channels=BITS, resolution=8)
  ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, codebook_dim=BITS), 0).save_pretrained(tmp_path / "itok")
  cfg = MMaDAConfig(vocab_size=len(tok) + 2 ** BITS, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                    mlp_hidden_size=64, mask_token_id=sp.mask, eos_token_id=sp.eos, pad_token_id=sp.eos,
                    codebook_size=2 ** BITS, num_vq_tokens=16, max_sequence_length=64)
  MMaDA.init(cfg, 0, generation_config=GenerationConfig(max_text_len=8, num_vq_tokens=16)).save_pretrained(
      tmp_path / "model")
  write_clip(tmp_path / "clip")
  recs = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
          {"tag": "colors", "prompt": "a blue dog"}]
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  c = load_config_file("configs/eval.py:clip_score")
  assert (c.steps, c.cfg, c.noise_schedule) == (50, 3.5, "cosine")
  c.model, c.text_tokenizer, c.image_tokenizer = str(tmp_path / "model"), str(tmp_path / "tok"), str(tmp_path / "itok")
  c.data, c.clip_model, c.n_samples, c.steps = str(tmp_path / "prompts.jsonl"), str(tmp_path / "clip"), 2, 4
  out = tmp_path / "out"
  res = runner.run(c, str(out))
  assert res["n"] == 2 and res["images"] == 4 and set(res["metrics"]) == {"clip_score"}
  assert 0 <= res["metrics"]["clip_score"] <= 100 and res["stderr"]["clip_score"] >= 0
  for i, rec in enumerate(recs):
    d = out / "images" / f"{i:05d}"
    assert json.loads((d / "metadata.jsonl").read_text()) == rec
    assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]
  again = runner.run(c, str(out))                                              # resumes: nothing regenerated
  assert again["resumed"] == 2 and again["metrics"] == res["metrics"]
  c.clip_model = ""
  with pytest.raises(ValueError, match="clip_model"):
    runner.run(c, str(tmp_path / "out2"))

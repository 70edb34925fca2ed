"""The sampling command (``python -m mmada_jax.sample``) on a tiny random model saved by the test."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
from mmada_jax.model import MMaDAConfig
from mmada_jax.prompting import SpecialTokens, train_tiny_tokenizer
from mmada_jax.sample import main as sample_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_BITS = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(model dir, tokenizer dir, image tokenizer dir) of a tiny random model and its tokenizers."""
  root = tmp_path_factory.mktemp("sample")
  tok = train_tiny_tokenizer(["a handwritten digit one two three", "what is 2 + 3 ? 5"] * 20, vocab_size=300)
  tok.save(str(root / "tok"))
  sp = SpecialTokens.from_tokenizer(tok)
  vq = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=(1, 1, 1), attn_resolutions=(),
                   z_channels=CODE_BITS, resolution=16)
  ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, codebook_dim=CODE_BITS), 0).save_pretrained(root / "itok")
  cfg = MMaDAConfig(vocab_size=len(tok) + 2 ** CODE_BITS, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                    mlp_hidden_size=64, mask_token_id=sp.mask, eos_token_id=sp.eos, pad_token_id=sp.eos,
                    codebook_size=2 ** CODE_BITS, num_vq_tokens=16)
  gc = GenerationConfig(max_text_len=8, num_vq_tokens=16, gen_length=8, block_length=4, steps=4,
                        t2i_steps=3, t2i_guidance_scale=1.5)
  MMaDA.init(cfg, 0, generation_config=gc).save_pretrained(root / "model")
  img = (np.random.default_rng(0).uniform(0, 255, (20, 24, 3))).astype(np.uint8)
  Image.fromarray(img).save(root / "digit.png")
  return root


def _base(root):
  return ["--model", str(root / "model"), "--text-tokenizer", str(root / "tok")]


def test_text(saved, tmp_path, capsys):
  (tmp_path / "prompts.txt").write_text("one\n\ntwo three\n")
  assert sample_main(_base(saved) + ["text", "what is 2 + 3 ?", "--prompts-file", str(tmp_path / "prompts.txt"),
                                     "--json", "--gen-length", "8", "--block-length", "4", "--steps", "4"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["prompt"] for r in rows] == ["what is 2 + 3 ?", "one", "two three"]
  assert all(isinstance(r["text"], str) for r in rows)
  # Defaults from the saved generation config, and the cached / threshold path.
  assert sample_main(_base(saved) + ["--seed", "1", "text", "one", "--cache", "prefix", "--threshold", "0.9",
                                     "--temperature", "0.5"]) == 0


def test_answer_and_image(saved, tmp_path, capsys):
  args = _base(saved) + ["--image-tokenizer", str(saved / "itok")]
  img = str(saved / "digit.png")
  assert sample_main(args + ["answer", "which digit?", "--image", img, "--image", img, "--gen-length", "4",
                             "--block-length", "4", "--steps", "2"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2          # one question for every image
  assert sample_main(args + ["--mesh-shape", "fsdp=-1", "image", "digit one", "digit two",
                             "--out", str(tmp_path / "png")]) == 0
  paths = capsys.readouterr().out.split()
  assert paths == [str(tmp_path / "png" / "000.png"), str(tmp_path / "png" / "001.png")]
  assert np.asarray(Image.open(paths[0])).shape == (16, 16, 3)


@pytest.mark.parametrize("extra,match", [
    (["text", "hi"], None),
    (["answer", "q?", "--image", "x.png"], "needs --image-tokenizer"),
    (["text"], "no prompts"),
])
def test_errors(saved, tmp_path, capsys, extra, match):
  args = ["--model", str(tmp_path / "nope"), "--text-tokenizer", str(saved / "tok")] if match is None else _base(saved)
  assert sample_main(args + extra) == 2
  err = capsys.readouterr().err
  assert ("model directory not found" if match is None else match) in err


def test_missing_tokenizer_and_image(saved, tmp_path, capsys):
  assert sample_main(["--model", str(saved / "model"), "--text-tokenizer", str(tmp_path / "none"), "text", "hi"]) == 2
  assert "no tokenizer file" in capsys.readouterr().err
  args = _base(saved) + ["--image-tokenizer", str(saved / "itok"), "answer", "q?", "--image", str(tmp_path / "x.png")]
  assert sample_main(args) == 2
  assert "image file not found" in capsys.readouterr().err
  args = _base(saved) + ["--image-tokenizer", str(saved / "itok"), "answer", "a?", "b?", "c?",
                         "--image", str(saved / "digit.png"), "--image", str(saved / "digit.png")]
  assert sample_main(args) == 2
  assert "3 questions for 2 images" in capsys.readouterr().err
  assert sample_main(_base(saved) + ["--image-tokenizer", str(tmp_path / "no"), "image", "x", "--out", "o"]) == 2
  assert "image tokenizer directory not found" in capsys.readouterr().err


def test_module_runs_as_a_command(saved):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "mmada_jax.sample"] + _base(saved) + ["text", "one", "two"],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert len(r.stdout.splitlines()) == 2

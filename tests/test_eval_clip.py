"""The JAX CLIP on a tiny random Hugging Face-layout checkpoint written here (no torch)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmada_jax.eval import clip

D, P, LAYERS, HEADS, IMG, PATCH, VOCAB = 16, 16, 2, 2, 32, 8, 12
WORDS = ["a", "red", "cat", "blue", "dog", "on", "the", "mat"]


def _layer(rng, prefix: str) -> dict[str, np.ndarray]:
  out = {}
  for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
    out[f"{prefix}.self_attn.{n}.weight"] = rng.normal(0, 0.2, (D, D))
    out[f"{prefix}.self_attn.{n}.bias"] = rng.normal(0, 0.02, D)
  for n in ("layer_norm1", "layer_norm2"):
    out[f"{prefix}.{n}.weight"], out[f"{prefix}.{n}.bias"] = np.ones(D), np.zeros(D)
  out[f"{prefix}.mlp.fc1.weight"], out[f"{prefix}.mlp.fc1.bias"] = rng.normal(0, 0.2, (2 * D, D)), np.zeros(2 * D)
  out[f"{prefix}.mlp.fc2.weight"], out[f"{prefix}.mlp.fc2.bias"] = rng.normal(0, 0.2, (D, 2 * D)), np.zeros(D)
  return out


def write_clip(path, seed: int = 0, text_projection: np.ndarray | None = None) -> None:
  """config.json, model.safetensors and tokenizer.json of a tiny CLIP under ``path``."""
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  rng = np.random.default_rng(seed)
  w = {"text_model.embeddings.token_embedding.weight": rng.normal(0, 1, (VOCAB, D)),
       "text_model.embeddings.position_embedding.weight": rng.normal(0, 0.1, (10, D)),
       "text_model.final_layer_norm.weight": np.ones(D), "text_model.final_layer_norm.bias": np.zeros(D),
       "vision_model.embeddings.class_embedding": rng.normal(0, 1, D),
       "vision_model.embeddings.patch_embedding.weight": rng.normal(0, 0.2, (D, 3, PATCH, PATCH)),
       "vision_model.embeddings.position_embedding.weight": rng.normal(0, 0.1, ((IMG // PATCH) ** 2 + 1, D)),
       "vision_model.pre_layrnorm.weight": np.ones(D), "vision_model.pre_layrnorm.bias": np.zeros(D),
       "vision_model.post_layernorm.weight": np.ones(D), "vision_model.post_layernorm.bias": np.zeros(D),
       "visual_projection.weight": rng.normal(0, 0.3, (P, D)),
       "text_projection.weight": rng.normal(0, 0.3, (P, D)),
       "logit_scale": np.array(2.659)}
  for i in range(LAYERS):
    w.update(_layer(rng, f"text_model.encoder.layers.{i}"))
    w.update(_layer(rng, f"vision_model.encoder.layers.{i}"))
  if text_projection is not None:
    w["text_projection.weight"] = text_projection
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: np.asarray(v, np.float32) for k, v in w.items()}, str(path / "model.safetensors"))
  common = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
  cfg = dict(projection_dim=P, text_config=dict(common, vocab_size=VOCAB, max_position_embeddings=10, eos_token_id=1),
             vision_config=dict(common, image_size=IMG, patch_size=PATCH))
  (path / "config.json").write_text(json.dumps(cfg))
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, **{t: i + 3 for i, t in enumerate(WORDS)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                     special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
  tok.save(str(path / "tokenizer.json"))


def _images(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 255, (n, 40, 50, 3), dtype=np.uint8)


def test_preprocess_resize_crop_normalise():
  x = clip.preprocess(np.full((1, 300, 200, 3), 128, np.uint8), 224)
  assert x.shape == (1, 224, 224, 3)
  np.testing.assert_allclose(x[0, 100, 100], (128 / 255 - clip.MEAN) / clip.STD, atol=1e-5)
  ramp = np.zeros((1, 10, 30, 3), np.uint8)
  ramp[:, :, 10:20] = 255                                                    # the center third is white
  y = clip.preprocess(ramp, 10)
  assert y.shape == (1, 10, 10, 3)
  np.testing.assert_allclose(y[0, 5, 5], (1 - clip.MEAN) / clip.STD, atol=1e-2)


def test_embeddings_cosine_and_score(tmp_path):
  write_clip(tmp_path / "clip")
  m = clip.CLIP.from_pretrained(tmp_path / "clip")
  ie, te = m.image_embeds(_images(3)), m.text_embeds(["a red cat", "a blue dog on the mat", "cat"])
  assert ie.shape == (3, P) and te.shape == (3, P)
  np.testing.assert_allclose(np.linalg.norm(ie, axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(te, axis=-1), 1, atol=1e-5)
  cos = m.cosine(_images(3), ["a red cat", "a blue dog on the mat", "cat"])
  assert np.all(np.abs(cos) <= 1 + 1e-6)
  np.testing.assert_array_equal(m.image_embeds(_images(3)), ie)               # deterministic
  np.testing.assert_allclose(m.text_embeds(["cat"])[0], te[2], atol=1e-6)     # padding does not matter
  s = m.score(_images(3), ["a red cat", "a blue dog on the mat", "cat"])
  np.testing.assert_allclose(s, 100 * np.maximum(cos, 0), rtol=1e-6)
  with pytest.raises(ValueError, match="images for"):
    m.score(_images(2), ["cat"])


def test_aligned_pair_scores_higher(tmp_path):
  write_clip(tmp_path / "a")
  base = clip.CLIP.from_pretrained(tmp_path / "a")
  from safetensors.numpy import load_file
  w0 = load_file(str(tmp_path / "a" / "model.safetensors"))["text_projection.weight"]
  write_clip(tmp_path / "eye", text_projection=np.eye(P, D))                  # pooled text state, normalised
  u = clip.CLIP.from_pretrained(tmp_path / "eye").text_embeds(["a red cat"])[0]
  e = base.image_embeds(_images(1))[0]
  write_clip(tmp_path / "b", text_projection=w0 + np.outer(e - w0 @ u, u))    # maps "a red cat" onto e
  m = clip.CLIP.from_pretrained(tmp_path / "b")
  aligned, other = m.score(_images(2)[:1].repeat(2, 0), ["a red cat", "a blue dog on the mat"])
  assert aligned == pytest.approx(100, abs=1e-3) and aligned > other


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip.CLIP.from_pretrained(tmp_path)

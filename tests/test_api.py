"""Public API input validation and unsupported configurations."""
import json
import shutil

import numpy as np
import pytest

from mmada_jax import MMaDA
from mmada_jax.model import MMaDAConfig


@pytest.fixture(scope="module")
def model(tiny_mmada_dir):
  return MMaDA.from_pretrained(tiny_mmada_dir)


def test_accepts_numpy_and_jax_inputs(model):
  import jax.numpy as jnp
  ids = np.full((1, 5), 7, np.int64)
  a = model.logits(ids)
  b = model.logits(jnp.asarray(ids, jnp.int32))
  assert a.shape == (1, 5, model.config.vocab_size)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("ids,err,match", [
    (np.zeros((5,), np.int32), ValueError, "rank 2"),
    (np.zeros((1, 2, 3), np.int32), ValueError, "rank 2"),
    (np.zeros((1, 4), np.float32), TypeError, "integer"),
    (np.array([[1, 134656]]), ValueError, "outside the vocabulary"),
    (np.array([[-1, 3]]), ValueError, "outside the vocabulary"),
])
def test_bad_input_ids(model, ids, err, match):
  with pytest.raises(err, match=match):
    model.logits(ids)


def test_bad_masks(model):
  ids = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match="attention_mask must have shape"):
    model.logits(ids, attention_mask=np.ones((2, 5)))
  with pytest.raises(ValueError, match="only 0"):
    model.logits(ids, attention_mask=np.full((2, 4), 2))
  with pytest.raises(ValueError, match="attention_bias must have shape"):
    model.logits(ids, attention_bias=np.ones((2, 4, 4), bool))
  with pytest.raises(TypeError, match="bool"):
    model.logits(ids, attention_bias=np.ones((2, 1, 4, 4), np.int32))


def test_padded_query_rows_are_finite(model):
  ids = np.array([[126093, 126093, 126088, 126080, 500, 126081]])
  mask = np.array([[0, 0, 1, 1, 1, 1]])
  logits = np.asarray(model.logits(ids, attention_mask=mask))
  assert np.isfinite(logits).all()
  allow = np.zeros((1, 1, 6, 6), bool)        # every key disallowed for every query
  assert np.isfinite(np.asarray(model.logits(ids, attention_bias=allow))).all()


@pytest.mark.parametrize("field,value,match", [
    ("block_type", "sequential", "block_type"),
    ("alibi", True, "alibi"),
    ("weight_tying", True, "weight_tying"),
    ("include_bias", True, "include_bias"),
    ("activation_type", "swiglu", "activation_type"),
    ("attention_dropout", 0.1, "attention_dropout"),
    ("layer_norm_type", "default", "layer_norm_type"),
])
def test_unsupported_config_values_are_rejected(tiny_mmada_dir, tmp_path, field, value, match):
  cfg = json.loads((tiny_mmada_dir / "config.json").read_text())
  cfg[field] = value
  d = tmp_path / "m"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(cfg))
  (d / "model.safetensors").symlink_to(tiny_mmada_dir / "model.safetensors")
  with pytest.raises(ValueError, match=match):
    MMaDA.from_pretrained(d)


def test_config_validation():
  with pytest.raises(ValueError, match="n_kv_heads"):
    MMaDAConfig(d_model=32, n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    MMaDAConfig(remat_policy="sometimes")
  with pytest.raises(ValueError, match="dtype"):
    MMaDAConfig(dtype="int8")


def test_missing_directory():
  with pytest.raises(FileNotFoundError, match="not found"):
    MMaDA.from_pretrained("/nonexistent/mmada")

"""Public API input validation and unsupported configurations."""
import json
import shutil

import jax
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


# ---- dtypes (Flax names) and deprecated aliases -----------------------------------------------

def test_param_dtype_is_storage_dtype_is_compute(tiny_mmada_dir):
  m = MMaDA.from_pretrained(tiny_mmada_dir, dtype="bfloat16")          # stored fp32, bf16 matmuls
  assert (m.config.param_dtype, m.config.dtype) == ("float32", "bfloat16")
  assert {str(x.dtype) for x in jax.tree.leaves(m.params)} == {"float32"}
  m = MMaDA.from_pretrained(tiny_mmada_dir, param_dtype="bfloat16")    # compute follows storage
  assert (m.config.param_dtype, m.config.dtype) == ("bfloat16", "bfloat16")
  with pytest.raises(TypeError):
    MMaDA.from_pretrained(tiny_mmada_dir, "bfloat16")                  # the old positional storage dtype


def test_deprecated_compute_dtype_warns_and_maps_to_dtype(tiny_mmada_dir):
  with pytest.warns(DeprecationWarning, match="compute_dtype= is deprecated.*use dtype="):
    m = MMaDA.from_pretrained(tiny_mmada_dir, compute_dtype="bfloat16")
  assert (m.config.param_dtype, m.config.dtype) == ("float32", "bfloat16")
  with pytest.raises(TypeError, match="both dtype= and its deprecated alias compute_dtype="):
    MMaDA.from_pretrained(tiny_mmada_dir, dtype="float32", compute_dtype="bfloat16")


def test_init_seed_and_deprecated_key():
  cfg = MMaDAConfig(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=32,
                    mask_token_id=63, num_vq_tokens=4, codebook_size=8)
  a = MMaDA.init(cfg, 1, dtype="bfloat16")
  assert (a.config.param_dtype, a.config.dtype) == ("float32", "bfloat16")
  with pytest.warns(DeprecationWarning, match="key= is deprecated"):
    b = MMaDA.init(cfg, key=jax.random.key(1))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(TypeError, match="unexpected keyword argument 'rng'"):
    MMaDA.init(cfg, rng=1)


def test_save_pretrained_param_dtype_and_deprecated_dtype(model, tmp_path):
  model.save_pretrained(tmp_path / "a", param_dtype="bfloat16")
  assert MMaDA.from_pretrained(tmp_path / "a").config.param_dtype == "bfloat16"
  with pytest.warns(DeprecationWarning, match="dtype= is deprecated.*use param_dtype="):
    model.save_pretrained(tmp_path / "b", dtype="bfloat16")
  assert MMaDA.from_pretrained(tmp_path / "b").config.param_dtype == "bfloat16"
  with pytest.raises(ValueError, match="unknown format 'zarr'"):
    model.save_pretrained(tmp_path / "c", format="zarr")


def test_logits_on_another_mesh(model):
  from mmada_jax.sharding import make_mesh
  ids = np.arange(8, 24).reshape(2, 8)
  base = np.asarray(model.logits(ids))
  sharded = model.logits(ids, mesh=make_mesh("fsdp=2,tensor=2", jax.devices()[:4]))
  np.testing.assert_allclose(np.asarray(sharded), base, rtol=1e-5, atol=1e-5)


# ---- the saved generation config --------------------------------------------------------------

def test_generation_config_round_trip(model, tmp_path):
  from mmada_jax import GenerationConfig
  from mmada_jax.checkpoint import generation_file
  gc = GenerationConfig(max_text_len=14, num_vq_tokens=16, gen_length=16, block_length=4, steps=8,
                        temperature=0.5, t2i_steps=6, t2i_guidance_scale=2.0, image_grid=(2, 8))
  m = MMaDA(model.params, model.config, hf_config=model.hf_config, generation_config=gc)
  m.save_pretrained(tmp_path / "orbax")
  m.save_pretrained(tmp_path / "hf", format="hf")
  for d in ("orbax", "hf"):
    saved = json.loads((tmp_path / d / "generation_config.json").read_text())
    assert saved["eos_token_id"] == model.config.eos_token_id and saved["mmada_jax"]["max_text_len"] == 14
    assert MMaDA.from_pretrained(tmp_path / d).generation_config == gc
  other = gc.replace(max_text_len=20)
  assert MMaDA.from_pretrained(tmp_path / "orbax", generation_config=other).generation_config == other
  assert generation_file.read_section(str(tmp_path / "hf"))["version"] == 1


def test_generation_config_derived_and_logged(tiny_mmada_dir, caplog):
  # The fixture holds transformers' generation_config.json (no mmada_jax section) and no max_text_len.
  with caplog.at_level("WARNING", logger="mmada_jax.api"):
    m = MMaDA.from_pretrained(tiny_mmada_dir)
  assert m.generation_config.max_text_len == 512 and m.generation_config.num_vq_tokens == 16
  assert (m.generation_config.t2i_steps, m.generation_config.t2i_guidance_scale) == (15, 3.5)
  assert "assuming the released MMaDA-8B prompt layout max_text_len=512" in caplog.text


def test_generation_config_validation(tmp_path, tiny_mmada_dir):
  from mmada_jax import GenerationConfig
  with pytest.raises(ValueError, match="max_text_len must be a positive int"):
    GenerationConfig(max_text_len=0, num_vq_tokens=16)
  with pytest.raises(ValueError, match="not a multiple of block_length"):
    GenerationConfig(max_text_len=8, num_vq_tokens=16, gen_length=10, block_length=4)
  with pytest.raises(ValueError, match="image_grid"):
    GenerationConfig(max_text_len=8, num_vq_tokens=16, image_grid=(3, 5))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['cfg'\]"):
    GenerationConfig.from_dict({"max_text_len": 8, "num_vq_tokens": 16, "cfg": 1})
  with pytest.raises(ValueError, match="unsupported version 9"):
    GenerationConfig.from_dict({"version": 9, "max_text_len": 8, "num_vq_tokens": 16})
  d = tmp_path / "m"
  shutil.copytree(tiny_mmada_dir, d)
  (d / "generation_config.json").write_text(json.dumps({"mmada_jax": {"max_text_len": -1, "num_vq_tokens": 16}}))
  with pytest.raises(ValueError, match="generation_config.json: GenerationConfig.max_text_len"):
    MMaDA.from_pretrained(d)

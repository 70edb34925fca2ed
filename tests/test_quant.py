"""Weight-only quantization (mmada_jax.quant): accuracy bound, samplers, save/load, errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import MMaDA, quant
from mmada_jax.model import MMaDAConfig
from mmada_jax.sampling.cache import generate_text_cached
from mmada_jax.sampling.t2i import generate_image_tokens
from mmada_jax.sampling.text import generate_text

CFG = MMaDAConfig(vocab_size=96, d_model=256, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=512,
                  mask_token_id=95, num_vq_tokens=4, codebook_size=8)


@pytest.fixture(scope="module")
def model():
  return MMaDA.init(CFG, 0)


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, 90, (2, 12))


def _kl(ref, got):
  lp, lq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(got, -1)
  return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))


def test_int8_logits_close_to_float(model, ids):
  ref = np.asarray(model.logits(ids))
  q8 = model.quantize("int8")
  assert q8.quantization == quant.QuantSpec("int8", False, None)
  assert all(quant.is_quantized(q8.params["blocks"][k]) for k in quant.EINSUMS)
  assert not quant.is_quantized(q8.params["wte"]) and not quant.is_quantized(q8.params["lm_head"])
  assert q8.params["blocks"]["q_proj"].qvalue.dtype == jnp.int8
  got = np.asarray(q8.logits(ids))
  # absmax int8 per channel: relative weight error <= 1/254 per entry; logits of std ~1 stay close.
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
  assert _kl(ref, got) < 1e-3
  q4 = model.quantize("int4", lm_head=True)
  assert q4.quantization == quant.QuantSpec("int4", True, 128)   # d_model 256: two tiles of 128
  assert q4.params["blocks"]["q_proj"].scale.shape == (2, 2, 2, 128)
  got4 = np.asarray(q4.logits(ids))
  assert _kl(ref, got4) > _kl(ref, got)                          # int4 is coarser, but not garbage
  assert (got4.argmax(-1) == ref.argmax(-1)).mean() > 0.5
  assert q8.num_params == model.num_params
  assert quant.nbytes(q8.params) < 0.6 * quant.nbytes(model.params)
  assert "quantized=int8" in repr(q8)


@pytest.mark.slow
def test_every_sampler_runs_quantized(model):
  q = model.quantize("int8")
  prompt = np.random.default_rng(1).integers(0, 90, (1, 6))
  kw = dict(gen_length=8, block_length=4, steps=4)
  ref = generate_text(model.params, CFG, prompt, **kw).tokens
  out = generate_text(q.params, CFG, prompt, **kw).tokens
  assert out.shape == ref.shape and not np.any(np.asarray(out) == CFG.mask_token_id)
  for extra in (dict(cache="prefix"), dict(cache="dual"), dict(cache="prefix", threshold=0.5),
                dict(cache="none", threshold=0.9, min_transfer="schedule")):
    r = generate_text_cached(q.params, CFG, prompt, **extra, **kw)
    assert not np.any(np.asarray(r.tokens) == CFG.mask_token_id), extra
  r = generate_text(q.params, CFG, prompt, temperature=1.0, guidance_scale=1.0, seed=3, **kw)
  assert r.tokens.shape == (1, 14)
  n = CFG.num_vq_tokens
  t2i_ids = np.concatenate([prompt, np.full((1, 1), 7), np.full((1, n), CFG.mask_token_id), np.full((1, 1), 8)], 1)
  s = generate_image_tokens(q.params, CFG, t2i_ids, uncond_input_ids=t2i_ids, guidance_scale=2.0, steps=3,
                            image_token_offset=80)
  assert s.codes.shape == (1, n) and np.all((np.asarray(s.codes) >= 0) & (np.asarray(s.codes) < 8))
  g = q.generate_from_ids(prompt, gen_length=8, block_length=4, steps=4, cache="prefix")
  assert g.sequences.shape == (1, 14) and not np.any(g.sequences == CFG.mask_token_id)


def test_save_load_round_trip(model, ids, tmp_path):
  q = model.quantize("int4")
  q.save_pretrained(tmp_path / "q4")
  meta = json.load(open(tmp_path / "q4" / "mmada_jax.json"))
  assert meta["quantization"] == {"qtype": "int4", "lm_head": False, "tile_size": 128}
  back = MMaDA.from_pretrained(tmp_path / "q4")
  assert back.quantization == q.quantization
  assert back.params["blocks"]["ff_out"].qvalue.dtype == jnp.int4
  np.testing.assert_array_equal(np.asarray(back.logits(ids)), np.asarray(q.logits(ids)))
  same = MMaDA.from_pretrained(tmp_path / "q4", quantize="int4")
  np.testing.assert_array_equal(np.asarray(same.logits(ids)), np.asarray(q.logits(ids)))
  with pytest.raises(ValueError, match="holds a int4-quantized model.*quantize='int8'"):
    MMaDA.from_pretrained(tmp_path / "q4", quantize="int8")
  with pytest.raises(ValueError, match="holds a int4-quantized model"):
    MMaDA.from_pretrained(tmp_path / "q4", quantize="int4", quantize_lm_head=True)
  with pytest.raises(ValueError, match="orbax format only"):
    q.save_pretrained(tmp_path / "hf", format="hf")


def test_quantize_while_loading_equals_quantize_after(model, ids, tmp_path):
  model.save_pretrained(tmp_path / "f")
  loaded = MMaDA.from_pretrained(tmp_path / "f", quantize="int8", quantize_lm_head=True)
  after = model.quantize("int8", lm_head=True)
  np.testing.assert_array_equal(np.asarray(loaded.logits(ids)), np.asarray(after.logits(ids)))
  assert not isinstance(jax.tree.leaves(loaded.params)[0], np.ndarray)


def test_hf_checkpoint_quantized_on_load(tiny_mmada_dir):
  f = MMaDA.from_pretrained(tiny_mmada_dir)
  q = MMaDA.from_pretrained(tiny_mmada_dir, quantize="int8")
  assert q.quantization.qtype == "int8"
  ids = np.random.default_rng(2).integers(200, 126000, (1, 9))
  ref, got = np.asarray(f.logits(ids)), np.asarray(q.logits(ids))
  assert _kl(ref, got) < 1e-2
  assert f.quantization is None


def test_bad_requests(model, tiny_mmada_dir):
  with pytest.raises(ValueError, match="unknown quantization 'int3'"):
    model.quantize("int3")
  with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
    MMaDA.from_pretrained(tiny_mmada_dir, quantize="fp8")
  with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize="):
    MMaDA.from_pretrained(tiny_mmada_dir, quantize_lm_head=True)
  with pytest.raises(ValueError, match="already int8-quantized"):
    model.quantize("int8").quantize("int4")
  p = dict(model.params, blocks=dict(model.params["blocks"]))
  p["blocks"]["q_proj"] = quant.quantize_array(p["blocks"]["q_proj"], "blocks/q_proj", quant.QuantSpec("int8"))
  with pytest.raises(ValueError, match="only some block projections are quantized"):
    quant.quantization_of(p)


def test_unquantized_path_untouched(model, ids):
  """A float model's pytree carries no quantization and its logits are those of forward."""
  from mmada_jax.model import transformer
  assert model.quantization is None and quant.quantization_of(model.params) is None
  np.testing.assert_array_equal(np.asarray(model.logits(ids)),
                                np.asarray(jax.jit(lambda p, x: transformer.forward(p, CFG, x))(model.params, ids)))
  assert quant.param_axes(model.params, CFG) == transformer.param_axes(CFG)


# ----------------------------------------------------------------------------- AOT sampler programs

def _tiny_train_config():
  from mmada_jax.configs import tiny
  return tiny.get_config("pretrain")


_TINY_SHAPES = "prompt_len=16,gen_length=32,block_length=8,steps=8,t2i_steps=3"


def _topology():
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: AOT compilation for TPU topologies needs it")
  from mmada_jax import aot
  topo = aot.parse_topology("v5e:1x1")
  try:
    return topo, topo.devices()
  except Exception as e:  # noqa: BLE001 - libtpu present but unusable on this host
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")


def test_sampler_programs_compile_quantized():
  from mmada_jax.aot.estimate import estimate_sampler
  topo, devices = _topology()
  cfg = _tiny_train_config()
  rows = {(p, q): estimate_sampler(cfg, topo, p, q, shapes=_TINY_SHAPES, devices=devices)
          for p, q in (("text_sampler", "none"), ("text_sampler", "int8"), ("t2i_sampler", "int8"))}
  for (p, q), r in rows.items():
    assert r["fits"] is True and r["hbm_capacity_bytes"] == 16 * 2 ** 30, (p, q)
    assert 0 < r["hbm_per_chip_bytes"] < r["hbm_capacity_bytes"]
    assert r["memory"]["argument"] >= r["param_bytes"]
  assert rows[("t2i_sampler", "int8")]["seq_len"] == 20 + 16 + 3
  # int8 weights: smaller arguments than bfloat16 (the embedding stays bfloat16).
  assert rows[("text_sampler", "int8")]["param_bytes"] < rows[("text_sampler", "none")]["param_bytes"]
  with pytest.raises(ValueError, match="--sampler_shapes entry 'prompt=3'"):
    estimate_sampler(cfg, topo, "text_sampler", shapes="prompt=3", devices=devices)
  with pytest.raises(ValueError, match="exceed max_sequence_length"):
    estimate_sampler(cfg, topo, "text_sampler", devices=devices)


@pytest.mark.slow
def test_aot_sampler_json_line():
  import subprocess
  import sys
  _topology()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "mmada_jax.aot", "--config=configs/tiny.py:pretrain", "--topology=v5e:1x1",
                      "--program=t2i_sampler", "--quantize=int4", f"--sampler_shapes={_TINY_SHAPES}", "--json"],
                     cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  lines = [line for line in p.stdout.splitlines() if line.strip()]
  assert len(lines) == 1
  r = json.loads(lines[0])
  for k in ("fits", "hbm_per_chip_bytes", "hbm_capacity_bytes", "hbm_headroom", "memory", "program", "quantize"):
    assert k in r, k
  assert (r["program"], r["quantize"], r["fits"]) == ("t2i_sampler", "int4", True)
  bad = subprocess.run([sys.executable, "-m", "mmada_jax.aot", "--config=configs/tiny.py:pretrain",
                        "--topology=v5e:1x1", "--quantize=int8"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 2 and "--quantize applies to the sampler programs" in bad.stderr

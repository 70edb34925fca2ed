"""The attention seam (model/attention.py): every implementation against ``xla``.

* splash: the Pallas kernel in interpret mode on CPU (forward and gradients, padding through
  segment ids, GQA, padded query rows, key-only masks), inside ``shard_map`` on an 8-device mesh,
  the tiny fixture model (logits and the plain / prefix-cached samplers token-exact), and an AOT
  compile for an abstract TPU topology (the Mosaic kernel in the executable);
* cudnn: no GPU here, so the call is checked by substituting ``jax.nn.dot_product_attention``
  with a recorder (implementation='cudnn', a bool mask, a finite bias) that computes with XLA; on
  a non-GPU backend an explicit 'cudnn' is a ValueError, never a silent fallback;
* the bf16 padded-row case: no NaN, the uniform average of the values (the original's softmax of
  a fully masked row), for every implementation.
"""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax.model import attention as A
from mmada_jax.model.config import ATTENTION_IMPLS, MMaDAConfig


def _qkv(b=2, l=100, m=None, n=4, kv=2, h=16, dtype=jnp.float32, seed=0):
  m = l if m is None else m
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, l, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, m, kv, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, m, kv, h), jnp.float32).astype(dtype)
  return q, k, v


def _padding(b, l, pad):
  """attention_mask [b, l]: row 0 left-padded by ``pad`` tokens, the others full."""
  return jnp.ones((b, l), bool).at[0, :pad].set(False)


def _uniform(v, n):
  """The mean of v [b, m, k, h] over keys, per query head -> [b, n, h] (float32)."""
  mean = jnp.mean(v.astype(jnp.float32), axis=1)
  return jnp.repeat(mean, n // v.shape[2], axis=1)


def test_impl_names_agree():
  assert ATTENTION_IMPLS == A.IMPLS
  assert MMaDAConfig().attention_impl == "auto"
  with pytest.raises(ValueError, match="attention_impl"):
    MMaDAConfig(attention_impl="flash")


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cpu"])
def test_auto_resolution(monkeypatch, platform):
  monkeypatch.setattr(A, "backend_platform", lambda: platform)
  q16, k16, _ = _qkv(l=256, h=128, dtype=jnp.bfloat16)
  q32, k32, _ = _qkv(l=256, h=128)
  pad = A.Allow(q_valid=_padding(2, 256, 3), k_valid=_padding(2, 256, 3))
  dense = A.Allow(dense=jnp.ones((2, 1, 256, 256), bool))
  add = jnp.zeros((2, 1, 256, 256))
  want = {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}[platform]
  assert A.resolve_impl("auto", q16, k16, None, pad) == want
  assert A.resolve_impl("xla", q16, k16, None, pad) == "xla"
  # splash takes padding masks only, >= 128 queries; cudnn bf16/fp16 only: else auto is xla.
  assert A.resolve_impl("auto", q16, k16, add, None) == ("cudnn" if platform == "gpu" else "xla")
  assert A.resolve_impl("auto", q16, k16, None, dense) == ("cudnn" if platform == "gpu" else "xla")
  assert A.resolve_impl("auto", q32, k32, None, pad) == ("splash" if platform == "tpu" else "xla")
  assert A.resolve_impl("auto", q16[:, :32], k16, None, None) == ("cudnn" if platform == "gpu" else "xla")


def test_explicit_impl_errors(monkeypatch):
  q, k, v = _qkv(dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a GPU backend"):      # this host: cpu, never a fallback
    A.dot_product_attention(q, k, v, None, None, "cudnn")
  dense = jnp.ones((2, 1, 100, 100), bool)
  with pytest.raises(ValueError, match="dense bool attention_bias"):
    A.dot_product_attention(q, k, v, None, dense, "splash")
  with pytest.raises(ValueError, match="float attention_bias"):
    A.dot_product_attention(q, k, v, jnp.zeros((2, 1, 100, 100)), None, "splash")
  monkeypatch.setattr(A, "backend_platform", lambda: "gpu")
  with pytest.raises(ValueError, match="bf16 or fp16"):
    A.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), None, None,
                            "cudnn")
  with pytest.raises(ValueError, match="TPU Pallas kernel"):
    A.dot_product_attention(q, k, v, None, None, "splash")


def test_mask_forms():
  m = _padding(2, 5, 2)
  add, allow = A.attention_masks(m, None, 5, 5)
  assert add is None and allow.is_padding
  np.testing.assert_array_equal(allow.materialize(), (m[:, :, None] & m[:, None, :])[:, None])
  key_only = jnp.ones((2, 1, 1, 7), bool).at[1, 0, 0, :3].set(False)
  _, allow = A.attention_masks(None, key_only, 4, 7)
  assert allow.is_padding and allow.k_valid.shape == (2, 7) and not bool(allow.k_valid[1, 0])
  _, allow = A.attention_masks(None, jnp.ones((2, 1, 4, 7), bool), 4, 7)
  assert not allow.is_padding
  with pytest.raises(ValueError, match="attention_bias has shape"):
    A.attention_masks(None, jnp.ones((2, 4, 7), bool), 4, 7)


def _grads(fn, q, k, v):
  w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
  return jax.grad(lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(q, k, v)


CASES = {
    "nomask": dict(mask=None, l=100, m=100),
    "padding": dict(mask="padding", l=100, m=100),
    "key_only_cached": dict(mask="keys", l=40, m=140),     # a cached sampler window: few queries, more keys
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == "padding" else [pytest.mark.slow]) for c in CASES])
def test_splash_interpret_matches_xla(case):
  c = CASES[case]
  q, k, v = _qkv(l=c["l"], m=c["m"])
  if c["mask"] == "padding":
    add, allow = A.attention_masks(_padding(2, c["l"], 17), None, c["l"], c["m"])
  elif c["mask"] == "keys":
    keys = jnp.ones((2, 1, 1, c["m"]), bool).at[0, 0, 0, :30].set(False)
    add, allow = A.attention_masks(None, keys, c["l"], c["m"])
  else:
    add, allow = None, None
  ref = A.xla_attention(q, k, v, add, allow)
  got = A.splash_attention(q, k, v, allow, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)
  for g, r in zip(_grads(lambda *a: A.splash_attention(*a, allow, interpret=True), q, k, v),
                  _grads(lambda *a: A.xla_attention(*a, add, allow), q, k, v)):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def _recording_sdpa(monkeypatch, calls):
  real = jax.nn.dot_product_attention

  def fake(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    calls.append(dict(implementation=implementation, mask=mask, bias=bias, k_heads=k.shape[2]))
    assert implementation == "cudnn"
    assert mask is None or (mask.dtype == jnp.bool_ and mask.ndim == 4)
    assert bias is None or (bias.dtype == q.dtype and bool(jnp.isfinite(bias).all()))
    return real(q, k, v, bias=bias, mask=mask, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cudnn_call_and_semantics(monkeypatch, dtype):
  calls = []
  _recording_sdpa(monkeypatch, calls)
  q, k, v = _qkv(l=24, dtype=dtype)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  # padding mask (row 0's first 5 queries are padding), then the original's additive 0/1 bias
  # with a fully -inf row
  add_in = jnp.ones((2, 1, 24, 24)).at[1, 0, 3].set(-jnp.inf)
  for mask_kw in (dict(attention_mask=_padding(2, 24, 5)), dict(attention_bias=add_in)):
    add, allow = A.attention_masks(mask_kw.get("attention_mask"), mask_kw.get("attention_bias"), 24, 24)
    got = A.cudnn_attention(q, k, v, add, allow)
    ref = A.xla_attention(q, k, v, add, allow)
    assert calls[-1]["k_heads"] == 2                        # GQA: K/V not repeated
    assert not np.isnan(np.asarray(got, np.float32)).any()
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(got[1, 3], np.float32), np.asarray(_uniform(v, 4)[1]), rtol=tol, atol=tol)
  assert len(calls) == 2 and calls[0]["mask"] is not None and calls[1]["bias"] is not None


@pytest.mark.parametrize("impl", ["xla", "splash", "cudnn"])
def test_bf16_padded_rows_uniform_never_nan(monkeypatch, impl):
  """A padding query (no allowed key) gives the mean of the values in bf16, not NaN; the same
  holds for a float bias of -inf, which the old cast of float32-min to bf16 turned into NaN."""
  if impl == "cudnn":
    _recording_sdpa(monkeypatch, [])
  q, k, v = _qkv(l=32, dtype=jnp.bfloat16)
  add, allow = A.attention_masks(_padding(2, 32, 6), None, 32, 32)
  fn = {"xla": lambda: A.xla_attention(q, k, v, add, allow),
        "splash": lambda: A.splash_attention(q, k, v, allow, interpret=True),
        "cudnn": lambda: A.cudnn_attention(q, k, v, add, allow)}[impl]
  out = np.asarray(fn(), np.float32)
  assert not np.isnan(out).any()
  want = np.asarray(_uniform(v, 4)[0], np.float32)
  for row in range(6):
    np.testing.assert_allclose(out[0, row], want, rtol=2e-2, atol=2e-2)
  ref = np.asarray(A.xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), add,
                                   allow))
  np.testing.assert_allclose(out, ref, rtol=5e-2, atol=5e-2)


def test_splash_in_shard_map_on_a_mesh():
  """On a data=2, fsdp=2, tensor=2 mesh the kernel runs per shard (batch and heads split)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mmada_jax.sharding import ShardingContext, use_sharding
  from mmada_jax.sharding.rules import make_mesh
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ctx = ShardingContext.create(mesh)
  q, k, v = _qkv(b=4, l=100, n=4, kv=2)
  add, allow = A.attention_masks(_padding(4, 100, 9), None, 100, 100)
  ref = A.xla_attention(q, k, v, add, allow)
  with use_sharding(ctx):
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
    fn = jax.jit(lambda q, k, v, m: A.splash_attention(q, k, v, A.Allow(m, m), interpret=True))
    got = fn(shard(q), shard(k), shard(v), allow.q_valid)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny(tiny_mmada_dir):
  from mmada_jax.checkpoint.hf_mmada import load_hf_checkpoint
  return load_hf_checkpoint(str(tiny_mmada_dir), dtype="float32")


def test_fixture_logits_splash_equal_xla(tiny, tiny_mmada_dir):
  """The tiny checkpoint's recorded padding case through splash: the xla logits."""
  from mmada_jax.model import transformer
  params, cfg = tiny
  cases = dict(np.load(tiny_mmada_dir / "cases.npz"))
  ids = jnp.asarray(cases["logits/in/input_ids"], jnp.int32)
  mask = jnp.asarray(cases["logits/in/attention_mask"])
  run = lambda impl, **kw: np.asarray(jax.jit(lambda p, i, m: transformer.forward(
      p, cfg.replace(attention_impl=impl), i, attention_mask=m, **kw))(params, ids, mask))
  np.testing.assert_allclose(run("splash"), run("xla"), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["g8_b4_s4_padded", "g16_b8_s4"])
def test_fixture_samplers_token_exact_with_splash(tiny, tiny_mmada_dir, name):
  """The plain sampler's fixture cases and the prefix-cached sampler (window forwards against
  the KV cache: key-only masks) give the same tokens through splash as through xla."""
  from mmada_jax.parity import replay
  from mmada_jax.sampling.cache import generate_text_cached
  params, cfg = tiny
  cases = replay.load_cases(str(tiny_mmada_dir / "cases.npz"))
  got = replay.run_text_setting(params, cfg.replace(attention_impl="splash"), cases, name)
  assert not replay.compare(got, cases, f"text_gen/out/{name}")
  prompt = cases["text_gen/in/prompt"]
  kw = dict(gen_length=16, block_length=8, steps=8, cache="prefix")
  a = generate_text_cached(params, cfg.replace(attention_impl="splash"), prompt, **kw)
  b = generate_text_cached(params, cfg.replace(attention_impl="xla"), prompt, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: the TPU lowering test needs it")


@needs_libtpu
def test_splash_lowers_for_tpu_topology():
  """Forward and backward of the seam under auto, compiled for an abstract v5p:2x2x1 slice: the
  executable holds the Mosaic (splash) kernel; without a mesh context auto would be xla."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mmada_jax import aot
  from mmada_jax.sharding import ShardingContext, use_sharding
  from mmada_jax.sharding.rules import make_mesh
  try:
    devices = aot.parse_topology("v5p:2x2x1").devices()
  except Exception as e:  # noqa: BLE001 - libtpu present but unusable on this host
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices)
  b, l, n, kv, h = 4, 1539, 8, 2, 128
  sh = NamedSharding(mesh, P("fsdp"))
  qa = jax.ShapeDtypeStruct((b, l, n, h), jnp.bfloat16, sharding=sh)
  ka = jax.ShapeDtypeStruct((b, l, kv, h), jnp.bfloat16, sharding=sh)
  ma = jax.ShapeDtypeStruct((b, l), jnp.bool_, sharding=sh)

  def loss(q, k, v, m):
    add, allow = A.attention_masks(m, None, l, l)
    assert A.resolve_impl("auto", q, k, add, allow) == "splash"
    return A.dot_product_attention(q, k, v, add, allow, "auto").astype(jnp.float32).sum()

  with use_sharding(ShardingContext.create(mesh)):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qa, ka, ka, ma).compile()
  text = compiled.as_text()
  assert "tpu_custom_call" in text and "splash" in text
  # XLA's cost analysis cannot see inside the kernels; the AOT estimate counts their matmuls:
  # fwd 2 + dq 3 + dkv 4 matmuls of 2·heads·Lp²·h each, one row per chip, L padded to 1664.
  from mmada_jax.aot.programs import splash_kernel_flops
  assert splash_kernel_flops(text) == pytest.approx(18.0 * (b // 4) * n * 1664 ** 2 * h)

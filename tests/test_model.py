"""The backbone against the original's recorded outputs and against an independent numpy port."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mmada_jax import MMaDA
from mmada_jax.model import MMaDAConfig, transformer


@pytest.fixture(scope="module")
def model(tiny_mmada_dir):
  return MMaDA.from_pretrained(tiny_mmada_dir, dtype="float32")


@pytest.fixture(scope="module")
def cases(tiny_mmada_dir):
  return dict(np.load(tiny_mmada_dir / "cases.npz"))


@pytest.fixture(scope="module")
def hidden_fn(model):
  cfg = model.config
  return jax.jit(lambda p, ids, b: transformer.forward(p, cfg, ids, attention_bias=b, output_hidden_states=True))


def _check_logits(logits, cases, variant):
  cols = cases["logits_columns"]
  logits = np.asarray(logits)
  np.testing.assert_allclose(logits[..., cols], cases[f"logits/out/{variant}.logits_cols"], rtol=1e-4, atol=1e-4)
  lse = np.asarray(jax.nn.logsumexp(logits, axis=-1))
  np.testing.assert_allclose(lse, cases[f"logits/out/{variant}.logsumexp"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1), cases[f"logits/out/{variant}.argmax"])
  np.testing.assert_allclose(logits.max(-1), cases[f"logits/out/{variant}.max"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["nomask", "boolbias", "floatbias"])
def test_logits_match_original(model, cases, variant):
  ids = cases["logits/in/input_ids"]
  bias = None if variant == "nomask" else cases[f"logits/out/{variant}.attention_bias"]
  _check_logits(model.logits(ids, attention_bias=bias), cases, variant)


def test_attention_mask_is_the_samplers_bool_padding_mask(model, cases):
  ids, mask = cases["logits/in/input_ids"], cases["logits/in/attention_mask"]
  assert (mask == 0).any(), "the fixture row 0 has [iPAD] padding"
  logits = model.logits(ids, attention_mask=mask)
  assert np.isfinite(np.asarray(logits)).all()
  _check_logits(logits, cases, "boolbias")


def test_full_vocab_logits_at_first_positions(model, cases):
  logits = np.asarray(model.logits(cases["logits/in/input_ids"]))
  np.testing.assert_allclose(logits[:, :2], cases["logits/out/nomask.logits_full_pos0to1"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["nomask", "boolbias"])
def test_hidden_states_layout(model, cases, hidden_fn, variant):
  ids = jnp.asarray(cases["logits/in/input_ids"], jnp.int32)
  bias = None if variant == "nomask" else jnp.asarray(cases["logits/out/boolbias.attention_bias"])
  _, hidden = hidden_fn(model.params, ids, bias)
  ref = np.moveaxis(cases[f"logits/out/{variant}.hidden_states"], 0, 0)
  np.testing.assert_allclose(np.asarray(hidden), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- independent numpy port
def _numpy_forward(params, cfg: MMaDAConfig, ids, bias=None):
  """Straight transcription of the original's math (torch layouts, repeat_interleave GQA)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  b, l = ids.shape

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2) / h))
  f = np.arange(l)[:, None] * inv[None]
  emb = np.concatenate([f, f], -1)
  cos, sin = np.cos(emb), np.sin(emb)

  def rope(t):  # [b, heads, l, h]
    rot = np.concatenate([-t[..., h // 2:], t[..., :h // 2]], -1)
    return t * cos + rot * sin

  x = p["wte"][ids]
  for i in range(cfg.n_layers):
    blk = {name: v[i] for name, v in p["blocks"].items()}
    hx = rms(x, blk["attn_norm"])
    q = (hx @ blk["q_proj"].reshape(d, n * h)).reshape(b, l, n, h).transpose(0, 2, 1, 3)
    kk = (hx @ blk["k_proj"].reshape(d, k * h)).reshape(b, l, k, h).transpose(0, 2, 1, 3)
    v = (hx @ blk["v_proj"].reshape(d, k * h)).reshape(b, l, k, h).transpose(0, 2, 1, 3)
    q, kk = rope(q), rope(kk)
    kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(h)
    if bias is not None:
      s = s + bias
    s = s - s.max(-1, keepdims=True)
    a = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, l, n * h)
    x = x + o @ blk["attn_out"].reshape(n * h, d)
    hx = rms(x, blk["ff_norm"])
    g = hx @ blk["ff_proj"]
    x = x + (g / (1 + np.exp(-g)) * (hx @ blk["up_proj"])) @ blk["ff_out"]
  return rms(x, p["ln_f"]) @ p["lm_head"]


@pytest.mark.parametrize("n_heads,n_kv_heads,n_layers,theta", [(4, 2, 3, 10000.0), (6, 1, 2, 1e6)])
def test_gqa_and_other_shapes_match_numpy_port(n_heads, n_kv_heads, n_layers, theta):
  cfg = MMaDAConfig(vocab_size=97, d_model=48, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers,
                    mlp_hidden_size=80, rope_theta=theta, mask_token_id=96, eos_token_id=95, pad_token_id=95)
  model = MMaDA.init(cfg, 3)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  bias = np.random.default_rng(1).normal(size=(2, 1, 11, 11)).astype(np.float32)
  for bb in (None, bias):
    got = np.asarray(model.logits(ids, attention_bias=bb))
    want = _numpy_forward(model.params, cfg, ids, bb)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_bf16_compute_close_to_fp32(model, cases):
  ids = cases["logits/in/input_ids"]
  ref = np.asarray(model.logits(ids))
  bf = MMaDA(model.params, model.config.replace(dtype="bfloat16"))
  got = np.asarray(bf.logits(ids))
  assert got.dtype == np.float32
  assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_and_unrolled_layers_do_not_change_outputs(model, cases, policy):
  ids = jnp.asarray(cases["logits/in/input_ids"][:1], jnp.int32)
  ref = model.logits(ids)
  other = MMaDA(model.params, model.config.replace(remat_policy=policy, scan_layers=policy == "dots"))
  np.testing.assert_allclose(np.asarray(other.logits(ids)), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Gradients flow through the remat'ed scan.
  cfg = other.config
  g = jax.grad(lambda p: transformer.forward(p, cfg, ids)[..., :8].sum())(model.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_kv_cache_reproduces_full_forward(model, cases):
  """Keys/values of a prefix, fed back as a cache, give the same logits for the suffix."""
  cfg = model.config
  ids = jnp.asarray(cases["logits/in/input_ids"], jnp.int32)
  full = transformer.forward(model.params, cfg, ids)
  _, kv = transformer.forward(model.params, cfg, ids, return_kv=True)
  cut = 20
  prefix_kv = (kv[0][:, :, :cut], kv[1][:, :, :cut])
  # Suffix queries attend to all keys: cached prefix + fresh suffix (the prefix's own keys are
  # exact because its cache was computed from the full sequence).
  tail = transformer.forward(model.params, cfg, ids[:, cut:], kv_cache=prefix_kv)
  np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, cut:]), rtol=1e-4, atol=1e-4)

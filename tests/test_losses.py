"""Mask schedules, noising (replay of the recorded draws) and the training losses (fixture parity)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax.diffusion import (
    LossCoefficients,
    answer_loss,
    get_schedule,
    image_mask_count,
    lm_loss,
    mask_image_tokens,
    mask_text_tokens,
    mixed_loss,
    mixed_loss_weights,
    select_positions,
    t2i_loss,
    token_cross_entropy,
    weighted_loss,
)
from mmada_jax.prompting import IGNORE_ID, SpecialTokens, lm_chat_prompt, lm_prompt, mmu_prompt, t2i_prompt
from mmada_jax.prompting import training_attention_bias

SP = SpecialTokens()
RTOL = 1e-5


@pytest.fixture(scope="module")
def losses_case(tiny_mmada_dir):
  z = np.load(tiny_mmada_dir / "cases.npz")
  return {k[len("losses/"):]: z[k] for k in z.files if k.startswith("losses/")}


def _strip_eos(row) -> list[int]:
  row = [int(x) for x in row]
  while row and row[-1] == SP.eos:
    row.pop()
  return row


# schedules ----------------------------------------------------------------------------------

def test_schedules():
  t = jnp.array([0.0, 0.25, 0.5, 1.0], jnp.float32)
  np.testing.assert_allclose(get_schedule("cosine")(t), np.cos(np.pi * np.asarray(t) / 2), atol=1e-7)
  np.testing.assert_allclose(get_schedule("linear")(t), [1.0, 0.75, 0.5, 1e-6], rtol=1e-6)
  np.testing.assert_allclose(get_schedule("pow2")(t), [1.0, 1 - 0.0625, 0.75, 1e-6], rtol=1e-6)
  sig = np.asarray(get_schedule("sigmoid")(t))
  s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  np.testing.assert_allclose(sig, [(s(3) - s(6 * x - 3)) / (s(3) - s(-3)) for x in [0, .25, .5, 1]], atol=1e-6)
  assert sig[0] == pytest.approx(1.0) and sig[-1] == pytest.approx(1e-6)
  assert jax.jit(get_schedule("cosine"))(t).dtype == jnp.float32
  for bad in ("cos", "powx"):
    with pytest.raises(ValueError):
      get_schedule(bad)


# image masking ------------------------------------------------------------------------------

def test_image_masking_random_draws():
  ids = jnp.asarray(SP.image_offset + np.arange(40).reshape(4, 10))
  fn = jax.jit(lambda k: mask_image_tokens(k, ids, mask_id=SP.mask, min_masking_rate=0.2))
  out = fn(jax.random.key(3))
  n_mask = image_mask_count(out.mask_prob, 10)
  np.testing.assert_array_equal(out.mask.sum(-1), n_mask)
  assert (out.mask_prob >= 0.2).all() and (n_mask >= 1).all()
  np.testing.assert_array_equal(out.input_ids, np.where(out.mask, SP.mask, ids))
  np.testing.assert_array_equal(out.labels, np.where(out.mask, ids, IGNORE_ID))
  # given t and noise: the argsort rule of the original
  t = jnp.array([0.1, 0.5, 0.9, 0.99])
  noise = jax.random.uniform(jax.random.key(1), (4, 10))
  rep = mask_image_tokens(None, ids, mask_id=SP.mask, t=t, noise=noise)
  n = np.maximum(np.round(10 * np.cos(np.pi * np.asarray(t) / 2).astype(np.float32)), 1)
  np.testing.assert_array_equal(rep.mask, np.argsort(np.asarray(noise), -1) < n[:, None])
  assert image_mask_count(jnp.array([0.05, 0.15, 0.25]), 10).tolist() == [1, 2, 2]  # round half to even


def test_image_masking_replays_fixture(losses_case):
  c = losses_case
  s, n = int(c["in/max_seq_length"]), c["in/t2i_image_tokens"].shape[1]
  out = mask_image_tokens(None, c["in/t2i_image_tokens"], mask_id=SP.mask, token_mask=c["in/t2i_token_mask"])
  np.testing.assert_array_equal(image_mask_count(jnp.asarray(c["in/t2i_mask_prob"]), n), c["in/t2i_token_mask"].sum(-1))
  labels = c["in/labels"]
  texts = [[int(x) for x in row[:s + 1] if x != IGNORE_ID][1:-1] for row in labels[:2]]
  pb = t2i_prompt(texts, np.asarray(out.input_ids), s, image_labels=np.asarray(out.labels),
                  cond_dropout=np.zeros(2, bool))
  np.testing.assert_array_equal(pb.input_ids, c["in/input_ids"][:2])
  np.testing.assert_array_equal(pb.labels, labels[:2])
  np.testing.assert_array_equal(pb.attention_mask, c["in/t2i_masks"])
  assert pb.input_ids.shape[1] == s + n + 3


# text masking -------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_text_masking_replays_fixture(losses_case, chat):
  c = losses_case
  sfx = "_chat" if chat else ""
  ids, labels = c["in/input_ids" + sfx], c["in/labels" + sfx]
  length = ids.shape[1]
  if chat:
    pb = lm_chat_prompt([_strip_eos(labels[2])], length)
    np.testing.assert_array_equal(pb.prompt_mask, c["in/lm_chat_prompt_masks"])
    out = mask_text_tokens(None, pb.input_ids, mask_id=SP.mask, prompt_mask=pb.prompt_mask,
                           t=c["in/lm_chat_t"], u=c["in/lm_chat_u"])
    np.testing.assert_array_equal(out.p_mask, c["in/p_mask_lm_chat"])
    np.testing.assert_array_equal(out.answer_lengths, c["in/answer_lengths_lm"][:, 0])
  else:
    pb = lm_prompt([_strip_eos(labels[2])], length)
    out = mask_text_tokens(None, pb.input_ids, mask_id=SP.mask, t=c["in/lm_t"], u=c["in/lm_u"])
    np.testing.assert_array_equal(out.p_mask, c["in/p_mask_lm"])
  np.testing.assert_array_equal(pb.labels, labels[2:3])
  np.testing.assert_array_equal(out.input_ids, ids[2:3])
  np.testing.assert_array_equal(out.masked, ids[2:3] == SP.mask)


def test_mmu_masking_replays_fixture(losses_case):
  c = losses_case
  ids, labels = c["in/input_ids"], c["in/labels"]
  s, n = int(c["in/max_seq_length"]), c["in/t2i_image_tokens"].shape[1]
  pb = mmu_prompt(ids[3:, 2:2 + n], [_strip_eos(r[n + 3:]) for r in labels[3:]], s)
  np.testing.assert_array_equal(pb.labels, labels[3:])
  np.testing.assert_array_equal(pb.prompt_mask, c["in/mmu_prompt_masks"])
  out = mask_text_tokens(None, pb.input_ids, mask_id=SP.mask, prompt_mask=pb.prompt_mask,
                         t=c["in/mmu_t"], u=c["in/mmu_u"])
  np.testing.assert_array_equal(out.input_ids, ids[3:])
  np.testing.assert_array_equal(out.p_mask, c["in/p_mask_mmu"])
  np.testing.assert_array_equal(out.answer_lengths, c["in/answer_lengths"][:, 0])


def test_text_masking_random_draws():
  ids = jnp.arange(2 * 50).reshape(2, 50) + 10
  prompt = (jnp.arange(50) < 20)[None].repeat(2, 0)
  out = jax.jit(lambda k: mask_text_tokens(k, ids, mask_id=SP.mask, prompt_mask=prompt))(jax.random.key(0))
  assert not np.asarray(out.masked)[:, :20].any()
  np.testing.assert_array_equal(out.input_ids, np.where(out.masked, SP.mask, ids))
  assert out.answer_lengths.tolist() == [30, 30] and out.p_mask.dtype == jnp.float32
  assert ((out.p_mask >= 1e-3) & (out.p_mask <= 1.0)).all()
  with pytest.raises(ValueError, match="PRNG key"):
    mask_text_tokens(None, ids, mask_id=SP.mask)


# loss arithmetic ----------------------------------------------------------------------------

def _np_ce(logits, labels):
  lg = np.asarray(logits, np.float64)
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  safe = np.where(labels == IGNORE_ID, 0, labels)
  return np.where(labels == IGNORE_ID, 0.0, lse - np.take_along_axis(lg, safe[..., None], -1)[..., 0])


def test_loss_formulas_against_numpy():
  rng = np.random.default_rng(0)
  b, length, v, s, mask = 3, 9, 23, 3, 22
  logits = rng.normal(size=(b, length, v)).astype(np.float32) * 3
  clean = rng.integers(0, 20, (b, length))
  ids = np.where(rng.random((b, length)) < 0.5, mask, clean)
  labels = np.where(rng.random((b, length)) < 0.1, IGNORE_ID, clean)
  ce = _np_ce(logits, labels)
  np.testing.assert_allclose(token_cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels),
                             _np_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels),
                             rtol=1e-5, atol=1e-5)
  valid = (np.arange(length)[None] >= s + 1) & (labels != IGNORE_ID)
  np.testing.assert_allclose(t2i_loss(logits, labels, s), ce[valid].mean(), rtol=1e-6)
  p = rng.uniform(0.1, 1, b).astype(np.float32)
  m = (ids == mask) & (labels != IGNORE_ID)
  np.testing.assert_allclose(lm_loss(logits, labels, ids, p, mask), (ce / p[:, None])[m].sum() / (b * length),
                             rtol=1e-6)
  ans = np.array([4, 0, 7])
  expect = sum((ce[i] / p[i] / max(ans[i], 1))[m[i]].sum() for i in range(b)) / b
  np.testing.assert_allclose(answer_loss(logits, labels, ids, np.repeat(p[:, None], length, 1),
                                         np.repeat(ans[:, None], length, 1), mask, min_answer_length=1),
                             expect, rtol=1e-6)


def test_selected_positions_give_the_full_loss():
  rng = np.random.default_rng(1)
  b, length, v, mask = 4, 8, 31, 30
  logits = jnp.asarray(rng.normal(size=(b, length, v)), jnp.float32)
  clean = rng.integers(0, 29, (b, length))
  batch = {"input_ids": np.where(rng.random((b, length)) < 0.4, mask, clean), "labels": clean,
           "p_mask_lm": np.full(1, 0.4, np.float32), "p_mask_mmu": np.full(2, 0.5, np.float32),
           "answer_lengths": np.array([5, 6])}
  batch["labels"] = np.where(np.arange(length) < 3, IGNORE_ID, clean)  # t2i rows: positions < S+1 ignored
  kw = dict(batch_sizes=(1, 1, 2), max_text_len=2, mask_id=mask)
  total, parts = jax.jit(lambda lg: mixed_loss(lg, batch, coeffs=(1.0, 0.5, 2.0), **kw))(logits)
  weights = mixed_loss_weights(batch, **kw)
  combined = weights["t2i"] + 0.5 * weights["lm"] + 2.0 * weights["mmu"]
  idx, w_sel, dropped = select_positions(combined, 32)
  assert int(dropped) == 0
  flat_logits = logits.reshape(b * length, v)[idx]  # what a trainer computes from hidden states
  ce_sel = token_cross_entropy(flat_logits, batch["labels"].reshape(-1)[idx])
  np.testing.assert_allclose(weighted_loss(ce_sel, w_sel), total, rtol=1e-6)
  np.testing.assert_allclose(total, parts["loss_t2i"] + 0.5 * parts["loss_lm"] + 2.0 * parts["loss_mmu"], rtol=1e-6)
  _, _, dropped = select_positions(combined, 2)
  assert int(dropped) == int((combined != 0).sum()) - 2
  zero_total, zero_parts = mixed_loss(logits[1:], {**batch, "input_ids": batch["input_ids"][1:],
                                                   "labels": batch["labels"][1:]},
                                      batch_sizes=(0, 1, 2), max_text_len=2, mask_id=mask)
  assert float(zero_parts["loss_t2i"]) == 0.0
  np.testing.assert_allclose(zero_parts["loss_mmu"], parts["loss_mmu"], rtol=1e-6)
  with pytest.raises(ValueError, match="do not add up"):
    mixed_loss(logits, batch, batch_sizes=(1, 1, 1), max_text_len=2, mask_id=mask)


# fixture parity with the model --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_mmada_dir):
  hf = pytest.importorskip("mmada_jax.checkpoint.hf_mmada")
  transformer = pytest.importorskip("mmada_jax.model.transformer")
  params, cfg = hf.load_hf_checkpoint(str(tiny_mmada_dir), dtype="float32")
  return transformer, params, cfg


def _batch(c, chat: bool) -> dict:
  sfx = "_chat" if chat else ""
  batch = {"input_ids": c["in/input_ids" + sfx], "labels": c["in/labels" + sfx],
           "p_mask_lm": c["in/p_mask_lm_chat" if chat else "in/p_mask_lm"], "p_mask_mmu": c["in/p_mask_mmu"],
           "answer_lengths": c["in/answer_lengths"]}
  if chat:
    batch["answer_lengths_lm"] = c["in/answer_lengths_lm"]
  return batch


@pytest.mark.parametrize("chat", [False, True])
def test_losses_match_fixture(losses_case, tiny_model, chat):
  transformer, params, cfg = tiny_model
  c = losses_case
  sizes = tuple(int(x) for x in c["in/batch_sizes"])
  batch = _batch(c, chat)
  b, length = batch["input_ids"].shape
  masks = np.concatenate([c["in/t2i_masks"], np.ones((b - sizes[0], length), np.int64)])
  bias = training_attention_bias(masks, sizes[0], mode="original_additive")
  logits = transformer.forward(params, cfg, jnp.asarray(batch["input_ids"]), attention_bias=bias)
  if not chat:
    np.testing.assert_allclose(jax.nn.logsumexp(logits, -1), c["out/logits.logsumexp"], rtol=RTOL, atol=RTOL)
  total, parts = mixed_loss(logits, batch, batch_sizes=sizes, max_text_len=int(c["in/max_seq_length"]),
                            mask_id=SP.mask, coeffs=LossCoefficients(1.0, 0.4, 0.5))
  pre, lm_key = ("chat.", "loss_lm_chat") if chat else ("", "loss_lm")
  expected = {"loss_t2i": c[f"out/{pre}loss_t2i"], "loss_lm": c[f"out/{pre}{lm_key}"],
              "loss_mmu": c[f"out/{pre}loss_mmu"]}
  for k, want in expected.items():
    np.testing.assert_allclose(parts[k], want, rtol=RTOL, err_msg=k)
  np.testing.assert_allclose(parts["loss_t2i"], c["out/forward_t2i_loss"], rtol=RTOL)
  np.testing.assert_allclose(total, expected["loss_t2i"] + 0.4 * expected["loss_lm"] + 0.5 * expected["loss_mmu"],
                             rtol=RTOL)


def test_hard_bias_changes_only_t2i_rows(losses_case, tiny_model):
  transformer, params, cfg = tiny_model
  c = losses_case
  batch = _batch(c, False)
  b, length = batch["input_ids"].shape
  masks = np.concatenate([c["in/t2i_masks"], np.ones((b - 2, length), np.int64)])
  ids = jnp.asarray(batch["input_ids"])
  def run(mode):
    return transformer.forward(params, cfg, ids, attention_bias=training_attention_bias(masks, 2, mode=mode))

  hard, soft = run("hard"), run("original_additive")
  assert np.isfinite(np.asarray(hard)).all()
  np.testing.assert_allclose(hard[2:], soft[2:], rtol=1e-5, atol=1e-5)  # +1 everywhere = no bias
  assert not np.allclose(hard[:2, -17:], soft[:2, -17:], atol=1e-3)


# fused LM head + cross-entropy ---------------------------------------------------------------

def _fused_case(b=4, length=13, d=16, v=96):
  k = jax.random.split(jax.random.key(5), 4)
  h = jax.random.normal(k[0], (b, length, d), jnp.float32)
  w = jax.random.normal(k[1], (d, v), jnp.float32) / 4.0
  lab = jax.random.randint(k[2], (b, length), 0, v).at[0, 3].set(IGNORE_ID).at[1, :5].set(IGNORE_ID)
  g = jax.random.uniform(k[3], (b, length), jnp.float32, 0.0, 3.0)   # arbitrary per-position weights
  return h, w, lab, g


def _full_ce(h, w, lab, lo=0, hi=None):
  logits = jnp.einsum("bld,dv->blv", h, w[:, lo:hi], preferred_element_type=jnp.float32)
  return token_cross_entropy(logits, jnp.where(lab == IGNORE_ID, IGNORE_ID, lab - lo))


def _loss_and_grads(ce_fn, h, w, g):
  return jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(g * ce_fn(h, w)), argnums=(0, 1)))(h, w)


@pytest.mark.parametrize("chunk,lo,hi", [(4, 0, None), (13, 0, None), (5, 32, 96), (64, 40, 80)])
def test_fused_cross_entropy_equals_full_logits(chunk, lo, hi):
  from mmada_jax.model.lm_head import fused_cross_entropy, unrolled_chunks
  h, w, lab, g = _fused_case()
  if lo:   # a vocabulary slice: targets inside it (token ids), as UniGRPO's t2i codebook
    lab = jnp.where(lab == IGNORE_ID, IGNORE_ID, lo + lab % ((hi or w.shape[1]) - lo))
  fused = lambda h, w: fused_cross_entropy(h, w, lab, chunk=chunk, vocab_start=lo, vocab_end=hi)
  np.testing.assert_allclose(fused(h, w), _full_ce(h, w, lab, lo, hi), rtol=1e-5, atol=1e-6)
  (l_ref, g_ref), (l_got, g_got) = (_loss_and_grads(lambda h, w: _full_ce(h, w, lab, lo, hi), h, w, g),
                                    _loss_and_grads(fused, h, w, g))
  np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(g_got[0])[0, 3]) and not np.any(np.asarray(g_got[0])[1, :5])  # ignored rows
  assert fused(h, w)[1, :5].tolist() == [0.0] * 5
  with unrolled_chunks():   # the AOT cost twins' trace: same values
    np.testing.assert_allclose(_loss_and_grads(fused, h, w, g)[1][1], g_got[1], rtol=1e-6, atol=1e-7)


def test_fused_cross_entropy_bf16_compute_and_out_of_range():
  from mmada_jax.model.lm_head import fused_cross_entropy
  h, w, lab, g = _fused_case()
  ref = _full_ce(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), lab)
  got = fused_cross_entropy(h, w, lab, chunk=4, dtype="bfloat16")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  dw = jax.grad(lambda w: jnp.sum(g * fused_cross_entropy(h, w, lab, chunk=4, dtype="bfloat16")))(w)
  dw_ref = jax.grad(lambda w: jnp.sum(g * _full_ce(h, w, lab)))(w)
  assert dw.dtype == jnp.float32
  np.testing.assert_allclose(dw, dw_ref, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(dw_ref))))
  bad = fused_cross_entropy(h, w, lab.at[2, 0].set(5), chunk=4, vocab_start=10)
  assert np.isnan(float(bad[2, 0]))


def test_fused_cross_entropy_sharded_fsdp_tensor():
  """8 simulated devices, fsdp=4 × tensor=2: value and gradients equal the unsharded full logits."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mmada_jax.model.lm_head import fused_cross_entropy
  from mmada_jax.sharding import make_mesh
  h, w, lab, g = _fused_case(b=8, length=12)
  (l_ref, g_ref) = _loss_and_grads(lambda h, w: _full_ce(h, w, lab), h, w, g)
  mesh = make_mesh("fsdp=4,tensor=2")
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, P("fsdp", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
    l_sh, g_sh = _loss_and_grads(lambda h, w: fused_cross_entropy(h, w, lab, chunk=5), hs, ws, g)
  np.testing.assert_allclose(l_sh, l_ref, rtol=1e-5)
  for a, r in zip(g_sh, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


def _shapes_in(jaxpr) -> list[tuple[tuple[int, ...], str]]:
  """(shape, dtype) of every variable of ``jaxpr`` and of its sub-jaxprs (scan bodies, …)."""
  out = []
  for eqn in jaxpr.eqns:
    for v in (*eqn.invars, *eqn.outvars):
      aval = getattr(v, "aval", None)
      if hasattr(aval, "shape"):
        out.append((tuple(aval.shape), str(aval.dtype)))
    for p in eqn.params.values():
      for item in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          out.extend(_shapes_in(inner))
  return out


def _has_token_by_vocab_f32(fn, *args, tokens: int, vocab: int) -> bool:
  """Whether the jaxpr of ``fn(*args)`` holds a float32 array of >= ``tokens`` rows × ``vocab``."""
  shapes = _shapes_in(jax.make_jaxpr(fn)(*args).jaxpr)
  return any(dt == "float32" and len(s) >= 2 and s[-1] == vocab and math.prod(s[:-1]) >= tokens
             for s, dt in shapes)


def test_fused_cross_entropy_never_holds_token_by_vocab_logits():
  from mmada_jax.model.lm_head import fused_cross_entropy
  h, w, lab, g = _fused_case(b=2, length=40, v=96)
  grad = lambda ce_fn: jax.value_and_grad(lambda h, w: jnp.sum(g * ce_fn(h, w)), argnums=(0, 1))
  full = grad(lambda h, w: _full_ce(h, w, lab))
  fused = grad(lambda h, w: fused_cross_entropy(h, w, lab, chunk=8))
  assert _has_token_by_vocab_f32(full, h, w, tokens=2 * 40, vocab=96)        # the check can fail
  assert not _has_token_by_vocab_f32(fused, h, w, tokens=2 * 40, vocab=96)
  assert _has_token_by_vocab_f32(fused, h, w, tokens=2 * 8, vocab=96)        # one chunk's logits

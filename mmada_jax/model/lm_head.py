"""Fused LM head + cross-entropy: per-position CE over the vocabulary without [tokens, V] logits.

:func:`fused_cross_entropy` applies the LM head to ``chunk`` positions at a time inside a
``lax.scan``, with a ``jax.custom_vjp``:

* forward: per chunk, float32 logits -> logsumexp and the target logit -> CE; the residuals are
  the hidden states, the head weights, the labels and the per-position logsumexp [B, L];
* backward: per chunk, the logits are recomputed, ``(softmax - onehot) * g`` (g: the incoming
  per-position cotangent [B, L], so any per-position weighting by the caller is exact) gives
  dh [B, c, d] and a float32 dW [d, V'] accumulated over the chunks.

Only one chunk's float32 logits [B, c, V'] is ever live. Matmuls run in the compute dtype with
float32 accumulation (``preferred_element_type``); dW is summed in float32.

XLA's cost analysis counts a loop body once; :func:`unrolled_chunks` makes the chunk loops fully
unrolled while tracing (the AOT cost twins use it so that every chunk's FLOPs are counted).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp

from mmada_jax.prompting.special_tokens import IGNORE_ID
from mmada_jax.sharding.context import constrain

_UNROLL = contextvars.ContextVar("mmada_jax_lm_head_unroll", default=False)


@contextlib.contextmanager
def unrolled_chunks() -> Iterator[None]:
  """While active, :func:`fused_cross_entropy` traces its chunk loops fully unrolled (same values)."""
  tok = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(tok)


def _chunk_layout(length: int, chunk: int) -> tuple[int, int]:
  """(number of chunks n, chunk size c) with n·c >= length and chunks as even as possible."""
  n = max(1, math.ceil(length / max(1, int(chunk))))
  return n, math.ceil(length / n)


def _to_chunks(x: jax.Array, n: int, c: int) -> jax.Array:
  """[B, n·c, ...] -> [n, B, c, ...]."""
  b = x.shape[0]
  return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)


def _from_chunks(x: jax.Array) -> jax.Array:
  """[n, B, c, ...] -> [B, n·c, ...]."""
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_logits(h: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """float32 [B, c, V'] = h [B, c, d] @ w [d, V'] in ``dtype`` with float32 accumulation."""
  lg = jnp.einsum("bcd,dv->bcv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return constrain(lg, ("batch", "length", "act_vocab"))


def _local_labels(labels: jax.Array, vocab_start: int, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(column index int32 (0 where unused), valid = label != IGNORE_ID, in_range) of token ids."""
  valid = labels != IGNORE_ID
  local = labels.astype(jnp.int32) - vocab_start
  in_range = (local >= 0) & (local < width)
  return jnp.where(valid & in_range, local, 0), valid, in_range


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_ce(hidden: jax.Array, w: jax.Array, labels: jax.Array, chunk: int, vocab_start: int,
              dtype: str) -> jax.Array:
  return _fused_fwd(hidden, w, labels, chunk, vocab_start, dtype)[0]


def _fused_fwd(hidden, w, labels, chunk, vocab_start, dtype):
  b, length, _ = hidden.shape
  n, c = _chunk_layout(length, chunk)
  pad = n * c - length
  hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  lp = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_ID)
  cdt = jnp.dtype(dtype)

  def body(_, xs):
    h, lab = xs
    logits = _chunk_logits(h, w, cdt)
    local, valid, in_range = _local_labels(lab, vocab_start, w.shape[1])
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]
    ce = jnp.where(in_range, lse - picked, jnp.nan)
    return None, (jnp.where(valid, ce, 0.0), lse)

  _, (ce, lse) = jax.lax.scan(body, None, (_to_chunks(hp, n, c), _to_chunks(lp, n, c)),
                              unroll=n if _UNROLL.get() else 1)
  ce, lse = _from_chunks(ce)[:, :length], _from_chunks(lse)[:, :length]
  return ce, (hidden, w, labels, lse)


def _fused_bwd(chunk, vocab_start, dtype, res, g):
  hidden, w, labels, lse = res
  b, length, d = hidden.shape
  n, c = _chunk_layout(length, chunk)
  pad = n * c - length
  cdt = jnp.dtype(dtype)
  local, valid, in_range = _local_labels(labels, vocab_start, w.shape[1])
  scale = jnp.where(valid & in_range, g.astype(jnp.float32), 0.0)   # ignored rows: 0 grad

  def chunks(x, fill=0):
    return _to_chunks(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill), n, c)

  def body(dw, xs):
    h, loc, ls, sc = xs
    logits = _chunk_logits(h, w, cdt)
    p = jnp.exp(logits - ls[..., None])
    onehot = jnp.arange(w.shape[1], dtype=jnp.int32) == loc[..., None]
    dl = jnp.where(sc[..., None] != 0, (p - onehot.astype(jnp.float32)) * sc[..., None], 0.0).astype(cdt)
    dl = constrain(dl, ("batch", "length", "act_vocab"))
    dh = jnp.einsum("bcv,dv->bcd", dl, w.astype(cdt), preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("bcd,bcv->dv", h.astype(cdt), dl, preferred_element_type=jnp.float32)
    return constrain(dw, ("embed", "vocab")), dh   # laid out as the head, not replicated

  dw0 = jnp.zeros(w.shape, jnp.float32)
  dw, dh = jax.lax.scan(body, dw0, (chunks(hidden), chunks(local), chunks(lse), chunks(scale)),
                        unroll=n if _UNROLL.get() else 1)
  dh = _from_chunks(dh)[:, :length].astype(hidden.dtype)
  return dh, dw.astype(w.dtype), None


_fused_ce.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, chunk: int,
                        vocab_start: int = 0, vocab_end: int | None = None,
                        dtype: str | jnp.dtype = jnp.float32) -> jax.Array:
  """Per-position CE float32 [B, L] of the LM head ``head`` [d, V] on hidden states [B, L, d].

  Equal to ``token_cross_entropy(hidden @ head[:, vocab_start:vocab_end], labels - vocab_start)``
  (logits in ``dtype`` with float32 accumulation), computed ``chunk`` positions at a time in
  forward and backward (module docstring). ``labels`` int [B, L] are token ids: IGNORE_ID gives
  0 loss and 0 gradient; an id outside ``[vocab_start, vocab_end)`` gives NaN. Differentiable in
  ``hidden`` and ``head`` for any cotangent on the per-position CE.
  """
  if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
    raise ValueError(f"hidden must be [B, L, d] and labels [B, L]; got {hidden.shape}, {labels.shape}")
  w = head[:, vocab_start:vocab_end]
  return _fused_ce(hidden, w, jnp.asarray(labels, jnp.int32), int(chunk), int(vocab_start),
                   jnp.dtype(dtype).name)

"""Pure building blocks of the LLaDA transformer.

Shape legend: b batch, l query length, m key length, d d_model, n query heads, k kv heads,
g = n // k query heads per kv head, h head_dim, f mlp hidden, v vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float(jnp.finfo(jnp.float32).min)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back to x's dtype, then scaled by ``weight``."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * weight.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [b or 1, l, 1, h] in float32 for absolute integer ``positions`` [b|1, l]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [b, l, h/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]        # [b, l, 1, h]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Split-halves (NeoX) rotation in float32: x·cos + rotate_half(x)·sin; x is [b, l, heads, h]."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def attention_masks(attention_mask: jax.Array | None, attention_bias: jax.Array | None,
                    q_len: int, k_len: int) -> tuple[jax.Array | None, jax.Array | None]:
  """Turns the public mask arguments into (additive float32 bias, boolean allow-mask).

  ``attention_mask`` [b, l] (1 token, 0 padding) gives the hard key-and-query padding mask
  m[:, :, None] & m[:, None, :]; a bool ``attention_bias`` [b, 1, l, m] is an allow-mask; a float
  one is added to the scores as is. Either result is broadcastable to [b, 1, l, m] or None.
  """
  add, allow = None, None
  if attention_mask is not None:
    m = attention_mask.astype(bool)
    if m.shape[-1] != k_len or q_len != k_len:
      raise ValueError(f"attention_mask covers {m.shape[-1]} tokens; the query has {q_len} and "
                       f"the keys {k_len}: pass attention_bias [B, 1, {q_len}, {k_len}] instead")
    allow = (m[:, :, None] & m[:, None, :])[:, None]
  if attention_bias is not None:
    if attention_bias.shape[-2:] != (q_len, k_len) and attention_bias.shape[-2] != 1:
      raise ValueError(f"attention_bias has shape {attention_bias.shape}; expected [B, 1, {q_len}, {k_len}]")
    if attention_bias.dtype == jnp.bool_:
      allow = attention_bias if allow is None else (allow & attention_bias)
    else:
      # -inf entries would give NaN on fully masked rows; clamp to the most negative finite value.
      add = jnp.maximum(attention_bias.astype(jnp.float32), NEG_INF)
  return add, allow


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, add: jax.Array | None,
                          allow: jax.Array | None, impl: str = "xla") -> jax.Array:
  """Bidirectional grouped-query attention; q [b,l,n,h], k/v [b,m,k,h] -> [b,l,n,h].

  Softmax in float32 with scale 1/sqrt(h). Disallowed entries are set to the most negative
  finite float, so a row with every key disallowed (a padding query) gets a uniform softmax
  rather than NaN, exactly as the original.
  """
  b, l, n, h = q.shape
  kv = k.shape[2]
  if impl == "cudnn":
    bias = add
    if allow is not None:
      neg = jnp.where(allow, 0.0, NEG_INF)
      bias = neg if bias is None else jnp.maximum(bias + neg, NEG_INF)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype))
  g = n // kv
  qg = q.reshape(b, l, kv, g, h)
  scores = jnp.einsum("blkgh,bmkh->bkglm", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(h)))
  if add is not None:
    scores = jnp.maximum(scores + add[:, :, None], NEG_INF)   # add: [b,1,l,m] -> [b,1,1,l,m]
  if allow is not None:
    scores = jnp.where(allow[:, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkglm,bmkh->blkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, l, n, h).astype(q.dtype)

"""Pure building blocks of the LLaDA transformer.

Shape legend: b batch, l query length, m key length, d d_model, n query heads, k kv heads,
g = n // k query heads per kv head, h head_dim, f mlp hidden, v vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The attention seam (masks and the xla / splash / cudnn implementations) lives in attention.py.
from mmada_jax.model.attention import (NEG_INF, Allow, attention_masks,  # noqa: F401
                                       dot_product_attention)


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

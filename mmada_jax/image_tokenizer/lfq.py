"""Lookup-free quantisation (LFQ) of MAGVIT-v2: pure jnp functions, channels last.

A latent z [..., K] is quantised per channel to z_q = +1 where z > 0 and −1 where z ≤ 0. The code of a
position is Σ_c 2^(K−1−c)·[z_c > 0] (channel 0 is the most significant bit); the implicit codebook row
of code i is its K bits, MSB first, mapped {0,1} → {−1,+1}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def quantize(z: jax.Array) -> jax.Array:
  """z [..., K] → ±1 of z's dtype (z ≤ 0 → −1)."""
  return jnp.where(z > 0, 1, -1).astype(z.dtype)


def straight_through(z: jax.Array) -> jax.Array:
  """Quantised values in the forward pass, identity gradient: z + stop_gradient(z_q − z)."""
  return z + jax.lax.stop_gradient(quantize(z) - z)


def _power_vals(k: int) -> jax.Array:
  return jnp.left_shift(jnp.int32(1), jnp.arange(k - 1, -1, -1, dtype=jnp.int32))


def latent_to_indices(z: jax.Array) -> jax.Array:
  """z [..., K] → codes int32 [...] in [0, 2^K)."""
  bits = (z > 0).astype(jnp.int32)
  return jnp.sum(bits * _power_vals(z.shape[-1]), axis=-1, dtype=jnp.int32)


def flatten_codes(indices: jax.Array) -> jax.Array:
  """indices [B, h, w] → [B, h·w], row-major over (h, w) as the original's ``reshape(B, -1)``."""
  return indices.reshape(indices.shape[0], -1)


def code_to_bits(codes: jax.Array, k: int, dtype=jnp.float32) -> jax.Array:
  """codes int [...] → codebook entries [..., k] in {−1, +1} (MSB first)."""
  bits = jnp.right_shift(codes.astype(jnp.int32)[..., None], jnp.arange(k - 1, -1, -1, dtype=jnp.int32)) & 1
  return (bits * 2 - 1).astype(dtype)


def codes_to_latent(codes: jax.Array, k: int, grid: tuple[int, int]) -> jax.Array:
  """codes [B, h·w] → quantised latent [B, h, w, k] float32 (the original's ``get_codebook_entry``)."""
  h, w = grid
  return code_to_bits(codes, k).reshape(codes.shape[0], h, w, k)


def codebook(k: int) -> np.ndarray:
  """The original's ``quantize.embedding`` buffer: float32 [2^k, k] of ±1 bit patterns (MSB first)."""
  idx = np.arange(2 ** k, dtype=np.int64)[:, None]
  return (((idx >> np.arange(k - 1, -1, -1, dtype=np.int64)) & 1) * 2 - 1).astype(np.float32)


def power_vals(k: int) -> np.ndarray:
  """The original's ``quantize.power_vals`` buffer: int64 [k] = 2^(k−1) … 2^0."""
  return (2 ** np.arange(k - 1, -1, -1, dtype=np.int64)).astype(np.int64)


def _categorical_entropy_from_logits(logits: jax.Array) -> jax.Array:
  """torch ``Categorical(logits=...).entropy()``: −Σ p·log p over the last axis."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  p = jax.nn.softmax(logits, axis=-1)
  return -jnp.sum(jnp.maximum(logp, jnp.finfo(logp.dtype).min) * p, axis=-1)


def _categorical_entropy_from_probs(probs: jax.Array) -> jax.Array:
  """torch ``Categorical(probs=...).entropy()`` (probs renormalised, log of probs clamped to [eps, 1−eps])."""
  probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  eps = jnp.finfo(probs.dtype).eps
  logp = jnp.log(jnp.clip(probs, eps, 1 - eps))
  return -jnp.sum(jnp.maximum(logp, jnp.finfo(logp.dtype).min) * probs, axis=-1)


def lfq_losses(z: jax.Array, beta: float = 0.25, entropy_multiplier: float = 0.1,
               commit_loss_multiplier: float = 0.1) -> dict[str, jax.Array]:
  """The original ``LFQuantizer`` training losses of a latent z [..., K] (float32 scalars).

  * ``quantizer_loss`` = commit_loss_multiplier · (mean((sg(z_q) − z)²) + β·mean((z_q − sg(z))²)), where
    z_q = z + sg(sign(z) − z), so both terms carry gradient to z (net pull (1−β) towards ±1).
  * ``entropy_loss`` = entropy_multiplier · (H_sample − H_codebook). Each channel is a 2-way
    categorical with logits (−(z−1)², −(z+1)²) (i.e. p(+1) = σ(4z)); H_sample is its entropy averaged
    over all positions and channels, H_codebook the entropy of the position-averaged probabilities,
    averaged over channels. Minimising it makes each bit confident and the bits balanced over the batch.
  """
  z = z.astype(jnp.float32)
  k = z.shape[-1]
  zf = z.reshape(-1, k)
  z_q = straight_through(zf)
  commit = (jnp.mean((jax.lax.stop_gradient(z_q) - zf) ** 2)
            + beta * jnp.mean((z_q - jax.lax.stop_gradient(zf)) ** 2))
  logits = jnp.stack([-(zf - 1.0) ** 2, -(zf + 1.0) ** 2], axis=-1)  # [N, K, 2]
  entropy = jnp.mean(_categorical_entropy_from_logits(logits))
  mean_prob = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)  # [K, 2]
  mean_entropy = jnp.mean(_categorical_entropy_from_probs(mean_prob))
  return {"quantizer_loss": commit * commit_loss_multiplier,
          "entropy_loss": (entropy - mean_entropy) * entropy_multiplier}


def lfq_forward(z: jax.Array, beta: float = 0.25, entropy_multiplier: float = 0.1,
                commit_loss_multiplier: float = 0.1) -> dict[str, jax.Array]:
  """The original ``LFQuantizer.forward`` on z [..., K]: straight-through ``z_q`` [..., K], ``indices``
  int32 [...], and the two weighted losses of ``lfq_losses``."""
  out = lfq_losses(z, beta, entropy_multiplier, commit_loss_multiplier)
  out["z_q"] = straight_through(z)
  out["indices"] = latent_to_indices(z)
  return out

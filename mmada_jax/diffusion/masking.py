"""Forward (noising) processes of MMaDA training, pure jnp with explicit PRNG keys.

* Image tokens (``training/utils.py::mask_or_random_replace_tokens``): per row t ~ U(0,1),
  mask_prob = max(γ(t), min_masking_rate), exactly ``max(1, round(N·mask_prob))`` positions
  masked, chosen as ``argsort(U(0,1)^N) < n`` (a uniform random subset).
* Text (LLaDA, ``prepare_inputs_and_labels_for_text/_chat_text/_mmu``): per row t ~ U(0,1),
  p = (1-ε)t + ε, each position masked where u < p, prompt positions restored.

Every random input can instead be given (``t``, ``noise``/``u`` or the mask itself) so recorded
draws replay exactly. Shapes are static; all functions jit (pass ``schedule`` as a callable or
mark it static).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmada_jax.diffusion.schedules import Schedule, get_schedule
from mmada_jax.prompting.special_tokens import IGNORE_ID

TEXT_EPS = 1e-3
"""ε of the LLaDA text noising: p = (1-ε)t + ε."""


class ImageMasking(NamedTuple):
  """Result of :func:`mask_image_tokens`."""

  input_ids: jax.Array  # [B, N] int32: MASK where masked, the image id elsewhere
  labels: jax.Array  # [B, N] int32: the true id where masked, -100 elsewhere
  mask: jax.Array  # [B, N] bool: True = masked
  mask_prob: jax.Array  # [B] float32: clipped γ(t) (the mask's mean when only the mask is given)


class TextMasking(NamedTuple):
  """Result of :func:`mask_text_tokens`."""

  input_ids: jax.Array  # [B, L] int32: noisy ids
  masked: jax.Array  # [B, L] bool: noisy == MASK (the positions that enter the loss)
  p_mask: jax.Array  # [B, L] float32: per-row masking probability p, repeated along L
  answer_lengths: jax.Array  # [B] int32: #(prompt_mask == 0) (L without a prompt mask)


def image_mask_count(mask_prob: jax.Array, num_tokens: int) -> jax.Array:
  """n_mask = max(1, round(N · mask_prob)) (round half to even, as torch), [B] int32."""
  n = jnp.round(jnp.float32(num_tokens) * mask_prob.astype(jnp.float32))
  return jnp.maximum(n, 1.0).astype(jnp.int32)


def mask_image_tokens(key: jax.Array | None, image_ids: jax.Array, *, mask_id: int,
                      schedule: str | Schedule = "cosine", min_masking_rate: float = 0.0,
                      t: jax.Array | None = None, noise: jax.Array | None = None,
                      token_mask: jax.Array | None = None) -> ImageMasking:
  """MaskGIT-style masking of image token ids [B, N].

  Args:
    key: PRNG key for the draws that are not given (may be None when none is needed).
    image_ids: [B, N] int, image token ids (codes + image offset).
    mask_id: the MASK token id.
    schedule: schedule name or γ callable; ``min_masking_rate`` clips γ(t) from below.
    t: [B] float32 times in [0, 1) (drawn U(0,1) when None).
    noise: [B, N] float32 uniforms whose argsort ranks the positions (drawn when None).
    token_mask: [B, N] bool, the masked positions themselves; skips both draws (mask_prob is then
      γ(t) when ``t`` is given, else the mask's mean).
  """
  image_ids = jnp.asarray(image_ids).astype(jnp.int32)
  b, n = image_ids.shape
  gamma = get_schedule(schedule) if isinstance(schedule, str) else schedule
  k_t = k_noise = None
  if key is not None:
    k_t, k_noise = jax.random.split(key)
  if t is None and token_mask is None:
    t = jax.random.uniform(_need(k_t, "t"), (b,), jnp.float32)
  mask_prob = None
  if t is not None:
    mask_prob = jnp.maximum(gamma(jnp.asarray(t, jnp.float32)), jnp.float32(min_masking_rate))
  if token_mask is None:
    if noise is None:
      noise = jax.random.uniform(_need(k_noise, "noise"), (b, n), jnp.float32)
    ranks = jnp.argsort(jnp.asarray(noise), axis=-1)
    mask = ranks < image_mask_count(mask_prob, n)[:, None]
  else:
    mask = jnp.asarray(token_mask).astype(bool)
    if mask_prob is None:
      mask_prob = mask.mean(axis=-1, dtype=jnp.float32)
  return ImageMasking(
      input_ids=jnp.where(mask, jnp.int32(mask_id), image_ids),
      labels=jnp.where(mask, image_ids, jnp.int32(IGNORE_ID)),
      mask=mask,
      mask_prob=mask_prob.astype(jnp.float32),
  )


def text_mask_prob(t: jax.Array, eps: float = TEXT_EPS) -> jax.Array:
  """p = (1-ε) t + ε in float32 (same shape as t)."""
  return (1 - eps) * jnp.asarray(t, jnp.float32) + eps


def mask_text_tokens(key: jax.Array | None, input_ids: jax.Array, *, mask_id: int,
                     prompt_mask: jax.Array | None = None, eps: float = TEXT_EPS,
                     t: jax.Array | None = None, u: jax.Array | None = None,
                     token_mask: jax.Array | None = None) -> TextMasking:
  """LLaDA text masking of [B, L] ids (lm: no prompt_mask; lm_chat / mmu: with prompt_mask).

  Args:
    key: PRNG key for the draws that are not given (may be None when none is needed).
    input_ids: [B, L] int clean ids.
    mask_id: the MASK token id.
    prompt_mask: [B, L] 0/1, positions restored to the clean id after masking (never noised).
    eps: ε of p = (1-ε)t + ε.
    t: [B] float32 times (drawn U(0,1) when None). Required with ``token_mask``.
    u: [B, L] float32 uniforms; masked where u < p (drawn when None).
    token_mask: [B, L] bool, the pre-prompt-restore mask itself instead of ``u < p``.
  Returns: as the original, ``masked`` is ``noisy == mask_id`` after the prompt restore.
  """
  input_ids = jnp.asarray(input_ids).astype(jnp.int32)
  b, length = input_ids.shape
  k_t = k_u = None
  if key is not None:
    k_t, k_u = jax.random.split(key)
  if t is None:
    if token_mask is not None:
      raise ValueError("mask_text_tokens: token_mask needs the matching t (for p_mask)")
    t = jax.random.uniform(_need(k_t, "t"), (b,), jnp.float32)
  p = text_mask_prob(t, eps)
  p_mask = jnp.broadcast_to(p[:, None], (b, length))
  if token_mask is None:
    if u is None:
      u = jax.random.uniform(_need(k_u, "u"), (b, length), jnp.float32)
    token_mask = jnp.asarray(u) < p_mask
  noisy = jnp.where(jnp.asarray(token_mask).astype(bool), jnp.int32(mask_id), input_ids)
  if prompt_mask is None:
    answer_lengths = jnp.full((b,), length, jnp.int32)
  else:
    prompt = jnp.asarray(prompt_mask).astype(bool)
    noisy = jnp.where(prompt, input_ids, noisy)
    answer_lengths = jnp.sum(~prompt, axis=-1, dtype=jnp.int32)
  return TextMasking(input_ids=noisy, masked=noisy == mask_id, p_mask=p_mask, answer_lengths=answer_lengths)


def _need(key: jax.Array | None, what: str) -> jax.Array:
  if key is None:
    raise ValueError(f"a PRNG key is needed to draw {what!r} (or pass it explicitly)")
  return key

"""Mask schedules γ(t): fraction of image tokens masked at time t ∈ [0, 1] (``models/sampling.py``).

All are pure jnp, elementwise, float32 in -> float32 out, and jit-friendly.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array], jax.Array]


def cosine_schedule(t: jax.Array) -> jax.Array:
  """cos(π t / 2) (MaskGIT; the schedule of every released config)."""
  return jnp.cos(jnp.asarray(t) * math.pi * 0.5)


def linear_schedule(t: jax.Array) -> jax.Array:
  """1 - t, clipped to [1e-6, 1]."""
  return jnp.clip(1 - jnp.asarray(t), 1e-6, 1.0)


def pow_schedule(t: jax.Array, exponent: float) -> jax.Array:
  """1 - t**exponent, clipped to [1e-6, 1] (``pow{k}``)."""
  return jnp.clip(1.0 - jnp.asarray(t) ** exponent, 1e-6, 1.0)


def sigmoid_schedule(t: jax.Array, start: float = -3, end: float = 3, tau: float = 1.0,
                     clip_min: float = 1e-6) -> jax.Array:
  """(σ(end/τ) - σ((t(end-start)+start)/τ)) / (σ(end/τ) - σ(start/τ)), clipped to [clip_min, 1]."""
  v_start = jax.nn.sigmoid(jnp.float32(start / tau))
  v_end = jax.nn.sigmoid(jnp.float32(end / tau))
  out = jax.nn.sigmoid((jnp.asarray(t) * (end - start) + start) / tau)
  return jnp.clip((v_end - out) / (v_end - v_start), clip_min, 1.0)


def get_schedule(name: str, **kwargs) -> Schedule:
  """``cosine`` | ``linear`` | ``pow{k}`` (e.g. ``pow2``) | ``sigmoid`` (kwargs: start, end, tau,
  clip_min) -> γ. Raises ValueError for an unknown name."""
  if name == "cosine":
    return cosine_schedule
  if name == "linear":
    return linear_schedule
  if name.startswith("pow"):
    try:
      exponent = float(name[3:])
    except ValueError:
      raise ValueError(f"bad pow schedule {name!r}; expected e.g. 'pow2' or 'pow0.5'") from None
    return functools.partial(pow_schedule, exponent=exponent)
  if name == "sigmoid":
    return functools.partial(sigmoid_schedule, **kwargs)
  raise ValueError(f"unknown mask schedule {name!r}; expected cosine, linear, pow<k> or sigmoid")

"""Mask schedules γ(t): fraction of image tokens masked at time t ∈ [0, 1] (``models/sampling.py``).

The one definition of the schedule family (``cosine``, ``linear``, ``pow<k>``, ``sigmoid``), in
two evaluation modes chosen by ``xp``:

* ``xp=jnp`` (default): traced, elementwise, the dtype of ``t`` (Python constants are weak), jit-
  friendly: training-time noising (:mod:`mmada_jax.diffusion.masking`);
* ``xp=np``: host numpy float32 with float32 constants, matching the original's torch float32
  ``cos``/``sigmoid``/``pow`` on a 0-d tensor: the MaskGIT sampler's static per-step tables
  (:mod:`mmada_jax.sampling.schedules`). ``γ(2/3)`` for cosine is 0.49999997 there, so
  ``16·γ`` floors to 7, not 8: a float64 (or different) evaluation changes the re-mask counts.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.Array], jax.Array]
_F32 = np.float32


def _np_sigmoid32(x: Any) -> np.ndarray:
  x = np.asarray(x, _F32)
  return (_F32(1.0) / (_F32(1.0) + np.exp(-x))).astype(_F32)


@dataclasses.dataclass(frozen=True)
class _Ops:
  """How one evaluation mode spells the schedules' arithmetic."""
  xp: Any
  asarray: Callable[[Any], Any]
  weak: Callable[[float], Any]    # a constant that takes the dtype of t (jnp: Python float)
  f32: Callable[[float], Any]     # a float32 constant
  sigmoid: Callable[[Any], Any]
  out: Callable[[Any], Any]


_JNP = _Ops(jnp, jnp.asarray, float, jnp.float32, jax.nn.sigmoid, lambda x: x)
_NP = _Ops(np, np.asarray, _F32, _F32, _np_sigmoid32, lambda x: np.asarray(x).astype(_F32))


def _ops(xp: Any) -> _Ops:
  if xp is jnp:
    return _JNP
  if xp is np:
    return _NP
  raise ValueError(f"mask schedules evaluate with xp=jax.numpy or xp=numpy, got {xp!r}")


def cosine_schedule(t: jax.Array, xp: Any = jnp) -> jax.Array:
  """cos(π t / 2) (MaskGIT; the schedule of every released config)."""
  o = _ops(xp)
  return o.out(o.xp.cos(o.asarray(t) * o.weak(math.pi) * o.weak(0.5)))


def linear_schedule(t: jax.Array, xp: Any = jnp) -> jax.Array:
  """1 - t, clipped to [1e-6, 1]."""
  o = _ops(xp)
  return o.out(o.xp.clip(o.weak(1.0) - o.asarray(t), o.weak(1e-6), o.weak(1.0)))


def pow_schedule(t: jax.Array, exponent: float, xp: Any = jnp) -> jax.Array:
  """1 - t**exponent, clipped to [1e-6, 1] (``pow{k}``)."""
  o = _ops(xp)
  return o.out(o.xp.clip(o.weak(1.0) - o.asarray(t) ** o.weak(exponent), o.weak(1e-6), o.weak(1.0)))


def sigmoid_schedule(t: jax.Array, start: float = -3, end: float = 3, tau: float = 1.0,
                     clip_min: float = 1e-6, xp: Any = jnp) -> jax.Array:
  """(σ(end/τ) - σ((t(end-start)+start)/τ)) / (σ(end/τ) - σ(start/τ)), clipped to [clip_min, 1]."""
  o = _ops(xp)
  v_start = o.sigmoid(o.f32(start / tau))
  v_end = o.sigmoid(o.f32(end / tau))
  out = o.sigmoid((o.asarray(t) * o.weak(end - start) + o.weak(start)) / o.weak(tau))
  return o.out(o.xp.clip((v_end - out) / (v_end - v_start), o.weak(clip_min), o.weak(1.0)))


def get_schedule(name: str, xp: Any = jnp, **kwargs) -> Schedule:
  """``cosine`` | ``linear`` | ``pow{k}`` (e.g. ``pow2``) | ``sigmoid`` (kwargs: start, end, tau,
  clip_min) -> γ evaluated with ``xp`` (module docstring). Raises ValueError for an unknown name."""
  _ops(xp)
  if name == "cosine":
    return functools.partial(cosine_schedule, xp=xp)
  if name == "linear":
    return functools.partial(linear_schedule, xp=xp)
  if name.startswith("pow"):
    try:
      exponent = float(name[3:])
    except ValueError:
      raise ValueError(f"bad pow schedule {name!r}; expected e.g. 'pow2' or 'pow0.5'") from None
    return functools.partial(pow_schedule, exponent=exponent, xp=xp)
  if name == "sigmoid":
    return functools.partial(sigmoid_schedule, xp=xp, **kwargs)
  raise ValueError(f"unknown mask schedule {name!r}; expected cosine, linear, pow<k> or sigmoid")

"""Host-side MaskGIT mask schedules, evaluated in float32 exactly as the original's torch code.

The T2I sampler needs ``floor(N * gamma(r))`` for r = (k+1)/T. That number is static per step, so it
is computed once on the host (numpy float32, matching torch's float32 ``cos``/``sigmoid``/``pow``
on a 0-d tensor) and passed into the compiled loop as a table. ``gamma(2/3)`` for cosine is
0.49999997 in float32, so 16 * gamma floors to 7, not 8: a float64 evaluation would change the
number of re-masked tokens. The training-side schedules (traced, any dtype) live elsewhere.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

_F32 = np.float32


def _cosine(t: np.ndarray) -> np.ndarray:
  return np.cos(t * _F32(math.pi) * _F32(0.5)).astype(_F32)


def _linear(t: np.ndarray) -> np.ndarray:
  return np.clip(_F32(1.0) - t, _F32(1e-6), _F32(1.0)).astype(_F32)


def _pow(exponent: float) -> Callable[[np.ndarray], np.ndarray]:
  def fn(t: np.ndarray) -> np.ndarray:
    return np.clip(_F32(1.0) - t ** _F32(exponent), _F32(1e-6), _F32(1.0)).astype(_F32)
  return fn


def _sigmoid32(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, _F32)
  return (_F32(1.0) / (_F32(1.0) + np.exp(-x))).astype(_F32)


def _sigmoid(start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-6):
  def fn(t: np.ndarray) -> np.ndarray:
    v_start = _sigmoid32(_F32(start / tau))
    v_end = _sigmoid32(_F32(end / tau))
    out = _sigmoid32((t * _F32(end - start) + _F32(start)) / _F32(tau))
    out = (v_end - out) / (v_end - v_start)
    return np.clip(out, _F32(clip_min), _F32(1.0)).astype(_F32)
  return fn


def get_mask_schedule(name: str, **kwargs) -> Callable[[np.ndarray], np.ndarray]:
  """Mask-ratio function gamma: float32 ratios r in (0, 1] -> float32 mask ratios.

  Names as the original's ``get_mask_schedule``: 'cosine', 'linear', 'pow<p>' (e.g. 'pow2'),
  'sigmoid' (kwargs start, end, tau, clip_min).
  """
  if name == "cosine":
    return _cosine
  if name == "linear":
    return _linear
  if name.startswith("pow"):
    try:
      exponent = float(name[3:])
    except ValueError:
      raise ValueError(f"mask schedule {name!r}: expected 'pow<exponent>', e.g. 'pow2'") from None
    return _pow(exponent)
  if name == "sigmoid":
    return _sigmoid(**kwargs)
  raise ValueError(f"unknown mask schedule {name!r}; use cosine, linear, pow<p> or sigmoid")


def mask_ratios(name: str | Callable[[np.ndarray], np.ndarray], timesteps: int) -> np.ndarray:
  """float32 [timesteps]: gamma((k+1)/T) for k = 0..T-1, each ratio rounded to float32 first."""
  fn = get_mask_schedule(name) if isinstance(name, str) else name
  out = [np.asarray(fn(np.asarray((k + 1) / timesteps, _F32)), _F32) for k in range(timesteps)]
  return np.stack(out).astype(_F32).reshape(timesteps)


def mask_len_table(name: str | Callable[[np.ndarray], np.ndarray], timesteps: int,
                   num_tokens: int) -> np.ndarray:
  """int32 [timesteps]: floor(N * gamma((k+1)/T)) in float32 (may be -1 at r = 1 for cosine)."""
  ratios = mask_ratios(name, timesteps)
  return np.floor(_F32(num_tokens) * ratios).astype(np.int32)


def temperature_table(temperature: float, timesteps: int, compound: bool = True) -> np.ndarray:
  """float32 [timesteps]: the Gumbel temperature used at each step (computed in float64).

  compound=True reproduces the original's in-place ``tau = tau * (1 - r)`` (tau_k =
  tau0 * prod_{j<=k} (1 - (j+1)/T)); compound=False gives MaskGIT's tau0 * (1 - r_k).
  """
  out, tau = [], float(temperature)
  for k in range(timesteps):
    r = 1.0 * (k + 1) / timesteps
    tau = tau * (1.0 - r) if compound else float(temperature) * (1.0 - r)
    out.append(tau)
  return np.asarray(out, np.float32)

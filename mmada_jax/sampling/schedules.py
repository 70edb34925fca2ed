"""Host-side MaskGIT tables: per-step mask counts and Gumbel temperatures, float32 as the original.

The T2I sampler needs ``floor(N * gamma(r))`` for r = (k+1)/T. That number is static per step, so it
is computed once on the host and passed into the compiled loop as a table. The schedules γ are the
one definition in :mod:`mmada_jax.diffusion.schedules`, evaluated here with ``xp=numpy`` (float32,
matching torch's float32 ``cos``/``sigmoid``/``pow`` on a 0-d tensor): ``gamma(2/3)`` for cosine is
0.49999997 in float32, so 16 * gamma floors to 7, not 8.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mmada_jax.diffusion.schedules import get_schedule

_F32 = np.float32


def get_mask_schedule(name: str, **kwargs) -> Callable[[np.ndarray], np.ndarray]:
  """Mask-ratio function gamma: float32 ratios r in (0, 1] -> float32 mask ratios (host numpy).

  Names as the original's ``get_mask_schedule``: 'cosine', 'linear', 'pow<p>' (e.g. 'pow2'),
  'sigmoid' (kwargs start, end, tau, clip_min).
  """
  return get_schedule(name, xp=np, **kwargs)


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

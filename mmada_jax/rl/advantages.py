"""Group-normalised advantages and the all-correct / all-wrong group filter (UniGRPO, spec §8).

Rows are laid out group-major: rows ``g*G .. g*G+G-1`` are the G responses to prompt g.

* ``A_i = (r_i - mean_g) / (std_g + eps)`` with the **population** std of the group (as the
  public RL code's ``reward/rl_reward_v.py``); a group whose rewards are all equal gets exactly
  0 (tested on max == min, so float round-off in the mean cannot leak a tiny non-zero value).
* ``group_keep_mask`` reproduces the public code's filter: groups whose accuracy is > 0.95 or
  < 0.05 are dropped. Shapes stay static, so "dropped" means a sequence weight of 0 in the loss
  (which also removes those rows from the KL term and from the loss normaliser), not a smaller
  batch. Off by default in the stage.

Both functions are array-generic: numpy in → numpy out (host-side, the stage's use), jax in →
jax out (jit-able).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def _xp(x: Array):
  return jnp if isinstance(x, jax.Array) else np


def _groups(x: Array, group_size: int, name: str):
  xp = _xp(x)
  x = xp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array [num_prompts * group_size], got shape {x.shape}")
  if group_size < 1 or x.shape[0] % group_size:
    raise ValueError(f"{name}: {x.shape[0]} rows are not a whole number of groups of {group_size}")
  return xp, x.reshape(-1, group_size)


def group_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
  """float32 [B]: ``(r - group mean) / (group population std + eps)``; 0 for constant groups.

  Args:
    rewards: float [B], B = num_prompts * group_size, group-major.
    group_size: G.
    eps: added to the std (keeps near-constant groups finite).
  """
  xp, r = _groups(rewards, group_size, "rewards")
  r = r.astype(xp.float32)
  mean = r.mean(axis=1, keepdims=True)
  std = xp.sqrt(((r - mean) ** 2).mean(axis=1, keepdims=True))
  constant = r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True)
  denom = xp.where(constant, xp.float32(1.0), std + xp.float32(eps))
  adv = xp.where(constant, xp.float32(0.0), (r - mean) / denom)
  return adv.reshape(-1).astype(xp.float32)


def group_accuracy(correct: Array, group_size: int) -> Array:
  """float32 [B]: the fraction of correct responses in each row's group (repeated per row).

  ``correct`` is bool or float [B]; a float counts as correct when > 0.5.
  """
  xp, c = _groups(correct, group_size, "correct")
  c = (c > 0.5) if c.dtype != bool else c
  acc = c.astype(xp.float32).mean(axis=1, keepdims=True)
  return xp.broadcast_to(acc, c.shape).reshape(-1)


def group_keep_mask(correct: Array, group_size: int, low: float = 0.05, high: float = 0.95) -> Array:
  """float32 [B] sequence weights: 0 for every row of a group with accuracy > high or < low, else 1."""
  acc = group_accuracy(correct, group_size)
  xp = _xp(acc)
  return ((acc >= low) & (acc <= high)).astype(xp.float32)

"""Optimizer and learning-rate schedule (the original's AdamW + warm-up/cosine, with its quirks).

* AdamW β=(0.9, 0.999), ε=1e-8, weight decay 0.01 decoupled and scaled by the lr (as torch).
  QUIRK (default ``weight_decay_mask="all"``): the original's no-decay name filters match no
  LLaDA parameter, so decay applies to every parameter. ``"matrices"`` exempts norms
  (rank-1 / per-layer vectors) and the embedding table instead.
* Global-norm gradient clipping (1.0) before the AdamW update.
* Schedule: linear warm-up 0 → lr over ``warmup_steps``, then ``0.5(1+cos(π·progress))`` down to
  **0** at ``schedule_steps``. QUIRK (default ``honour_min_lr_scale=False``): ``min_lr_scale`` is
  ignored, as the original's ``get_scheduler`` never forwards it; with ``True`` the cosine part
  becomes ``m + (1-m)·0.5(1+cos)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

WD_MASKS = ("all", "matrices", "none")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The ``config.optimizer`` section: AdamW + warm-up/cosine (spec §5; quirks in the module
  docstring). ``grad_accum``: micro-batches per step (lax.scan). ``weight_decay_mask``: 'all'
  (QUIRK, the original decays every parameter), 'matrices' (no decay on norms and the
  embedding) or 'none'. ``schedule_steps``: cosine horizon (0 = the run's ``steps``).
  ``honour_min_lr_scale``: False reproduces the original (``min_lr_scale`` ignored: cosine to 0)."""
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  weight_decay_mask: Literal["all", "matrices", "none"] = "all"
  warmup_steps: int = 5000
  schedule_steps: int = 0
  min_lr_scale: float = 0.1
  honour_min_lr_scale: bool = False
  clip_grad_norm: float = 1.0
  grad_accum: int = 1


def lr_schedule(cfg: OptimizerConfig | ConfigDict, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """lr(step) for optimizer step ``step`` (0-based count of updates already applied)."""
  peak = float(cfg.lr)
  warmup = int(cfg.warmup_steps)
  horizon = int(cfg.schedule_steps) if int(cfg.schedule_steps) > 0 else int(total_steps)
  floor = float(cfg.min_lr_scale) if bool(cfg.honour_min_lr_scale) else 0.0
  if warmup < 0 or horizon <= 0:
    raise ValueError(f"optimizer: warmup_steps={warmup} must be >= 0 and the schedule length "
                     f"{horizon} > 0 (set optimizer.schedule_steps or steps)")
  if not 0.0 <= floor <= 1.0:
    raise ValueError(f"optimizer.min_lr_scale={floor} must lie in [0, 1]")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(1, warmup)
    progress = jnp.clip((step - warmup) / max(1, horizon - warmup), 0.0, 1.0)
    cos = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    decay = floor + (1.0 - floor) * cos
    return peak * jnp.where(step < warmup, warm, decay)

  return schedule


def weight_decay_mask(kind: str, params: Any) -> Any:
  """Pytree of bools (True = decayed) for ``weight_decay_mask`` in WD_MASKS."""
  if kind not in WD_MASKS:
    raise ValueError(f"optimizer.weight_decay_mask={kind!r} is not one of {WD_MASKS}")
  if kind == "all":
    return jax.tree.map(lambda _: True, params)
  if kind == "none":
    return jax.tree.map(lambda _: False, params)

  def decayed(path, leaf) -> bool:
    name = jax.tree_util.keystr(path)
    if "norm" in name or "ln_f" in name or "wte" in name:
      return False
    return len(leaf.shape) >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimizerConfig | ConfigDict, params_shape: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """Returns ``(tx, schedule)``: clip → AdamW(schedule) with the configured decay mask.

  ``params_shape`` is a pytree of arrays or ShapeDtypeStructs (for the mask only).
  """
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if float(cfg.clip_grad_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_grad_norm)))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
      weight_decay=float(cfg.weight_decay), mask=weight_decay_mask(cfg.weight_decay_mask, params_shape)))
  return optax.chain(*parts), schedule

"""Training stages: the :class:`Stage` interface, its registry, and the batch-spec check.

The trainer never branches on a stage's name. A :class:`Stage` supplies

* ``make_batches(process_index, process_count)``: an iterator of per-host numpy batch pytrees
  (every leaf [B_local, ...]) with ``get_state()`` / ``set_state()`` (JSON-able);
* ``batch_spec()``: the per-step GLOBAL batch the loss receives (after ``pre_step``): a pytree of
  ``jax.ShapeDtypeStruct`` whose leading dim is the global rows; the trainer checks the first
  host batch against it (:func:`check_batch`) and AOT compiles the step from it;
* ``loss_fn(params, batch, rng, frozen) -> (loss, metrics)``: pure and traced inside the jitted
  step, once per micro-batch (metrics: dict of float32 scalars);
* ``sequences(batch) -> (rows, length)``: the rows and token length of the batch it is given (a
  host batch or the spec), for tokens/s and MFU;
* optional ``pre_step(ctx, batch) -> batch``: host-side work before each step (UniGRPO rollouts
  and rewards), given a :class:`StepContext` with the current state;
* optional ``init_frozen(params) -> pytree``: arrays the loss reads but never trains (a
  reference policy), built once from the run's *initial* parameters (``init_from``'s, or the
  seeded random init; also on resume) and passed to every step. Given abstract params
  (``ShapeDtypeStruct`` leaves with shardings, AOT) it returns the abstract frozen pytree;
* optional ``logit_shape``: ``(positions per row, vocabulary columns)`` where the loss applies
  the LM head, when that is fewer than every position over the whole vocabulary (FLOP counts).

``STAGES`` maps ``config.stage.name`` to a factory ``(config, model_cfg) -> Stage``. The
built-in stages register themselves here: ``pretrain`` and ``sft``
(:mod:`mmada_jax.train.stages.mixed`), ``unigrpo`` / ``grpo``
(:mod:`mmada_jax.train.stages.unigrpo`). A stage living elsewhere registers with
:func:`register_stage` before the run starts. A factory that also accepts ``abstract=True`` can
be built from the config alone, without data, tokenizers or reward models (AOT,
:func:`get_stage`): its ``make_batches`` / ``pre_step`` are then unusable.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig

LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What ``pre_step`` may read: the current (device) state, the step about to run, and setup."""
  state: Any
  step: int
  mesh: jax.sharding.Mesh
  config: ConfigDict
  model_cfg: MMaDAConfig
  frozen: Any


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training objective and its data (hooks in the module docstring)."""
  name: str
  loss_fn: LossFn
  make_batches: Callable[[int, int], Iterator]
  sequences: Callable[[Any], tuple[int, int]]
  batch_spec: Callable[[], Any]
  pre_step: Optional[Callable[[StepContext, Any], Any]] = None
  init_frozen: Optional[Callable[[Any], Any]] = None
  logit_shape: Optional[tuple[int, int]] = None

  @classmethod
  def from_hooks(cls, name: str, hooks: Any) -> "Stage":
    """A Stage from any object with the hook attributes (``loss_fn``, ``make_batches``,
    ``sequences``, ``batch_spec``; optional ``pre_step``, ``init_frozen``, ``logit_shape``),
    e.g. :class:`mmada_jax.rl.stage.GRPOStage`."""
    missing = [k for k in ("loss_fn", "make_batches", "sequences", "batch_spec") if not hasattr(hooks, k)]
    if missing:
      raise TypeError(f"stage {name!r}: {type(hooks).__name__} has no {missing}")
    return cls(name=name, loss_fn=hooks.loss_fn, make_batches=hooks.make_batches, sequences=hooks.sequences,
               batch_spec=hooks.batch_spec, pre_step=getattr(hooks, "pre_step", None),
               init_frozen=getattr(hooks, "init_frozen", None), logit_shape=getattr(hooks, "logit_shape", None))


StageFactory = Callable[..., Stage]
STAGES: dict[str, StageFactory] = {}


def register_stage(name: str) -> Callable[[StageFactory], StageFactory]:
  """Decorator: ``factory(config, model_cfg[, abstract=False]) -> Stage`` serves ``config.stage.name == name``."""
  def deco(factory: StageFactory) -> StageFactory:
    STAGES[name] = factory
    return factory
  return deco


def get_stage(config: ConfigDict, model_cfg: MMaDAConfig, *, abstract: bool = False) -> Stage:
  """Builds the stage named by ``config.stage.name``.

  ``abstract=True``: from the config alone (no data, tokenizer or reward resources are opened),
  for shape-only uses such as AOT; the factory must accept ``abstract``.
  """
  name = str(config.stage.name)
  if name not in STAGES:
    raise ValueError(f"training stage {name!r} is not registered; registered stages: {sorted(STAGES)}")
  factory = STAGES[name]
  if not abstract:
    return factory(config, model_cfg)
  if "abstract" not in inspect.signature(factory).parameters:
    raise ValueError(f"stage {name!r} cannot be built without its data: its factory takes no 'abstract' argument")
  return factory(config, model_cfg, abstract=True)


def check_batch(batch: Any, spec: Any, process_count: int, grad_accum: int = 1, what: str = "batch") -> None:
  """Raises ValueError naming the first leaf of ``batch`` that does not fit ``spec``.

  ``batch``: this process's host batch (numpy leaves [rows_local, ...]); ``spec``: the stage's
  global :meth:`Stage.batch_spec`. The tree structures must be equal, and every leaf must have the
  spec's trailing shape and dtype and ``rows = global rows / process_count``. A ``jax.Array`` leaf
  (made on device by a ``pre_step``) is global, in the step layout [grad_accum, rows/grad_accum, ...].
  """
  spec_leaves = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(spec)}
  got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(batch)}
  missing, extra = sorted(set(spec_leaves) - set(got)), sorted(set(got) - set(spec_leaves))
  if missing or extra:
    raise ValueError(f"{what} does not match the stage's batch spec: "
                     + "; ".join(([f"missing leaves {missing}"] if missing else [])
                                 + ([f"unexpected leaves {extra}"] if extra else [])))
  if jax.tree.structure(batch) != jax.tree.structure(spec):
    raise ValueError(f"{what} has the spec's leaves but a different tree structure: "
                     f"{jax.tree.structure(batch)} vs {jax.tree.structure(spec)}")
  for name, s in spec_leaves.items():
    x = got[name]
    rows = int(s.shape[0])
    if isinstance(x, jax.Array):
      if rows % grad_accum:
        raise ValueError(f"{what} leaf {name}: {rows} global rows do not split into {grad_accum} micro-batches")
      want, where = (grad_accum, rows // grad_accum, *s.shape[1:]), "global, in the step layout"
    else:
      if rows % process_count:
        raise ValueError(f"{what} leaf {name}: {rows} global rows do not split over {process_count} processes")
      want, where = (rows // process_count, *s.shape[1:]), f"this process's rows of {process_count}"
    shape, dtype = tuple(np.shape(x)), np.dtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
    if shape != want or dtype != np.dtype(s.dtype):
      raise ValueError(f"{what} leaf {name}: got {dtype} {shape}, the stage's batch spec wants {np.dtype(s.dtype)} "
                       f"{want} ({where}; global {np.dtype(s.dtype)} {tuple(s.shape)})")


# The built-in stages register themselves (imported last: they import the names above).
from mmada_jax.train.stages import mixed, unigrpo  # noqa: E402,F401

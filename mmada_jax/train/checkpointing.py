"""Training checkpoints (Orbax ``CheckpointManager``) and ``init_from`` parameter loading.

A step directory ``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state``: the TrainState pytree (params, optimizer state, step, base RNG key), saved
  asynchronously; restored into an abstract target that carries the *current* mesh's
  shardings, so a checkpoint restores onto any mesh shape.
* ``data``: the data iterator state, one JSON file per process (``process_<i>-of-<n>.json``).
* ``meta``: JSON with the config, model config, mesh, process count and package versions.

Orbax writes each step into a temporary directory and renames it when every item is finished,
so an interrupted save is never listed. On resume the newest step is restored. A step that is
provably incomplete (Orbax's ``commit_success.txt`` marker of the step or of an item absent, an
item directory or one of its required files missing: :meth:`Checkpointer.incomplete_reason`) is
skipped with a warning naming it and why, and the previous one is tried; any other failure
(corrupt data, a shape or dtype mismatch, a mesh it cannot be placed on, another process count)
is a :class:`RestoreError` naming the step and the cause.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from mmada_jax.checkpoint import hf_mmada, orbax_io
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.train.state import TrainState

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
  """No usable checkpoint could be restored, or the newest complete one failed to restore."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """The ``config.checkpoint`` section, the Orbax CheckpointManager policy: keep the newest
  ``max_to_keep`` steps (0 = all) plus every ``keep_period``-th step (0 = none); ``async_save``
  writes in the background."""
  max_to_keep: int = 3
  keep_period: int = 0
  async_save: bool = True


ITEMS = ("state", "data", "meta")
COMMIT_MARKER = "commit_success.txt"   # Orbax writes it into a step and each item once finalised


# ---------------------------------------------------------------- data iterator state item

class DataStateHandler(ocp.CheckpointHandler):
  """Per-process JSON of an iterator's ``get_state()`` (a JSON-able dict)."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    self._file(directory).write_text(json.dumps(args.state, sort_keys=True))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      raise RestoreError(f"no data-iterator state {path.name} in {directory} (found {found}): the "
                         "checkpoint was written with a different number of processes")
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------- manager

class Checkpointer:
  """Saves and restores (TrainState, data state, meta) under ``directory``."""

  def __init__(self, directory: str, cfg: CheckpointConfig | ConfigDict):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(cfg.max_to_keep) if int(cfg.max_to_keep) > 0 else None,
        keep_period=int(cfg.keep_period) if int(cfg.keep_period) > 0 else None,
        enable_async_checkpointing=bool(cfg.async_save),
        cleanup_tmp_directories=True,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: Any, meta: dict) -> None:
    """Starts an (asynchronous) save of ``state`` at ``step``; returns once it is dispatched."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def incomplete_reason(self, step: int) -> str | None:
    """Why step ``step`` is provably incomplete (a marker, item or required file absent), or
    None when everything a finished save writes is there (its contents are not read)."""
    d = os.path.join(self.directory, str(step))
    if not os.path.isdir(d):
      return f"its directory {d} is missing"
    missing = [i for i in ITEMS if not os.path.isdir(os.path.join(d, i))]
    if missing:
      return f"item director{'ies' if len(missing) > 1 else 'y'} {missing} missing"
    where = {"the step": d, **{f"item {i!r}": os.path.join(d, i) for i in ITEMS}}
    unmarked = [name for name, path in where.items() if not os.path.isfile(os.path.join(path, COMMIT_MARKER))]
    if unmarked:
      return f"Orbax's commit marker {COMMIT_MARKER} is absent for {', '.join(unmarked)} (the save did not finish)"
    state = os.path.join(d, "state")
    required = [os.path.join("state", "_METADATA"), os.path.join("meta", "metadata")]
    if os.path.isfile(os.path.join(state, "manifest.ocdbt")):   # OCDBT: one data folder per writing process
      procs = sorted(n for n in os.listdir(state) if n.startswith("ocdbt.process_"))
      if not procs:
        return "the state's array data (state/ocdbt.process_*) is missing"
      required += [os.path.join("state", p, f) for p in procs for f in ("manifest.ocdbt", "d")]
    absent = [r for r in required if not os.path.exists(os.path.join(d, r))]
    if absent:
      return f"required files {absent} are missing"
    return None

  def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, Any, dict] | None:
    """Restores the newest step, skipping (with a warning) steps that are provably incomplete;
    None if there are no steps. A complete step that fails to restore raises RestoreError naming
    the step and the cause, as does having only incomplete steps."""
    steps = self.all_steps()
    skipped = []
    for step in reversed(steps):
      reason = self.incomplete_reason(step)
      if reason is not None:
        skipped.append(f"step {step}: {reason}")
        log.warning("checkpoint step %d in %s is incomplete (%s); skipping it and trying the previous one",
                    step, self.directory, reason)
        continue
      try:
        state, data, meta = self.restore(step, abstract_state)
      except Exception as e:
        cause = str(e) if len(str(e)) <= 600 else str(e)[:600] + " …"   # TensorStore appends its whole spec
        raise RestoreError(f"checkpoint step {step} in {self.directory} is complete but cannot be restored "
                           f"({type(e).__name__}: {cause}); it may be corrupt or not match this run's model, "
                           "mesh or process count. Move it away to resume from an earlier step.") from e
      stored = int(jax.device_get(state.step))
      if stored != step:
        raise RestoreError(f"checkpoint step {step} in {self.directory} holds state.step={stored}: the "
                           "directory does not hold the step its name says")
      return step, state, data, meta
    if steps:
      raise RestoreError(f"no checkpoint in {self.directory} could be restored, every step is incomplete:\n  "
                         + "\n  ".join(skipped))
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------- init_from (params only)

def _step_dirs(path: str) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))
  except FileNotFoundError:
    return []


def resolve_init_from(path: str) -> tuple[str, str]:
  """Classifies ``path``: returns (kind, location) with kind in {hf, orbax_model, train_step}.

  Accepted: an original HF directory (config.json + safetensors), a ``save_params`` directory,
  a trainer workdir, its ``checkpoints`` directory (the newest step is used), or one step
  directory ``.../checkpoints/<step>``.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from: {path!r} is not a directory")
  if os.path.isdir(os.path.join(path, "state")):
    return "train_step", path
  for cand in (os.path.join(path, "checkpoints"), path):
    steps = _step_dirs(cand)
    if steps and os.path.isdir(os.path.join(cand, str(steps[-1]), "state")):
      return "train_step", os.path.join(cand, str(steps[-1]))
  if orbax_io.is_orbax_model_dir(path):
    return "orbax_model", path
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf", path
  raise FileNotFoundError(f"init_from: {path!r} is neither a training workdir/checkpoint, an "
                          "mmada_jax params directory nor an original checkpoint (config.json + safetensors)")


ARCH_FIELDS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size")


def _check_arch(found: MMaDAConfig, want: MMaDAConfig, where: str) -> None:
  diff = {f: (getattr(found, f), getattr(want, f)) for f in ARCH_FIELDS if getattr(found, f) != getattr(want, f)}
  if diff:
    detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    raise ValueError(f"init_from {where}: architecture differs from config.model ({detail})")


def load_init_params(path: str, cfg: MMaDAConfig, abstract_params: Any, mesh, rules=None) -> Any:
  """Parameters only from ``path`` (see :func:`resolve_init_from`), placed per ``abstract_params``
  shardings and cast to ``cfg.param_dtype``."""
  kind, where = resolve_init_from(path)
  if kind == "hf":
    params, found = hf_mmada.load_hf_checkpoint(where, cfg.param_dtype, mesh=mesh, rules=rules)
    _check_arch(found, cfg, where)
    return params
  if kind == "orbax_model":
    params, found = orbax_io.load_params(where, cfg.param_dtype, mesh=mesh, rules=rules)
    _check_arch(found, cfg, where)
    return params
  item = os.path.join(where, "state")
  meta = ocp.PyTreeCheckpointer().metadata(item)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  if "params" not in tree:
    raise ValueError(f"init_from {where}: the state item has no params (keys {sorted(tree)})")
  target = {"params": abstract_params}
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      target)
  try:
    out = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise ValueError(f"init_from {where}: cannot restore params ({type(e).__name__}: {e}); the "
                     "checkpoint's architecture may differ from config.model") from e
  return out["params"]

"""Training checkpoints (Orbax ``CheckpointManager``) and ``init_from`` parameter loading.

A step directory ``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state``: the TrainState pytree (params, optimizer state, step, base RNG key), saved
  asynchronously; restored into an abstract target that carries the *current* mesh's
  shardings, so a checkpoint restores onto any mesh shape.
* ``data``: the data iterator state, one JSON file per process (``process_<i>-of-<n>.json``).
* ``meta``: JSON with the config, model config, mesh, process count and package versions.

Orbax writes each step into a temporary directory and renames it when every item is finished,
so an interrupted save is never listed. On resume the newest step is restored; if that fails
(a damaged directory), the previous one is tried, with a warning, and so on.
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
  """No usable checkpoint could be restored."""


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

  def __init__(self, directory: str, cfg: ConfigDict):
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

  def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, Any, dict] | None:
    """Restores the newest restorable step (falling back past damaged ones); None if none exist."""
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        state, data, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
        msg = f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {e})"
        errors.append(msg)
        log.warning("%s; trying the previous one", msg)
        continue
      if int(jax.device_get(state.step)) != step:
        errors.append(f"step {step}: stored state.step={int(state.step)}")
        log.warning("checkpoint %d holds state.step=%d; skipping it", step, int(state.step))
        continue
      return step, state, data, meta
    if steps:
      raise RestoreError("no checkpoint could be restored:\n  " + "\n  ".join(errors))
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

"""The training loop shared by every stage (pretrain, SFT, and GRPO through a stage hook).

``run(config, workdir)``:
  1. distributed start-up, mesh from ``config.mesh_shape``, stage from ``config.stage.name``;
  2. abstract state → shardings (params by logical rules, optimizer moments alike);
  3. restore: own ``WORKDIR/checkpoints`` first (newest restorable step), else params from
     ``config.init_from``, else random init;
  4. jit + AOT-compile the step (memory analysis logged);
  5. loop: batch → (pre_step) → global arrays → step; metrics read one step behind so the host
     never stalls the device; non-finite loss stops the run before anything is saved; saves every
     ``checkpoint_every`` steps, at the end and on SIGTERM / preemption;
  6. wait for pending saves.
Returns the process exit code (0: finished, preempted-and-saved, or data exhausted; 3: non-finite
loss). ``WORKDIR/status.json`` records which.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding.rules import DEFAULT_RULES, MESH_AXES, make_mesh
from mmada_jax.train import checkpointing, distributed, metrics as metrics_lib, optim, state as state_lib
from mmada_jax.train.stages import StepContext, get_stage
from mmada_jax.train.step import jit_step, make_step_fn, to_global_batch

EXIT_OK, EXIT_NONFINITE = 0, 3


class NonFiniteLoss(RuntimeError):
  pass


class _Preemption:
  """SIGTERM → flag (single process); multi-process runs use JAX's preemption sync point."""

  def __init__(self):
    self.flag = False
    self.multi = jax.process_count() > 1
    self._old = None
    if not self.multi:
      self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:
        return False
    return self.flag

  def restore(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def load_config_file(spec: str) -> ConfigDict:
  """``path/to/config.py[:arg]`` -> that file's ``get_config(arg)`` (what ``--config=`` names)."""
  import importlib.util
  path, sep, arg = spec.partition(".py:")
  path = path + ".py" if sep else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location("mmada_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def model_config(cfg: ConfigDict) -> MMaDAConfig:
  fields = {f.name for f in dataclasses.fields(MMaDAConfig)}
  unknown = sorted(set(cfg.keys()) - fields)
  if unknown:
    raise ValueError(f"config.model has fields MMaDAConfig does not know: {unknown}")
  return MMaDAConfig(**cfg.to_dict())


def parse_rules(overrides: str):
  """DEFAULT_RULES with ``"logical=axis[+axis],..."`` overrides ('none' = replicated)."""
  rules = dict(DEFAULT_RULES)
  for item in [p.strip() for p in str(overrides or "").split(",") if p.strip()]:
    name, sep, target = item.partition("=")
    if not sep or name.strip() not in rules:
      raise ValueError(f"config.sharding_rules entry {item!r}: expected logical=axis with a logical "
                       f"name in {sorted(rules)}")
    axes = tuple(a.strip() for a in target.split("+") if a.strip() and a.strip().lower() != "none")
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"config.sharding_rules entry {item!r}: unknown mesh axes {bad}; axes are {MESH_AXES}")
    rules[name.strip()] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return tuple(rules.items())


def validate(config: ConfigDict) -> None:
  """Start-up checks that would otherwise fail late or obscurely (all problems reported at once)."""
  for key in ("steps", "log_every"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if int(config.checkpoint_every) < 0:
    raise ValueError(f"config.checkpoint_every={config.checkpoint_every} must be >= 0 (0 = only at the end)")
  if int(config.optimizer.grad_accum) < 1:
    raise ValueError(f"config.optimizer.grad_accum={config.optimizer.grad_accum} must be >= 1")
  missing = []

  def need(key: str, path: str) -> None:
    if not path:
      missing.append(f"config.{key} is empty")
    elif "://" not in path and not os.path.exists(path):
      missing.append(f"config.{key}={path!r} does not exist")

  if str(config.data_source) == "records":
    from mmada_jax.data.config import TASKS, task_sources
    need("data.text_tokenizer", str(config.data.text_tokenizer))
    for task in TASKS:
      if int(config.data[task].batch_size) > 0:
        for src in task_sources(config.data, task):
          need(src["key"], src["path"])
  if config.init_from:
    need("init_from", str(config.init_from))
  if missing:
    raise FileNotFoundError("missing data or checkpoint paths:\n  " + "\n  ".join(missing))


def _git_commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                          timeout=5).stdout.strip()
  except Exception:  # noqa: BLE001
    return ""


def _run_meta(config: ConfigDict, model_cfg: MMaDAConfig, mesh, step: int) -> dict:
  import flax
  import optax
  import orbax.checkpoint as ocp
  return {"step": int(step), "config": json.loads(config.to_json_best_effort()),
          "model_config": dataclasses.asdict(model_cfg), "mesh": dict(mesh.shape),
          "process_count": jax.process_count(), "device_kind": jax.devices()[0].device_kind,
          "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                       "orbax": ocp.__version__}, "git_commit": _git_commit()}


def run(config: ConfigDict, workdir: str) -> int:
  """Trains per ``config`` in ``workdir``; returns the exit code."""
  dist = distributed.maybe_initialize(config.distributed)
  jax.config.update("jax_threefry_partitionable", True)  # random masks independent of the mesh
  validate(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  model_cfg = model_config(config.model)
  mesh = make_mesh(str(config.mesh_shape))
  rules = parse_rules(config.sharding_rules)
  stage = get_stage(config, model_cfg)
  total = int(config.steps)
  say = _say if is_main else (lambda msg: None)
  say(f"distributed: {dist}; mesh {dict(mesh.shape)} over {jax.device_count()} devices "
      f"({jax.devices()[0].device_kind}); stage {stage.name!r}; {model_cfg.num_params() / 1e6:.2f}M params")

  params_shape = state_lib.abstract_params(model_cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, params_shape, total)
  abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data_iter = stage.make_batches(jax.process_index(), jax.process_count())

  def initial_params():
    """The run's starting parameters: ``init_from``'s, else the random init from ``seed``."""
    if config.init_from:
      return checkpointing.load_init_params(str(config.init_from), model_cfg, abstract.params, mesh, rules)
    return None

  with jax.set_mesh(mesh):
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
      start, state, data_state, _ = restored
      data_iter.set_state(data_state)
      say(f"resumed from {ckpt.directory} step {start}")
    else:
      start = 0
      state = state_lib.init_state(model_cfg, tx, shardings, int(config.seed), initial_params())
      if config.init_from:
        say(f"initialised parameters from {config.init_from}")
    frozen = None
    if stage.init_frozen is not None:  # e.g. a reference policy: always the run's initial params
      first = state.params if restored is None else (
          initial_params() or state_lib.init_state(model_cfg, tx, shardings, int(config.seed)).params)
      frozen = stage.init_frozen(jax.tree.map(jnp.copy, first))  # own buffers: the state is donated

  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(_run_meta(config, model_cfg, mesh, start), f, indent=2, sort_keys=True)
  writer = metrics_lib.MetricWriter(workdir, start, enabled=is_main, tensorboard=bool(config.tensorboard))
  progress = metrics_lib.Progress(total, start, enabled=is_main and bool(config.progress_bar))
  preempt = _Preemption()
  sampler = None
  if int(config.sampling.every) > 0:
    from mmada_jax.train.samples import make_sampler
    sampler = make_sampler(config, model_cfg, mesh, workdir, writer, progress.write)

  grad_accum = int(config.optimizer.grad_accum)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, float(config.peak_flops_per_device))
  step_fn = make_step_fn(stage, tx, schedule, shardings.params)
  meta = _run_meta(config, model_cfg, mesh, start)
  compiled = None
  pending: list[tuple[int, dict, tuple[int, int]]] = []
  window = {"t": None, "steps": 0, "tokens": 0, "flops": 0.0}
  last_saved = start if restored is not None else -1
  last_good = start
  step = start
  code = EXIT_OK

  def handle(item) -> None:
    nonlocal last_good
    s, m, (rows, length) = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m):
      raise NonFiniteLoss(f"non-finite loss at step {s}: " + ", ".join(f"{k}={v:.6g}" for k, v in m.items()))
    last_good = s
    now = time.perf_counter()
    if window["t"] is None:
      window["t"] = now
    else:
      window["steps"] += 1
      window["tokens"] += rows * length
      window["flops"] += metrics_lib.flops_per_step(model_cfg, rows, length)
    elapsed = now - window["t"]
    if window["steps"] and elapsed > 0:
      m["steps_per_sec"] = window["steps"] / elapsed
      m["tokens_per_sec"] = window["tokens"] / elapsed
      if peak:
        m["mfu"] = window["flops"] / elapsed / (peak * jax.device_count())
    progress.update(m)
    if s % int(config.log_every) == 0 or s == total:
      writer.write(s, m)
      window.update(t=now, steps=0, tokens=0, flops=0.0)

  def flush() -> None:
    while pending:
      handle(pending.pop(0))

  def save(s: int) -> None:
    nonlocal last_saved
    if s == last_saved:
      return
    flush()
    ckpt.save(s, state, data_iter.get_state(), dict(meta, step=s))
    last_saved = s

  try:
    with jax.set_mesh(mesh):
      while step < total:
        if preempt.reached(step):
          save(step)
          ckpt.wait()
          progress.write(f"preemption signal: saved a checkpoint at step {step} in {ckpt.directory}; "
                         "rerun the same command to resume")
          _status(workdir, is_main, "preempted", step)
          break
        try:
          host_batch = next(data_iter)
        except StopIteration:
          save(step)
          progress.write(f"the data iterator is exhausted after {step} steps (data.num_epochs); "
                         f"saved a checkpoint at step {step}")
          _status(workdir, is_main, "data_exhausted", step)
          break
        if stage.pre_step is not None:
          host_batch = stage.pre_step(StepContext(state, step, mesh, config, model_cfg, frozen), host_batch)
        seq = stage.sequences(host_batch)
        batch = to_global_batch(host_batch, grad_accum, mesh)
        if compiled is None:
          compiled = _compile(step_fn, shardings, state, batch, frozen, mesh, progress.write)
        state, m = compiled(state, batch, frozen)
        step += 1
        pending.append((step, m, seq))
        while len(pending) > 1:
          handle(pending.pop(0))
        if (int(config.checkpoint_every) and step % int(config.checkpoint_every) == 0) or step == total:
          save(step)
        if sampler is not None and step % int(config.sampling.every) == 0:
          flush()
          sampler(state.params, step)
          window.update(t=None, steps=0, tokens=0, flops=0.0)  # sampling time is not training time
      flush()
      if step == total:
        save(step)
        _status(workdir, is_main, "finished", step)
  except NonFiniteLoss as e:
    code = EXIT_NONFINITE
    ckpt.wait()
    done = ckpt.all_steps()
    msg = (f"{e}\nstopping: nothing after step {last_good} is saved; the last good checkpoint is "
           f"{'step ' + str(done[-1]) if done else 'none'} in {ckpt.directory}")
    progress.write(msg)
    _status(workdir, is_main, "nonfinite", last_good)
  finally:
    preempt.restore()
    ckpt.close()
    progress.close()
    writer.close()
  return code


def _compile(step_fn, shardings, state, batch, frozen, mesh, say):
  t0 = time.perf_counter()
  lowered = jit_step(step_fn, shardings, batch, frozen, mesh).lower(state, batch, frozen)
  compiled = lowered.compile()
  mem = None
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  msg = f"compiled the train step in {time.perf_counter() - t0:.1f}s"
  if mem is not None:
    gib = 2.0 ** 30
    msg += (f"; per-device memory: args {mem.argument_size_in_bytes / gib:.3f} GiB, temps "
            f"{mem.temp_size_in_bytes / gib:.3f} GiB, outputs {mem.output_size_in_bytes / gib:.3f} GiB")
  say(msg)
  return compiled


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _status(workdir: str, is_main: bool, what: str, step: int) -> None:
  if is_main:
    with open(os.path.join(workdir, "status.json"), "w") as f:
      json.dump({"status": what, "step": int(step), "time": time.time()}, f)

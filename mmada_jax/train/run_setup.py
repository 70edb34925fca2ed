"""Everything a training run builds before its first step.

* :func:`validate`: the config against the schema, then values and paths.
* :func:`setup` -> :class:`RunSetup`: distributed start-up, model config, mesh and the one
  :class:`~mmada_jax.sharding.ShardingContext`, the stage, the optimizer, the abstract state and
  its shardings, the checkpointer and the stage's data iterator.
* :func:`restore_or_init` -> :class:`Start`: the run's own newest checkpoint (with the data
  iterator's state), else the parameters of ``config.init_from``, else the seeded random init;
  plus the stage's frozen pytree (``Stage.init_frozen``), always built from the run's *initial*
  parameters.
* :func:`run_meta`: what ``WORKDIR/config.json`` and every checkpoint record about the run.

With ``config.lora.rank > 0`` (:mod:`mmada_jax.train.lora`) the state's params are the adapters,
the stage is wrapped to see base ∪ adapters, and the frozen pytree carries the base (loaded from
``init_from`` or the seeded random init, cast / quantized, fingerprinted; a resume checks the
checkpoint's base fingerprint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import ShardingContext, make_mesh, use_sharding
from mmada_jax.train import checkpointing, distributed, lora as lora_lib, optim, state as state_lib
from mmada_jax.train.config import model_config, parse_config
from mmada_jax.train.metrics import PhaseTimes
from mmada_jax.train.stages import Stage, get_stage
from mmada_jax.train.state import TrainState


def validate(config: ConfigDict) -> None:
  """Start-up checks that would otherwise fail late or obscurely: the whole config against the
  schema (:mod:`mmada_jax.train.config`: an unknown key or a wrong type names its dotted path),
  then values and paths (all missing paths reported at once)."""
  parse_config(config)
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


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What :func:`setup` built: fixed for the whole run.

  ``say`` prints a start-up line on process 0 (nothing elsewhere). ``total``: ``config.steps``;
  ``grad_accum``: ``config.optimizer.grad_accum``. ``abstract`` / ``shardings``: the TrainState of
  ShapeDtypeStructs (shardings attached) and of NamedShardings. ``lora``: the LoRA plan (None =
  full fine-tuning; else the state's params are its adapters and ``stage`` is wrapped).
  """
  config: ConfigDict
  workdir: str
  is_main: bool
  model_cfg: MMaDAConfig
  mesh: jax.sharding.Mesh
  shard_ctx: ShardingContext
  stage: Stage
  total: int
  grad_accum: int
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  abstract: TrainState
  shardings: TrainState
  ckpt: checkpointing.Checkpointer
  data_iter: Iterator
  say: Callable[[str], None]
  lora: lora_lib.LoraPlan | None = None
  times: PhaseTimes = dataclasses.field(default_factory=PhaseTimes)

  def write_status(self, what: str, step: int) -> None:
    """``WORKDIR/status.json`` = ``{"status": what, "step": step, "time": ..., "timings_s": ...}``
    (process 0; ``timings_s``: this process's :class:`~mmada_jax.train.metrics.PhaseTimes` so far)."""
    if self.is_main:
      with open(os.path.join(self.workdir, "status.json"), "w") as f:
        json.dump({"status": what, "step": int(step), "time": time.time(), "timings_s": self.times.as_dict()}, f)


def setup(config: ConfigDict, workdir: str) -> RunSetup:
  """Starts the processes (``config.distributed``), validates ``config`` and builds the run."""
  dist = distributed.maybe_initialize(config.distributed)
  jax.config.update("jax_threefry_partitionable", True)  # random masks independent of the mesh
  validate(config)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  model_cfg = model_config(config.model)
  mesh = make_mesh(str(config.mesh_shape))
  shard_ctx = ShardingContext.create(mesh, str(config.sharding_preset), str(config.sharding_rules))
  stage = get_stage(config, model_cfg)
  total = int(config.steps)
  say = _say if is_main else _quiet
  say(f"distributed: {dist}; mesh {dict(mesh.shape)} over {jax.device_count()} devices "
      f"({jax.devices()[0].device_kind}); stage {stage.name!r}; {model_cfg.num_params() / 1e6:.2f}M params")
  say(f"preset {config.sharding_preset!r}, overrides {str(config.sharding_rules)!r}; " + shard_ctx.describe())
  plan = lora_lib.plan_from_config(config, model_cfg)
  trained, axes = None, None
  if plan is not None:
    stage = plan.wrap_stage(stage)
    trained, axes = plan.abstract_adapters(), plan.adapter_axes()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained))
    say(f"LoRA rank {plan.cfg.rank} (alpha {plan.cfg.alpha}) on {'|'.join(plan.targets)}: {n / 1e6:.3f}M "
        f"trained params; base frozen in {plan.base_dtype()}, quantized {plan.cfg.base_qtype}")
  tx, schedule = optim.make_optimizer(
      config.optimizer, state_lib.abstract_params(model_cfg) if trained is None else trained, total)
  abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, shard_ctx.rules, params=trained, axes=axes)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data_iter = stage.make_batches(jax.process_index(), jax.process_count())
  return RunSetup(config=config, workdir=workdir, is_main=is_main, model_cfg=model_cfg, mesh=mesh,
                  shard_ctx=shard_ctx, stage=stage, total=total, grad_accum=int(config.optimizer.grad_accum),
                  tx=tx, schedule=schedule, abstract=abstract, shardings=shardings, ckpt=ckpt,
                  data_iter=data_iter, say=say, lora=plan)


@dataclasses.dataclass(frozen=True)
class Start:
  """Where the step loop starts: ``step`` (0, or the restored checkpoint's), the device
  ``state``, the stage's ``frozen`` pytree (None without ``init_frozen``), and ``resumed`` (True
  when the run's own checkpoint was restored: that step is already saved). ``lora_meta``: the
  LoRA entry every checkpoint's meta records (:meth:`LoraPlan.meta`), None without LoRA."""
  step: int
  state: TrainState
  frozen: Any
  resumed: bool
  lora_meta: dict | None = None


def restore_or_init(run: RunSetup) -> Start:
  """The run's own newest restorable checkpoint (its data-iterator state too), else the
  parameters of ``config.init_from``, else the random init from ``config.seed``."""
  if run.lora is not None:
    return _lora_start(run)
  config, seed = run.config, int(run.config.seed)
  with use_sharding(run.shard_ctx):
    restored = run.ckpt.restore_latest(run.abstract)
    if restored is not None:
      step, state, data_state, _ = restored
      run.data_iter.set_state(data_state)
      run.say(f"resumed from {run.ckpt.directory} step {step}")
    else:
      step = 0
      state = state_lib.init_state(run.model_cfg, run.tx, run.shardings, seed, _init_from_params(run))
      if config.init_from:
        run.say(f"initialised parameters from {config.init_from}")
    frozen = None
    if run.stage.init_frozen is not None:  # e.g. a reference policy: always the run's initial params
      first = state.params if restored is None else (
          _init_from_params(run) or state_lib.init_state(run.model_cfg, run.tx, run.shardings, seed).params)
      frozen = run.stage.init_frozen(jax.tree.map(jnp.copy, first))  # own buffers: the state is donated
  return Start(step=step, state=state, frozen=frozen, resumed=restored is not None)


def _lora_start(run: RunSetup) -> Start:
  """LoRA: the base (``init_from`` or the seeded random init, as :func:`restore_or_init`'s full
  run would start) cast / quantized and fingerprinted; the adapters from the run's own newest
  checkpoint (whose base fingerprint must match) or freshly initialised (B = 0)."""
  plan, config, seed = run.lora, run.config, int(run.config.seed)
  base_path = str(config.init_from)
  if base_path and "://" not in base_path:
    base_path = os.path.abspath(base_path)
  with use_sharding(run.shard_ctx):
    plain = plan.abstract_base(run.shard_ctx, quantized=False)
    if base_path:
      base_cfg = dataclasses.replace(run.model_cfg, param_dtype=plan.base_dtype())
      params = checkpointing.load_init_params(base_path, base_cfg, plain, run.mesh, run.shard_ctx.rules)
    else:
      dt = jnp.dtype(plan.base_dtype())
      params = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(dt), transformer.init_params(
          run.model_cfg, jax.random.fold_in(k, 1))), out_shardings=jax.tree.map(lambda a: a.sharding, plain))(
              jax.random.PRNGKey(seed))
    base_hash = lora_lib.fingerprint(params)
    base = plan.place_base(params, run.shard_ctx)
    restored = run.ckpt.restore_latest(run.abstract)
    if restored is not None:
      step, state, data_state, meta = restored
      plan.check_meta(meta, base_path, base_hash, f"checkpoint step {step} in {run.ckpt.directory}")
      run.data_iter.set_state(data_state)
      run.say(f"resumed LoRA adapters from {run.ckpt.directory} step {step}")
    else:
      step = 0
      adapters = jax.jit(plan.init_adapters, out_shardings=run.shardings.params)(
          jax.random.fold_in(jax.random.PRNGKey(seed), 2))
      state = state_lib.init_state(run.model_cfg, run.tx, run.shardings, seed, adapters)
      run.say(f"LoRA base {base_path or '(seeded random init)'} (content hash {base_hash[:16]}…)")
    frozen = run.stage.init_frozen(base)     # the base is never donated: no copy
  return Start(step=step, state=state, frozen=frozen, resumed=restored is not None,
               lora_meta=plan.meta(base_path, base_hash))


def _init_from_params(run: RunSetup) -> Any | None:
  """The parameters of ``config.init_from`` placed by the run's shardings, or None without one."""
  if not run.config.init_from:
    return None
  return checkpointing.load_init_params(str(run.config.init_from), run.model_cfg, run.abstract.params,
                                        run.mesh, run.shard_ctx.rules)


def run_meta(run: RunSetup, step: int, lora: dict | None = None) -> dict:
  """The run's description: config, model config, mesh, processes, device kind, versions, commit
  (and ``lora``: the adapters' base, :attr:`Start.lora_meta`, when given)."""
  import flax
  import orbax.checkpoint as ocp
  extra = {} if lora is None else {"lora": lora}
  return {**extra, "step": int(step), "config": json.loads(run.config.to_json_best_effort()),
          "model_config": dataclasses.asdict(run.model_cfg), "mesh": dict(run.mesh.shape),
          "process_count": jax.process_count(), "device_kind": jax.devices()[0].device_kind,
          "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                       "orbax": ocp.__version__}, "git_commit": _git_commit()}


def _git_commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                          timeout=5).stdout.strip()
  except Exception:  # noqa: BLE001
    return ""


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
  del msg

"""The training entry point shared by every stage (pretrain, SFT, and UniGRPO through stage hooks).

``run(config, workdir) -> int`` puts the pieces together:

1. :func:`~mmada_jax.train.run_setup.setup`: distributed start-up, validation, model config, mesh
   and the one sharding context, stage, optimizer, abstract state and shardings, checkpointer,
   the stage's data iterator;
2. :func:`~mmada_jax.train.run_setup.restore_or_init`: own ``WORKDIR/checkpoints`` first (newest
   restorable step), else params from ``config.init_from``, else random init from ``seed``; the
   stage's frozen pytree from the run's initial params;
3. ``WORKDIR/config.json``, the metric writer, progress bar, preemption watch (here: SIGTERM in
   one process, JAX's preemption sync point across processes) and periodic sampler;
4. :class:`~mmada_jax.train.loop.StepLoop`: the steps (first batch checked against the stage's
   batch spec, step compiled ahead of time, metrics one step behind through
   :class:`~mmada_jax.train.metrics.StepMetrics`), saves every ``checkpoint_every`` steps, at the
   end, on preemption and when the data runs out; a non-finite loss stops the run before
   anything after the last good step is saved;
5. pending saves are waited for and everything is closed.

Returns the process exit code (0: finished, preempted-and-saved, or data exhausted; 3: non-finite
loss). ``WORKDIR/status.json`` records which ('finished', 'preempted', 'data_exhausted',
'nonfinite') and the step.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import jax
from ml_collections import ConfigDict

from mmada_jax.train import metrics as metrics_lib
from mmada_jax.train.config import model_config  # noqa: F401  (re-exported: commands build the model config)
from mmada_jax.train.config_files import load_config_file  # noqa: F401  (the --config= loader)
from mmada_jax.train.loop import StepLoop
from mmada_jax.train.metrics import NonFiniteLoss, StepMetrics
from mmada_jax.train.run_setup import restore_or_init, run_meta, setup

EXIT_OK, EXIT_NONFINITE = 0, 3


def preemption_sync_unavailable() -> str | None:
  """Why JAX's multi-process preemption sync point cannot be used in this process, or None."""
  if not jax.config.jax_enable_preemption_service:
    return "the jax_enable_preemption_service option is off"
  from jax._src import distributed as jax_distributed
  if getattr(jax_distributed.global_state, "preemption_sync_manager", None) is None:
    return "jax.distributed.initialize did not start JAX's preemption sync manager"
  return None


class _Preemption:
  """SIGTERM → flag (single process); multi-process runs use JAX's preemption sync point, whose
  availability is decided (and said) once at start-up."""

  def __init__(self, say: Callable[[str], None]) -> None:
    self.flag = False
    self.multi = jax.process_count() > 1
    self.sync = False
    self._old = None
    if not self.multi:
      self._old = signal.signal(signal.SIGTERM, self._handler)
      return
    why = preemption_sync_unavailable()
    self.sync = why is None
    if why is not None:
      say(f"preemption handling is off: {why}; a preempted multi-process run resumes from its last "
          "regular checkpoint")

  def _handler(self, signum, frame):
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if self.multi:
      if not self.sync:
        return False
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.flag

  def restore(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def run(config: ConfigDict, workdir: str) -> int:
  """Trains per ``config`` in ``workdir``; returns the exit code (module docstring)."""
  t_setup = time.perf_counter()
  r = setup(config, workdir)
  start = restore_or_init(r)
  meta = run_meta(r, start.step, start.lora_meta)
  if r.is_main:
    with open(os.path.join(r.workdir, "config.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
  writer = metrics_lib.MetricWriter(r.workdir, start.step, enabled=r.is_main, tensorboard=bool(config.tensorboard))
  progress = metrics_lib.Progress(r.total, start.step, enabled=r.is_main and bool(config.progress_bar))
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, float(config.peak_flops_per_device))
  metrics = StepMetrics(r.model_cfg, writer, progress, total=r.total, log_every=int(config.log_every),
                        start=start.step, peak_flops=peak, devices=jax.device_count(),
                        frozen_base=int(config.lora.rank) > 0)
  preempt = _Preemption(r.say)
  code = EXIT_OK
  try:
    sampler = None
    if int(config.sampling.every) > 0:
      from mmada_jax.train.samples import make_sampler
      sampler = make_sampler(config, r.model_cfg, r.mesh, r.workdir, writer, progress.write)
      if sampler is not None and r.lora is not None:   # LoRA: the state holds adapters; sample base ∪ adapters
        sample, plan, base = sampler, r.lora, start.frozen["base"]
        sampler = lambda adapters, step: sample(plan.compose(base, adapters), step)  # noqa: E731
    r.times.add("setup", time.perf_counter() - t_setup)
    StepLoop(r, start, metrics, preempt, sampler, progress.write, meta).run()
  except NonFiniteLoss as e:
    code = EXIT_NONFINITE
    r.ckpt.wait()
    done = r.ckpt.all_steps()
    msg = (f"{e}\nstopping: nothing after step {metrics.last_good} is saved; the last good checkpoint is "
           f"{'step ' + str(done[-1]) if done else 'none'} in {r.ckpt.directory}")
    progress.write(msg)
    r.write_status("nonfinite", metrics.last_good)
  finally:
    preempt.restore()
    r.ckpt.close()
    progress.close()
    writer.close()
  return code

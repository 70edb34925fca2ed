"""The step loop: :class:`StepLoop` runs a :class:`~mmada_jax.train.run_setup.RunSetup` from its
:class:`~mmada_jax.train.run_setup.Start` to ``config.steps``.

Per step: host batch → ``stage.pre_step`` (if any) → the first batch checked against the stage's
batch spec → ``sharding.to_global`` (gradient-accumulation layout) → the compiled step (jitted and
AOT-compiled on the first batch, memory analysis logged) → metrics queued one step behind
(:class:`~mmada_jax.train.metrics.StepMetrics`), with the data iterator's own host counters where it
has a ``metrics()`` method (:class:`DataMetrics`; the records pipeline's per-source rows
``data/<task>/<source>``, UniGRPO's ``time/*``), read right after the step's batch and ``pre_step``. A checkpoint (state + data-iterator state) every
``checkpoint_every`` steps and at the end; samples every ``sampling.every`` steps. The loop stops
early on a preemption signal (saved, then waited for) or when the data iterator is exhausted
(saved). Every stop writes ``status.json``; a non-finite loss raises
:class:`~mmada_jax.train.metrics.NonFiniteLoss` before anything after the last good step is saved.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

from mmada_jax.sharding import to_global, use_sharding
from mmada_jax.train.metrics import StepMetrics
from mmada_jax.train.run_setup import RunSetup, Start
from mmada_jax.train.stages import StepContext, check_batch
from mmada_jax.train.state import TrainState
from mmada_jax.train.step import jit_step, make_step_fn


class Preemption(Protocol):
  """Whether the run must stop (and save) before step ``step``."""

  def reached(self, step: int) -> bool: ...


@runtime_checkable
class DataMetrics(Protocol):
  """A data iterator that reports host-side scalars (e.g. rows per source so far) after each batch;
  they resume with its state and are written with that step's metrics."""

  def metrics(self) -> dict[str, float]: ...


class StepLoop:
  """The run's steps from ``start``; :meth:`run` steps until the end, a preemption or the end of
  the data. ``sampler(params, step)``: periodic samples (None = off); ``say``: the progress
  bar's message line; ``meta``: :func:`~mmada_jax.train.run_setup.run_meta`, saved with every
  checkpoint."""

  def __init__(self, run: RunSetup, start: Start, metrics: StepMetrics, preemption: Preemption,
               sampler: Callable[[Any, int], None] | None, say: Callable[[str], None], meta: dict) -> None:
    self.r, self.metrics, self.preemption, self.sampler, self.say, self.meta = (
        run, metrics, preemption, sampler, say, meta)
    self.state: TrainState = start.state
    self.frozen = start.frozen
    self.step = start.step
    self.last_saved = start.step if start.resumed else -1
    self.step_fn = make_step_fn(run.stage, run.tx, run.schedule, run.shardings.params)
    self.compiled = None

  def run(self) -> None:
    """Steps until ``config.steps`` (saved, status 'finished'), a preemption ('preempted') or the
    end of the data ('data_exhausted')."""
    r = self.r
    with use_sharding(r.shard_ctx):
      while self.step < r.total:
        if self.preemption.reached(self.step):
          self._stop_preempted()
          break
        try:
          with r.times.phase("data"):
            host_batch = next(r.data_iter)
        except StopIteration:
          self._stop_exhausted()
          break
        self._train_step(host_batch)
        self._after_step()
      with r.times.phase("step"):
        self.metrics.flush()
      if self.step == r.total:
        self.save(self.step)
        with r.times.phase("checkpoint"):
          r.ckpt.wait()       # "finished" only once the last checkpoint is on disk
        r.write_status("finished", self.step)

  def save(self, step: int) -> None:
    """A checkpoint of the current state at ``step`` (once per step; queued metrics first, so a
    non-finite step is never saved)."""
    if step == self.last_saved:
      return
    with self.r.times.phase("step"):
      self.metrics.flush()
    with self.r.times.phase("checkpoint"):
      self.r.ckpt.save(step, self.state, self.r.data_iter.get_state(), dict(self.meta, step=step))
    self.last_saved = step

  def _train_step(self, host_batch: Any) -> None:
    r = self.r
    if r.stage.pre_step is not None:
      ctx = StepContext(self.state, self.step, r.mesh, r.config, r.model_cfg, self.frozen)
      with r.times.phase("pre_step"):
        host_batch = r.stage.pre_step(ctx, host_batch)
    data_metrics = _data_metrics(r.data_iter)   # after pre_step: its host scalars (UniGRPO's time/*) too
    if self.compiled is None:   # the first batch must be what the stage declared
      check_batch(host_batch, r.stage.batch_spec(), jax.process_count(), r.grad_accum,
                  f"stage {r.stage.name!r}: the first batch")
    rows, length = r.stage.sequences(host_batch)
    sequences = (rows * jax.process_count(), length)
    with r.times.phase("step"):
      batch = to_global(host_batch, r.shard_ctx, micro=r.grad_accum)
    if self.compiled is None:
      with r.times.phase("compile"):
        self.compiled = compile_step(self.step_fn, r.shardings, self.state, batch, self.frozen, r.mesh, self.say)
    with r.times.phase("step"):
      self.state, metrics = self.compiled(self.state, batch, self.frozen)
      self.step += 1
      self.metrics.add(self.step, metrics, sequences, data_metrics)

  def _after_step(self) -> None:
    config, step = self.r.config, self.step
    every = int(config.checkpoint_every)
    if (every and step % every == 0) or step == self.r.total:
      self.save(step)
    if self.sampler is not None and step % int(config.sampling.every) == 0:
      self.metrics.flush()
      with self.r.times.phase("sampling"):
        self.sampler(self.state.params, step)
      self.metrics.restart_window()  # sampling time is not training time

  def _stop_preempted(self) -> None:
    self.save(self.step)
    with self.r.times.phase("checkpoint"):
      self.r.ckpt.wait()
    self.say(f"preemption signal: saved a checkpoint at step {self.step} in {self.r.ckpt.directory}; "
             "rerun the same command to resume")
    self.r.write_status("preempted", self.step)

  def _stop_exhausted(self) -> None:
    self.save(self.step)
    self.say(f"the data iterator is exhausted after {self.step} steps (data.num_epochs); "
             f"saved a checkpoint at step {self.step}")
    self.r.write_status("data_exhausted", self.step)


def _data_metrics(data_iter: Any) -> dict[str, float]:
  """``data_iter.metrics()`` (:class:`DataMetrics`) now, or {} for an iterator without them."""
  return dict(data_iter.metrics()) if isinstance(data_iter, DataMetrics) else {}


def compile_step(step_fn: Callable, shardings: TrainState, state: TrainState, batch: Any, frozen: Any,
                 mesh: jax.sharding.Mesh, say: Callable[[str], None]) -> Any:
  """``step_fn`` jitted (:func:`~mmada_jax.train.step.jit_step`) and compiled for these
  arguments; says the compile time and the per-device memory where the backend reports it."""
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

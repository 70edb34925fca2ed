"""What the user sees: MFU estimate, metrics.jsonl, TensorBoard events and the progress bar.

Model FLOPs per step (the usual 6ND + attention convention; remat recomputation not counted)::

  flops = 6 · N_mm · T  +  12 · n_layers · L² · d_model · R       (LoRA: 4 · N_mm · T, frozen base)

with R sequences of length L per optimizer step (all micro-batches), T = R·L tokens, and
N_mm the parameters used in matmuls (all parameters minus the embedding table, whose lookup is a
gather, and the norm weights). The attention term is QKᵀ and AV (2·2·L²·d per layer forward)
times 3 for forward + backward. MFU = flops / (step_time · n_devices · peak_flops_per_device),
with the dense bf16 peak of :data:`mmada_jax.train.chips.CHIPS` looked up by ``device_kind``; an
unknown device (e.g. CPU) has no MFU unless ``config.peak_flops_per_device`` is set.

:class:`StepMetrics` is the loop's accumulator (one step behind, throughput window, non-finite
stop, logging cadence); :class:`MetricWriter` and :class:`Progress` are where its lines go.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.train.chips import find_chip


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """``override`` when positive, else the dense bf16 peak of ``device_kind`` in
  :data:`mmada_jax.train.chips.CHIPS`, else None (no MFU)."""
  if override and override > 0:
    return float(override)
  chip = find_chip(device_kind)
  return None if chip is None else chip.peak_flops


def peak_device_memory_bytes() -> int | None:
  """Largest ``memory_stats()['peak_bytes_in_use']`` over this process's devices (bytes), or None
  where the backend keeps no statistics (CPU)."""
  vals = []
  for d in jax.local_devices():
    try:
      v = (d.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - backends without memory statistics
      v = None
    if v is not None:
      vals.append(int(v))
  return max(vals) if vals else None


def matmul_params(cfg: MMaDAConfig) -> int:
  norms = 2 * cfg.n_layers * cfg.d_model + cfg.d_model
  return cfg.num_params() - cfg.vocab_size * cfg.d_model - norms


def flops_per_step(cfg: MMaDAConfig, sequences: int, length: int, frozen_base: bool = False) -> float:
  """Model FLOPs of one optimizer step over ``sequences`` rows of ``length`` tokens;
  ``frozen_base`` (LoRA): 4 instead of 6 per matmul parameter and token (the frozen base gets no
  weight gradients; the adapters' FLOPs are neglected)."""
  tokens = sequences * length
  per = 4.0 if frozen_base else 6.0
  return per * matmul_params(cfg) * tokens + 12.0 * cfg.n_layers * length ** 2 * cfg.d_model * sequences


class PhaseTimes:
  """Wall seconds the trainer's thread spends in each phase of a run (``status.json``'s
  ``timings_s``): ``setup`` (processes, mesh, data pipeline, init or restore, sampler), ``compile``,
  ``data`` (the next host batch), ``pre_step`` (UniGRPO rollouts, rewards, old/reference
  log-probs), ``step`` (transfer, dispatch and waiting for the device: metrics are read one step
  behind), ``checkpoint`` (saves and waiting for their asynchronous writes), ``sampling``. The
  device runs asynchronously, so a phase counts where the thread waited, not where the device
  computed."""

  PHASES = ("setup", "compile", "data", "pre_step", "step", "checkpoint", "sampling")

  def __init__(self) -> None:
    self.seconds = {k: 0.0 for k in self.PHASES}

  def add(self, phase: str, seconds: float) -> None:
    if phase not in self.seconds:
      raise KeyError(f"unknown phase {phase!r}; expected one of {self.PHASES}")
    self.seconds[phase] += float(seconds)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """``with times.phase("data"): ...`` adds the block's wall seconds to ``name``."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t0)

  def as_dict(self) -> dict[str, float]:
    return {k: round(v, 3) for k, v in self.seconds.items()}


class NonFiniteLoss(RuntimeError):
  """A step's loss or gradient norm is NaN or infinite (the run stops before saving it)."""


class StepMetrics:
  """The step metrics of the loop, read one step behind so the host never waits on the device.

  :meth:`add` queues a step's device metrics and handles every queued step but the newest;
  :meth:`flush` handles them all. Handling a step: to host floats; a non-finite ``loss`` or
  ``grad_norm`` raises :class:`NonFiniteLoss`; throughput over the window since the last
  written line (the first handled step only opens the window): ``steps_per_sec``,
  ``tokens_per_sec`` and, with a peak, ``mfu``; the step's host scalars (``data``, e.g. the
  ``data/<task>/<source>`` row counters) merged in as they were at that step; the progress bar every step; ``metrics.jsonl`` /
  TensorBoard every ``log_every`` steps and at ``total``, which also restarts the window.
  ``last_good``: the newest step whose metrics were finite (the start step before any).
  """

  def __init__(self, model_cfg: MMaDAConfig, writer: "MetricWriter", progress: "Progress", *, total: int,
               log_every: int, start: int, peak_flops: float | None, devices: int,
               frozen_base: bool = False) -> None:
    self.model_cfg, self.writer, self.progress = model_cfg, writer, progress
    self.frozen_base = frozen_base
    self.total, self.log_every = total, log_every
    self.peak_flops, self.devices = peak_flops, devices
    self.last_good = start
    self._pending: list[tuple[int, Any, tuple[int, int], dict[str, float]]] = []
    self.restart_window()

  def restart_window(self) -> None:
    """Forgets the time since the last line (e.g. sampling time, which is not training time)."""
    self._open_window(None)

  def _open_window(self, t: float | None) -> None:
    self._t = t
    self._steps, self._tokens, self._flops = 0, 0, 0.0

  def add(self, step: int, metrics: Any, sequences: tuple[int, int], data: dict[str, float] | None = None) -> None:
    """Queues step ``step``'s device metrics (global ``(rows, length)``) and host scalars ``data``;
    handles older steps."""
    self._pending.append((step, metrics, sequences, dict(data or {})))
    while len(self._pending) > 1:
      self._handle(*self._pending.pop(0))

  def flush(self) -> None:
    """Handles every queued step."""
    while self._pending:
      self._handle(*self._pending.pop(0))

  def _handle(self, step: int, metrics: Any, sequences: tuple[int, int], data: dict[str, float]) -> None:
    rows, length = sequences
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m):
      raise NonFiniteLoss(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in m.items()))
    m.update(data)
    self.last_good = step
    now = time.perf_counter()
    if self._t is None:
      self._t = now
    else:
      self._steps += 1
      self._tokens += rows * length
      self._flops += flops_per_step(self.model_cfg, rows, length, self.frozen_base)
    elapsed = now - self._t
    if self._steps and elapsed > 0:
      m["steps_per_sec"] = self._steps / elapsed
      m["tokens_per_sec"] = self._tokens / elapsed
      if self.peak_flops:
        m["mfu"] = self._flops / elapsed / (self.peak_flops * self.devices)
    self.progress.update(m)
    if step % self.log_every == 0 or step == self.total:
      self.writer.write(step, m)
      self._open_window(now)


class MetricWriter:
  """metrics.jsonl + TensorBoard (process 0 only; other processes write nothing)."""

  def __init__(self, workdir: str, start_step: int, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)

  def _truncate_after(self, step: int) -> None:
    """Drops lines logged after ``step`` by an earlier, interrupted run (they are re-logged)."""
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line).get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
          break  # a torn last line of a killed run
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          prefix = "perf/" if k in PERF_KEYS else "" if "/" in k else "train/"  # data/<task>/<source> as is
          self.tb.add_scalar(prefix + k, v, step)
      self.tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self.tb is not None:
      self.tb.add_text(tag, text, step)

  def write_image(self, step: int, tag: str, image_hwc) -> None:
    if self.enabled and self.tb is not None:
      self.tb.add_image(tag, image_hwc, step, dataformats="HWC")

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


PERF_KEYS = ("steps_per_sec", "tokens_per_sec", "mfu", "step_time")


def _jsonable(v: Any):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class Progress:
  """A tqdm bar (process 0) showing step/s, tokens/s, MFU and per-task losses."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                      file=sys.stderr, mininterval=0.5, smoothing=0.1)

  def update(self, scalars: dict[str, float]) -> None:
    if self.bar is None:
      return
    post = {}
    for key, short in (("loss", "loss"), ("loss_t2i", "t2i"), ("loss_lm", "lm"), ("loss_mmu", "mmu")):
      if key in scalars:
        post[short] = f"{scalars[key]:.4f}"
    if "tokens_per_sec" in scalars:
      post["tok/s"] = f"{scalars['tokens_per_sec']:.3g}"
    if "mfu" in scalars:
      post["mfu"] = f"{100 * scalars['mfu']:.1f}%"
    self.bar.set_postfix(post, refresh=False)
    self.bar.update(1)

  def write(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg, file=sys.stderr)
    elif jax.process_index() == 0:
      print(msg, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

"""What the user sees: MFU estimate, metrics.jsonl, TensorBoard events and the progress bar.

Model FLOPs per step (the usual 6ND + attention convention; remat recomputation not counted)::

  flops = 6 · N_mm · T  +  12 · n_layers · L² · d_model · R

with R sequences of length L per optimizer step (all micro-batches), T = R·L tokens, and
N_mm the parameters used in matmuls (all parameters minus the embedding table, whose lookup is a
gather, and the norm weights). The attention term is QKᵀ and AV (2·2·L²·d per layer forward)
times 3 for forward + backward. MFU = flops / (step_time · n_devices · peak_flops_per_device),
with the dense bf16 peak of :data:`PEAK_FLOPS` looked up by ``device_kind``; an unknown device
(e.g. CPU) has no MFU unless ``config.peak_flops_per_device`` is set.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from mmada_jax.model.config import MMaDAConfig

# Dense bf16 peak FLOP/s per JAX device, matched as substrings of device_kind (first match wins).
# TPU v2/v3 expose one device per core, v4 and later one per chip.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4 lite", 137.5e12), ("TPU v4", 275e12),
    ("TPU v3", 61.5e12), ("TPU v2", 22.5e12),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  if override and override > 0:
    return float(override)
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


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


def flops_per_step(cfg: MMaDAConfig, sequences: int, length: int) -> float:
  """Model FLOPs of one optimizer step over ``sequences`` rows of ``length`` tokens."""
  tokens = sequences * length
  return 6.0 * matmul_params(cfg) * tokens + 12.0 * cfg.n_layers * length ** 2 * cfg.d_model * sequences


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
          prefix = "perf/" if k in PERF_KEYS else "train/"
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

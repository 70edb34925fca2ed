"""Per-device peaks of the accelerators the project knows: the one table of them.

Read by the trainer's MFU (:func:`mmada_jax.train.metrics.peak_flops_per_device`), ``bench/``, and
the AOT command's TPU generations (:data:`mmada_jax.aot.topology.GENERATIONS`, which take their
FLOP/s, HBM and bandwidth from here).

A :class:`Chip` row holds the dense bf16 peak FLOP/s of one JAX device, and its HBM capacity and
bandwidth where the project uses them (the TPUs AOT compiles for; None elsewhere). A device is
found by :func:`find_chip`: each of a row's ``device_kinds`` is matched as a case-insensitive
substring of ``jax.Device.device_kind``, rows and names in table order, the first match wins (so a
more specific name precedes one it contains, e.g. ``TPU v5 lite`` before ``TPU v5``). TPU v2/v3
expose one device per core, v4 and later one per chip.
"""
from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: the device kinds it reports, dense bf16 FLOP/s per device, and (where
  known) HBM bytes and HBM bytes/s per device."""
  device_kinds: tuple[str, ...]
  peak_flops: float
  hbm_bytes: int | None = None
  hbm_bandwidth: float | None = None


CHIPS: tuple[Chip, ...] = (
    Chip(("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 1640e9),
    Chip(("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 819e9),
    Chip(("TPU v5p", "TPU v5"), 459e12, 95 * GIB, 2765e9),
    Chip(("TPU v4 lite",), 137.5e12),
    Chip(("TPU v4",), 275e12, 32 * GIB, 1228e9),
    Chip(("TPU v3",), 61.5e12),
    Chip(("TPU v2",), 22.5e12),
    Chip(("H200",), 989e12),
    Chip(("H100 PCIe",), 756e12),
    Chip(("H100", "GH200"), 989e12),
    Chip(("B200",), 2250e12),
    Chip(("A100",), 312e12),
    Chip(("L40S",), 362e12),
    Chip(("L4",), 121e12),
    Chip(("A10G",), 70e12),
)


def find_chip(device_kind: str) -> Chip | None:
  """The first row of :data:`CHIPS` with a name contained in ``device_kind``, or None."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(name.lower() in kind for name in chip.device_kinds):
      return chip
  return None

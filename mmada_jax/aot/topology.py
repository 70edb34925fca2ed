"""TPU slices for AOT compiles: generations, topology names, abstract devices.

A generation's per-chip peak FLOP/s, HBM and HBM bandwidth are its row of the one chip table,
:data:`mmada_jax.train.chips.CHIPS` (looked up by the generation's ``device_kind``).
``parse_topology("v5p-128")`` / ``parse_topology("v5p:4x4x4")`` -> :class:`Topology`, whose
``devices()`` are libtpu's abstract devices of that slice (no TPU needed, only the wheel).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mmada_jax.train.chips import GIB, Chip, find_chip  # noqa: F401  (GIB: used by the aot modules)


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation. ``alias_counts_cores``: the accelerator type's number counts TensorCores
  (v4-N, v5p-N = N/2 chips), else chips (v5litepod-N, v6e-N). ``device_kind``: the jax device
  kind of its abstract devices, which names its :attr:`chip` (peak FLOP/s, HBM, bandwidth)."""
  name: str
  ndim: int                  # torus dimensions of the topology name
  alias_counts_cores: bool
  device_kind: str
  chip_config_name: str = "default"
  chip: Chip = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    chip = find_chip(self.device_kind)
    if chip is None or chip.hbm_bytes is None or chip.hbm_bandwidth is None:
      raise ValueError(f"TPU generation {self.name}: mmada_jax.train.chips.CHIPS has no peak FLOP/s, HBM and "
                       f"bandwidth for device kind {self.device_kind!r}")
    object.__setattr__(self, "chip", chip)

  @property
  def peak_flops(self) -> float:
    """Dense bf16 FLOP/s per chip."""
    return self.chip.peak_flops

  @property
  def hbm_bytes(self) -> int:
    """HBM bytes per chip."""
    return self.chip.hbm_bytes

  @property
  def hbm_bandwidth(self) -> float:
    """HBM bytes/s per chip."""
    return self.chip.hbm_bandwidth


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 3, True, "TPU v4", "megacore"),
    "v5p": Generation("v5p", 3, True, "TPU v5"),
    "v5e": Generation("v5e", 2, False, "TPU v5 lite"),
    "v6e": Generation("v6e", 2, False, "TPU v6 lite"),
}
_GEN_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
# Default slice shapes for accelerator-type aliases (chips -> topology).
_SHAPES_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
              4096: (16, 16, 16), 6144: (16, 16, 24)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice: generation and chip grid (``v5p:4x4x4``)."""
  gen: Generation
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.gen.name}:{'x'.join(map(str, self.dims))}"

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips per host VM: 2x2x1 for multi-host slices of every generation; v5e/v6e 8-chip
    slices (2x4) are one 8-chip host; a grid smaller than a host is one host."""
    d = tuple(self.dims) + (1,) * (3 - len(self.dims))
    if self.gen.ndim == 2 and self.chips == 8:
      return (d[0], d[1], 1)
    return (min(d[0], 2), min(d[1], 2), 1)

  def devices(self) -> list[Any]:
    import os
    # Describing a topology never claims a chip: let this process load libtpu even while another
    # process (a run on this host, another AOT compile) holds libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=self.name, chip_config_name=self.gen.chip_config_name,
        chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1)
    devs = list(desc.devices)
    if len(devs) != self.chips:
      raise RuntimeError(f"topology {self.name}: libtpu returned {len(devs)} devices for {self.chips} chips")
    return devs


def parse_topology(spec: str) -> Topology:
  """``v5p:4x4x4`` / ``v5e:16x16`` / ``v6e:8x8``, or an accelerator type ``v5p-128`` (cores:
  64 chips), ``v4-64`` (cores), ``v5litepod-256`` / ``v5e-256`` / ``v6e-64`` (chips)."""
  s = spec.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", s)
  if m:
    gen = _generation(m.group(1), spec)
    dims = tuple(int(x) for x in m.group(2).split("x"))
    if len(dims) != gen.ndim or min(dims) < 1:
      raise ValueError(f"topology {spec!r}: {gen.name} grids have {gen.ndim} dimensions, e.g. "
                       f"{gen.name}:{'x'.join(['4'] * gen.ndim)}")
    return Topology(gen, dims)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
  if not m:
    raise ValueError(f"topology {spec!r}: expected e.g. v5p:4x4x4, v5e:16x16, v6e:8x8 or v5p-128, v6e-64")
  gen = _generation(m.group(1), spec)
  n = int(m.group(2))
  chips = n // 2 if gen.alias_counts_cores else n
  if gen.alias_counts_cores and n % 2:
    raise ValueError(f"topology {spec!r}: {gen.name}-N counts TensorCores (2 per chip); N must be even")
  shapes = _SHAPES_3D if gen.ndim == 3 else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(f"topology {spec!r} ({chips} chips): no default slice shape; give it as "
                     f"{gen.name}:AxB{'xC' if gen.ndim == 3 else ''}")
  return Topology(gen, shapes[chips])


def _generation(word: str, spec: str) -> Generation:
  key = _GEN_ALIASES.get(word, word)
  if key not in GENERATIONS:
    raise ValueError(f"topology {spec!r}: unknown TPU generation {word!r}; known: {sorted(GENERATIONS)}")
  return GENERATIONS[key]

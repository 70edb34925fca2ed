"""Logical axis names → mesh axes (data / fsdp / tensor), and the named rule presets.

Model code names every parameter and main activation dimension with a *logical* axis
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``batch``,
``length`` and the activation names ``act_*``). A rule table maps each logical name to a mesh
axis, a tuple of mesh axes, or ``None`` (replicated). A dimension that does not divide by the
mesh axes it maps to is replicated over them instead (e.g. 4 kv heads on an 8-way tensor axis);
that is logged once per (logical name, size, mesh axes) as a warning on the
``mmada_jax.sharding`` logger.

Presets (``config.sharding_preset``; ``config.sharding_rules`` overrides entries of the preset):

- ``fsdp_tp`` (default, ``DEFAULT_RULES``): batch over ``data×fsdp``; weights' ``embed`` dim
  over ``fsdp`` (ZeRO-3 style), their ``vocab/heads/kv_heads/mlp`` dims and the matching
  activations over ``tensor`` (Megatron tensor parallelism). Weights are replicated over
  ``data``.
- ``fsdp``: pure FSDP: batch over ``data×fsdp``, weights' ``embed`` over ``fsdp``, nothing over
  ``tensor`` (use a mesh with ``tensor=1``; a larger tensor axis would only repeat work).
- ``hsdp``: hybrid sharded data parallelism for multi-slice runs: ``data`` is the replica axis
  across slices (only the gradient all-reduce crosses it; weights and optimizer state are
  replicated over it), and within a slice ``fsdp×tensor`` together form one FSDP group: batch over
  ``data×fsdp×tensor``, weights' ``embed`` over ``fsdp×tensor``, no tensor parallelism.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_NO_TENSOR = {"vocab": None, "heads": None, "kv_heads": None, "mlp": None, "act_heads": None,
              "act_kv_heads": None, "act_mlp": None, "act_vocab": None}
_HSDP = dict(_NO_TENSOR, batch=("data", "fsdp", "tensor"), embed=("fsdp", "tensor"))
PRESETS: dict[str, Rules] = {
    "fsdp_tp": DEFAULT_RULES,
    "fsdp": tuple((k, _NO_TENSOR.get(k, v)) for k, v in DEFAULT_RULES),
    "hsdp": tuple((k, _HSDP.get(k, v)) for k, v in DEFAULT_RULES),
}
DEFAULT_PRESET = "fsdp_tp"

log = logging.getLogger("mmada_jax.sharding")
_warned: set[tuple[str, int, tuple[str, ...]]] = set()


def _warn_replicated(name: str, size: int, axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> None:
  """Logs (once per name, size and axes) that a dimension is replicated because it does not divide."""
  key = (name, int(size), axes)
  if key in _warned:
    return
  _warned.add(key)
  sizes = ", ".join(f"{a}={mesh_shape[a]}" for a in axes)
  log.warning("sharding: logical axis %r of size %d does not divide mesh axes %s (%s); that dimension "
              "is replicated over %s", name, size, "+".join(axes), sizes, "them" if len(axes) > 1 else "it")


def parse_rules(overrides: str = "", preset: str | Rules = DEFAULT_PRESET) -> Rules:
  """The ``preset``'s rules (a name in ``PRESETS`` or a rules tuple) with ``"logical=axis[+axis],..."``
  overrides applied (``none`` = replicated), e.g. ``"vocab=none,batch=data+fsdp"``."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown sharding preset {preset!r}; presets are {sorted(PRESETS)}")
    preset = PRESETS[preset]
  rules = dict(preset)
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


def rules_dict(rules: Rules | Mapping[str, Any] | None) -> dict[str, Any]:
  if rules is None:
    return dict(DEFAULT_RULES)
  return dict(rules.items() if isinstance(rules, Mapping) else rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules | Mapping[str, Any] | None = None,
                    mesh_shape: Mapping[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for a tensor whose dims carry logical ``names``.

  Mesh axes absent from ``mesh_shape``, already used by an earlier dim, or that do not divide
  the dim size are dropped (that part of the dim stays replicated).
  """
  table = rules_dict(rules)
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)} (rank {len(shape)})")
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table[name]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    dropped = []
    for ax in axes:
      if mesh_shape is not None and ax not in mesh_shape:
        continue
      if ax in used:
        continue
      size = 1 if mesh_shape is None else mesh_shape[ax]
      if shape is not None and mesh_shape is not None:
        total = math.prod(mesh_shape[a] for a in kept) * size
        if shape[i] % total:
          if size > 1:
            dropped.append(ax)
          continue
      kept.append(ax)
    if dropped:
      _warn_replicated(name, shape[i], tuple(dropped), mesh_shape)
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def param_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given their logical axes
  (``ShardingContext(mesh, rules).param_shardings``)."""
  from mmada_jax.sharding.context import ShardingContext
  return ShardingContext(mesh, rules).param_shardings(axes_tree, shapes_tree)


def shard_params(params: Any, axes_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Places ``params`` on ``mesh`` according to their logical axes (``ShardingContext.place``)."""
  from mmada_jax.sharding.context import ShardingContext
  return ShardingContext(mesh, rules).place(params, axes_tree)


def parse_mesh_shape(spec: str | Mapping[str, int] | Sequence[tuple[str, int]] | None,
                     n_devices: int) -> dict[str, int]:
  """Parses ``"fsdp=4,tensor=2"`` (or a dict) into sizes for (data, fsdp, tensor).

  Missing axes are 1, except that one axis given as -1 absorbs the remaining devices; with no
  -1 and a product smaller than the device count, ``fsdp`` absorbs them.
  """
  if spec is None or spec == "":
    items: dict[str, int] = {}
  elif isinstance(spec, str):
    items = {}
    for part in spec.split(","):
      part = part.strip()
      if not part:
        continue
      if "=" not in part:
        raise ValueError(f"mesh shape entry {part!r} is not of the form axis=size (in {spec!r})")
      k, v = part.split("=", 1)
      items[k.strip()] = int(v)
  else:
    items = dict(spec.items() if isinstance(spec, Mapping) else spec)
  for k in items:
    if k not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {k!r}; axes are {MESH_AXES}")
  sizes = {a: int(items.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  if free:
    if n_devices % fixed:
      raise ValueError(f"{n_devices} devices cannot be split as {sizes}")
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    if "fsdp" not in items and n_devices % fixed == 0:
      sizes["fsdp"] = n_devices // fixed
    else:
      raise ValueError(f"mesh {sizes} uses {fixed} devices but {n_devices} are available")
  return sizes


def make_mesh(shape: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation) over ``devices``
  (default: all), laid out physically by ``jax.make_mesh`` (also for abstract TPU devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)

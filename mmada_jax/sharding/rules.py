"""Logical axis names → mesh axes (data / fsdp / tensor).

Model code names every parameter and main activation dimension with a *logical* axis
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``layers``, ``batch``,
``length`` and the activation names ``act_*``). A rule table maps each logical name to a mesh
axis, a tuple of mesh axes, or ``None`` (replicated). A dimension that does not divide by the
mesh axes it maps to is replicated instead (e.g. 4 kv heads on an 8-way tensor axis).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
    for ax in axes:
      if mesh_shape is not None and ax not in mesh_shape:
        continue
      if ax in used:
        continue
      size = 1 if mesh_shape is None else mesh_shape[ax]
      if shape is not None and mesh_shape is not None:
        total = math.prod(mesh_shape[a] for a in kept) * size
        if shape[i] % total:
          continue
      kept.append(ax)
    used.update(kept)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(names, rules, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given their logical axes."""
  mesh_shape = dict(mesh.shape)
  return jax.tree.map(
      lambda names, leaf: NamedSharding(mesh, logical_to_spec(names, rules, mesh_shape, leaf.shape)),
      axes_tree, shapes_tree, is_leaf=lambda t: isinstance(t, tuple))


def shard_params(params: Any, axes_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Places ``params`` on ``mesh`` according to their logical axes, leaf by leaf."""
  shardings = param_shardings(axes_tree, params, mesh, rules)
  return jax.tree.map(jax.device_put, params, shardings)


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

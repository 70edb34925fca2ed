"""What the sharding rules do to a model on a mesh, from shapes alone (the golden sharding dumps).

``sharding_report(model_cfg, mesh_shape, preset, overrides)`` lists every parameter's path →
(shape, logical axes, PartitionSpec) and every activation constraint (``constrain``) that an
abstract trace of ``transformer.forward`` applies (logical names, shape, spec, how many times),
on an ``AbstractMesh`` of ``mesh_shape``: ``jax.eval_shape`` only, no devices, no arrays, so a
64-chip mesh is checked on a laptop. ``tests/test_sharding_golden.py`` compares the reports of
the tiny and 8B configs with ``tests/golden/sharding_*.json``.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import MESH_AXES, ShardingContext, record_constraints, use_sharding


def spec_json(spec: P) -> list[Any]:
  """PartitionSpec → JSON: ``None`` / axis name / list of axis names per dim."""
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def abstract_mesh(mesh_shape: Mapping[str, int]) -> AbstractMesh:
  """An ``AbstractMesh`` over (data, fsdp, tensor) (absent axes: 1)."""
  bad = sorted(set(mesh_shape) - set(MESH_AXES))
  if bad:
    raise ValueError(f"unknown mesh axes {bad}; axes are {MESH_AXES}")
  sizes = tuple(int(mesh_shape.get(a, 1)) for a in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive, got {dict(mesh_shape)}")
  return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sharding_report(model_cfg: MMaDAConfig, mesh_shape: Mapping[str, int], preset: str = "fsdp_tp",
                    overrides: str = "", *, batch: int | None = None, length: int = 128) -> dict[str, Any]:
  """The resolved rules, parameter shardings and forward-pass activation constraints.

  Args:
    mesh_shape: e.g. ``{"fsdp": 16, "tensor": 4}`` (an abstract mesh: no devices needed).
    preset, overrides: as ``config.sharding_preset`` / ``config.sharding_rules``.
    batch, length: the traced ``input_ids`` [batch, length] (default batch: 2 rows per batch shard).

  Returns:
    JSON-ready ``{"case", "rules", "params": {path: {shape, axes, spec}}, "activations": [{names,
    shape, spec}, ...]}`` (activations: each distinct constraint once, in trace order).
  """
  mesh = abstract_mesh(mesh_shape)
  ctx = ShardingContext.create(mesh, preset, overrides)
  batch = 2 * ctx.ways("batch") if batch is None else int(batch)
  axes = transformer.param_axes(model_cfg)
  shapes = transformer.param_shapes(model_cfg)
  params = {}
  for path, names in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda t: isinstance(t, tuple))[0]:
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = _lookup(shapes, path)
    params[key] = {"shape": list(shape), "axes": list(names), "spec": spec_json(ctx.spec(names, shape))}

  pdt = jnp.dtype(model_cfg.param_dtype)
  structs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, pdt), shapes, is_leaf=lambda t: isinstance(t, tuple))
  ids = jax.ShapeDtypeStruct((batch, int(length)), jnp.int32)
  with use_sharding(ctx), record_constraints() as log:
    jax.eval_shape(lambda p, x: transformer.forward(p, model_cfg, x), structs, ids)
  acts: list[dict[str, Any]] = []
  for names, shape, spec in log:
    entry = {"names": list(names), "shape": list(shape), "spec": spec_json(spec)}
    if entry not in acts:
      acts.append(entry)
  return {"case": {"mesh_shape": {a: int(mesh.shape[a]) for a in MESH_AXES}, "preset": preset,
                   "overrides": overrides, "input_ids": [batch, int(length)]},
          "rules": [[k, list(v) if isinstance(v, tuple) else v] for k, v in ctx.rules],
          "params": params, "activations": acts}


def dumps_report(report: Mapping[str, Any]) -> str:
  """The report as JSON with one line per parameter, activation, rule and case field (diffable)."""
  lines = ["{"]
  keys = sorted(report)
  for i, key in enumerate(keys):
    value = report[key]
    if isinstance(value, Mapping):
      items = [f"  {json.dumps(k)}: {json.dumps(value[k], sort_keys=True)}" for k in sorted(value)]
      open_, close = "{", "}"
    else:
      items = [f"  {json.dumps(v, sort_keys=True)}" for v in value]
      open_, close = "[", "]"
    lines.append(f" {json.dumps(key)}: {open_}")
    lines.append(",\n".join(" " + it for it in items))
    lines.append(f" {close}{',' if i < len(keys) - 1 else ''}")
  lines.append("}")
  return "\n".join(lines) + "\n"


def _lookup(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[getattr(k, "key", k)]
  return tree


def diff_reports(want: Mapping[str, Any], got: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Human-readable differences ``path: want → got`` between two reports (empty: equal)."""
  out: list[str] = []
  if isinstance(want, Mapping) and isinstance(got, Mapping):
    for k in sorted(set(want) | set(got), key=str):
      p = f"{prefix}/{k}" if prefix else str(k)
      if k not in got:
        out.append(f"{p}: missing now (was {want[k]!r})")
      elif k not in want:
        out.append(f"{p}: new (now {got[k]!r})")
      else:
        out += diff_reports(want[k], got[k], p)
  elif (isinstance(want, list) and isinstance(got, list) and want and got
        and all(isinstance(x, Mapping) for x in want + got)):
    for i in range(max(len(want), len(got))):
      p = f"{prefix}[{i}]"
      if i >= len(got):
        out.append(f"{p}: missing now (was {want[i]!r})")
      elif i >= len(want):
        out.append(f"{p}: new (now {got[i]!r})")
      else:
        out += diff_reports(want[i], got[i], p)
  elif want != got:
    out.append(f"{prefix}: {want!r} → {got!r}")
  return out

"""The one sharding context of a run: a mesh plus its resolved logical-axis rules.

``ShardingContext.create(mesh, preset, overrides)`` resolves the rules once (``rules.PRESETS`` +
``config.sharding_rules``); ``use_sharding(ctx)`` installs the mesh (``jax.set_mesh``, or
``jax.sharding.use_abstract_mesh`` for an ``AbstractMesh``) and the rules (a contextvar) together,
so parameter placement, activation constraints (``constrain``), batch placement
(``sharding.transfer``) and AOT all read the same table. ``current()`` is the installed context
(outside any: no mesh, ``DEFAULT_RULES``).

Rules are read when a function is traced: ``jax.jit`` keys its cache on the mesh, not on the
rules, so install the context before the first call of a jitted function that uses them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.sharding.rules import (DEFAULT_PRESET, DEFAULT_RULES, Rules, logical_to_spec,
                                      parse_rules, rules_dict)

_CURRENT: contextvars.ContextVar["ShardingContext | None"] = contextvars.ContextVar(
    "mmada_sharding_context", default=None)
_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar(
    "mmada_sharding_recorders", default=())


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  """A mesh (``None``: single device, nothing placed) and its logical-axis rule table.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` (or an ``AbstractMesh`` for shape-only analyses), or None.
    rules: ``((logical_name, mesh_axis | (mesh_axes...) | None), ...)``.
  """
  mesh: Mesh | AbstractMesh | None
  rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple((str(k), v) for k, v in rules_dict(self.rules).items()))

  @classmethod
  def create(cls, mesh: Mesh | AbstractMesh | None, preset: str = DEFAULT_PRESET,
             overrides: str = "") -> "ShardingContext":
    """The context for ``mesh`` with ``preset``'s rules and ``"logical=axis[+axis],..."`` overrides."""
    return cls(mesh, parse_rules(overrides, preset))

  @property
  def mesh_shape(self) -> dict[str, int] | None:
    return None if self.mesh is None else dict(self.mesh.shape)

  def _need_mesh(self, what: str) -> Mesh | AbstractMesh:
    if self.mesh is None:
      raise ValueError(f"ShardingContext.{what} needs a mesh; this context has none")
    return self.mesh

  def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for dims named ``names`` (``shape`` given: indivisible dims replicated)."""
    return logical_to_spec(names, self.rules, self.mesh_shape, shape)

  def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on this context's mesh for dims named ``names``."""
    return NamedSharding(self._need_mesh("sharding"), self.spec(names, shape))

  def param_shardings(self, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs given their logical axes tree."""
    mesh = self._need_mesh("param_shardings")
    return jax.tree.map(lambda names, leaf: NamedSharding(mesh, self.spec(names, leaf.shape)),
                        axes_tree, shapes_tree, is_leaf=_is_axes)

  def place(self, tree: Any, axes_tree: Any) -> Any:
    """``jax.device_put`` of every leaf of ``tree`` by its logical axes in ``axes_tree``."""
    return jax.tree.map(jax.device_put, tree, self.param_shardings(axes_tree, tree))

  def ways(self, name: str) -> int:
    """How many ways the logical axis ``name`` is split on this mesh (1 without a mesh)."""
    shape = self.mesh_shape
    if shape is None:
      return 1
    entry = self.spec((name,))[0]
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return math.prod(shape[a] for a in axes)

  def describe(self) -> str:
    """The resolved rule table (one line per logical axis), for the start-up log."""
    shape = self.mesh_shape
    head = ("sharding: no mesh" if shape is None else
            "sharding: mesh " + " ".join(f"{a}={n}" for a, n in shape.items()))
    width = max(len(k) for k, _ in self.rules)
    lines = [head]
    for name, target in self.rules:
      axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
      if shape is not None:
        axes = tuple(a for a in axes if a in shape)
      if not axes:
        lines.append(f"  {name:<{width}} -> replicated")
        continue
      ways = "" if shape is None else f" ({math.prod(shape[a] for a in axes)}-way)"
      lines.append(f"  {name:<{width}} -> {'+'.join(axes)}{ways}")
    return "\n".join(lines)


def _is_axes(t: Any) -> bool:
  return isinstance(t, tuple) and all(n is None or isinstance(n, str) for n in t)


def current() -> ShardingContext:
  """The installed context; outside ``use_sharding``: no mesh and ``DEFAULT_RULES``."""
  ctx = _CURRENT.get()
  return ShardingContext(None, DEFAULT_RULES) if ctx is None else ctx


@contextlib.contextmanager
def use_sharding(ctx: ShardingContext) -> Iterator[ShardingContext]:
  """Installs ``ctx``'s mesh (as JAX's current mesh) and its rules for the ``with`` block."""
  if not isinstance(ctx, ShardingContext):
    raise TypeError(f"use_sharding needs a ShardingContext, got {type(ctx).__name__}")
  token = _CURRENT.set(ctx)
  try:
    if ctx.mesh is None:
      yield ctx
    elif isinstance(ctx.mesh, AbstractMesh):
      with jax.sharding.use_abstract_mesh(ctx.mesh):
        yield ctx
    else:
      with jax.set_mesh(ctx.mesh):
        yield ctx
  finally:
    _CURRENT.reset(token)


@contextlib.contextmanager
def record_constraints() -> Iterator[list[tuple[tuple[str | None, ...], tuple[int, ...], P]]]:
  """Collects ``(names, shape, spec)`` of every ``constrain`` applied (traced) inside the block."""
  log: list = []
  token = _RECORDERS.set(_RECORDERS.get() + (log,))
  try:
    yield log
  finally:
    _RECORDERS.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical ``names`` under the current context's rules;
  a no-op outside a mesh (``jax.set_mesh`` / ``use_sharding``)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(names, current().rules, dict(mesh.shape), x.shape)
  for log in _RECORDERS.get():
    log.append((tuple(names), tuple(int(d) for d in x.shape), spec))
  return jax.lax.with_sharding_constraint(x, spec)

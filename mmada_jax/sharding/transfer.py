"""Host ↔ global array transfer, the one place it happens.

- ``to_global``: per-process numpy rows → global ``jax.Array`` s whose leading dim (the logical
  ``batch``, by the context's rules) is split across processes
  (``jax.make_array_from_process_local_data``); ``micro=A`` gives the gradient-accumulation layout
  of the train step (below).
- ``to_host``: the inverse: a global array → this process's rows as numpy (``names=None``: the
  whole array on every process).
- ``place_batch``: single-controller ``device_put`` of one array with the batch spec.

Gradient-accumulation layout (``micro=A``): a process's rows ``[B_local, ...]`` become
``[A, B_local/A, ...]`` with micro-batch ``a`` holding local rows ``a, a+A, a+2A, …``, sharded
``P(None, <batch axes>, ...)``; the global array is ``[A, B_local/A · process_count, ...]``. So
every device works on every micro-batch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmada_jax.sharding.context import ShardingContext, current


def _names_for(ndim: int, names: Sequence[str | None], lead: int = 0) -> tuple[str | None, ...]:
  names = tuple(names)
  if ndim < lead + len(names):
    raise ValueError(f"an array of rank {ndim} cannot carry the logical axes {(None,) * lead + names}")
  return (None,) * lead + names + (None,) * (ndim - lead - len(names))


def _shards(spec: P, mesh_shape: dict[str, int], dim: int) -> int:
  entry = spec[dim] if dim < len(spec) else None
  axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
  return math.prod(mesh_shape[a] for a in axes)


def to_global(tree: Any, ctx: ShardingContext | None = None, names: Sequence[str | None] = ("batch",),
              micro: int | None = None) -> Any:
  """Per-process numpy leaves ``[B_local, ...]`` → global jax.Arrays ``[B_local·P, ...]``
  (``micro=A``: ``[A, B_local/A·P, ...]``, the train step's accumulation layout).

  ``names`` are the logical axes of the leading dims (default: rows = ``batch``); the rest are
  replicated. A leaf that is already a ``jax.Array`` is taken as global and passed through (with
  ``micro``, it must already be in the layout ``[A, rows, ...]``). Without a mesh the leaves
  become plain device arrays (same layout). Rows that the batch shards cannot split are an error.
  """
  ctx = current() if ctx is None else ctx
  if micro is not None and int(micro) < 1:
    raise ValueError(f"micro={micro} must be >= 1 (the number of gradient-accumulation micro-batches)")
  pc = jax.process_count()
  lead = 0 if micro is None else 1

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if isinstance(x, jax.Array):
      if micro is not None and (x.ndim < 2 or x.shape[0] != micro):
        raise ValueError(f"batch leaf {name}: a device array must be in the step layout [A={micro}, "
                         f"rows, ...], got shape {x.shape}")
      return x
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch leaf {name}: a scalar has no rows to distribute")
    b = x.shape[0]
    if micro is not None:
      if b % micro:
        raise ValueError(f"batch leaf {name}: {b} rows per process is not divisible by "
                         f"optimizer.grad_accum={micro}")
      x = np.ascontiguousarray(x.reshape(b // micro, micro, *x.shape[1:]).swapaxes(0, 1))
    if ctx.mesh is None:
      return jnp.asarray(x)
    spec = ctx.spec(_names_for(x.ndim, names, lead))
    rows = x.shape[lead] * pc
    shards = _shards(spec, ctx.mesh_shape, lead)
    if rows % shards:
      what = "a micro-batch of" if micro is not None else "a batch of"
      per = (micro or 1) * shards // math.gcd(shards, pc)
      raise ValueError(f"batch leaf {name}: {what} {rows} rows cannot be split over the {shards} "
                       f"batch shards ({spec[lead]}) of mesh {ctx.mesh_shape}; use a multiple of "
                       f"{per} rows per process")
    gshape = (*x.shape[:lead], rows, *x.shape[lead + 1:])
    return jax.make_array_from_process_local_data(NamedSharding(ctx.mesh, spec), x, gshape)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def to_host(tree: Any, ctx: ShardingContext | None = None,
            names: Sequence[str | None] | None = ("batch",)) -> Any:
  """Global jax.Arrays → numpy: this process's rows (the inverse of ``to_global``).

  ``names`` are the logical axes of the leading dims that ``to_global`` split (e.g.
  ``(None, "batch")`` for ``[steps, rows, ...]``); ``names=None``: the whole array on every
  process (gathered). In one process, and for scalars and fully-replicated arrays of rank below
  ``len(names)``, that is the whole array; numpy leaves pass through.
  """
  ctx = current() if ctx is None else ctx

  def leaf(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if names is None:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if x.ndim < len(tuple(names)):
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      raise ValueError(f"to_host: an array of shape {x.shape} cannot carry the logical axes {tuple(names)}")
    mesh = ctx.mesh if ctx.mesh is not None else getattr(x.sharding, "mesh", None)
    if mesh is None:
      raise ValueError(f"to_host: a multi-process array with sharding {x.sharding} needs a context mesh")
    from jax.experimental import multihost_utils
    spec = logical_spec_on(ctx, mesh, _names_for(x.ndim, names))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))

  return jax.tree.map(leaf, tree)


def logical_spec_on(ctx: ShardingContext, mesh: Any, names: Sequence[str | None]) -> P:
  """``ctx``'s spec for ``names`` on ``mesh`` (which may differ from ``ctx.mesh``)."""
  return ShardingContext(mesh, ctx.rules).spec(names)


def place_batch(x: Any, ctx: ShardingContext | None = None) -> jax.Array | None:
  """Single-controller placement of one array with its leading dim as ``batch`` (dims that the
  batch shards cannot split stay replicated); ``None`` passes through; without a mesh: as given."""
  if x is None:
    return None
  ctx = current() if ctx is None else ctx
  if ctx.mesh is None:
    return x
  shape = tuple(np.shape(x))
  if not shape:
    raise ValueError("place_batch: a scalar has no batch dim")
  return jax.device_put(x, ctx.sharding(_names_for(len(shape), ("batch",)), shape))

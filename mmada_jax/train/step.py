"""The jitted train step: micro-batch gradient accumulation, clipping and the AdamW update.

Batch layout: every leaf arrives as [A, B/A, ...] (A = ``grad_accum`` micro-batches), sharded
``P(None, ('data', 'fsdp'), ...)``: micro-batch ``a`` holds the local rows ``a, a+A, a+2A, …`` of
each process, so every device works on every micro-batch. The gradient is the mean of the
micro-batch gradients (accelerate's loss/A accumulation); metrics are micro-batch means.
Micro-batch ``a`` of step ``s`` uses the key ``fold_in(fold_in(base_key, s), a)``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.train.stages import Stage
from mmada_jax.train.state import TrainState

BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a [A, B/A, ...] batch leaf: rows over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def to_global_batch(host_batch: Any, grad_accum: int, mesh: Mesh) -> Any:
  """Per-host numpy leaves [B_local, ...] -> global jax.Arrays [A, B_global/A, ...].

  A leaf that is already a jax.Array (e.g. made on device by a stage's ``pre_step``) must be a
  global array in the step layout [A, B_global/A, ...] and is passed through unchanged.
  """
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  pc = jax.process_count()

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if isinstance(x, jax.Array):
      if x.ndim < 2 or x.shape[0] != grad_accum:
        raise ValueError(f"batch leaf {name}: a device array must be in the step layout [A={grad_accum}, "
                         f"rows, ...], got shape {x.shape}")
      return x
    x = np.asarray(x)
    b = x.shape[0]
    if b % grad_accum:
      raise ValueError(f"batch leaf {name}: {b} rows per process is not divisible by "
                       f"optimizer.grad_accum={grad_accum}")
    micro_global = b // grad_accum * pc
    if micro_global % shards:
      raise ValueError(f"batch leaf {name}: a micro-batch of {micro_global} rows cannot be split over "
                       f"the {shards} data×fsdp shards of mesh {dict(mesh.shape)}; use a multiple of "
                       f"{shards * grad_accum // pc} rows per process")
    x = np.ascontiguousarray(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1))
    gshape = (grad_accum, micro_global, *x.shape[2:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, gshape)

  return jax.tree_util.tree_map_with_path(leaf, host_batch)


def make_step_fn(stage: Stage, tx: optax.GradientTransformation, schedule: Callable[[jax.Array], jax.Array],
                 param_shardings: Any) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
  """The (unjitted) step ``(state, batch, frozen) -> (state, metrics)``."""

  def step_fn(state: TrainState, batch: Any, frozen: Any):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, mb):
      acc, i = carry
      (_, metrics), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i), frozen)
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return (acc, i + 1), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    (grads, _), metrics = jax.lax.scan(micro, (zeros, jnp.int32(0)), batch)
    grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, state.params)
    metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = schedule(state.step)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    return new, metrics

  return step_fn


def jit_step(step_fn, state_shardings: TrainState, batch: Any, frozen: Any, mesh: Mesh):
  """``jax.jit`` with explicit in/out shardings; the state is donated."""
  b_shard = jax.tree.map(lambda x: x.sharding, batch)
  f_shard = jax.tree.map(lambda x: x.sharding, frozen)
  return jax.jit(step_fn, in_shardings=(state_shardings, b_shard, f_shard),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

"""The jitted train step: micro-batch gradient accumulation, clipping and the AdamW update.

Batch layout: every leaf arrives as [A, B/A, ...] (A = ``grad_accum`` micro-batches), its rows
sharded by the logical ``batch`` rule (``sharding.transfer.to_global(..., micro=A)``): micro-batch
``a`` holds the local rows ``a, a+A, a+2A, …`` of each process, so every device works on every
micro-batch. The gradient is the mean of the micro-batch gradients (accelerate's loss/A
accumulation); metrics are micro-batch means.
Micro-batch ``a`` of step ``s`` uses the key ``fold_in(fold_in(base_key, s), a)``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.train.stages import Stage
from mmada_jax.train.state import TrainState


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

"""The training state pytree and its shardings on a (data, fsdp, tensor) mesh."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import ShardingContext


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  step: int32 [] optimizer updates applied so far. params: fp32 master weights.
  opt_state: optax state. rng: uint32 [2] base key; step ``s`` uses ``fold_in(rng, s)``.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_params(cfg: MMaDAConfig) -> Any:
  """ShapeDtypeStructs of the parameters (no allocation)."""
  return jax.eval_shape(lambda k: transformer.init_params(cfg, k), jax.random.key(0))


def state_shardings(cfg: MMaDAConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=None, params: Any = None, axes: Any = None) -> tuple[TrainState, TrainState]:
  """(abstract TrainState with shardings attached, TrainState of NamedShardings).

  The trained ``params`` (abstract) and their logical ``axes`` default to the model's (LoRA
  passes its adapters). Optimizer moments follow their parameter's sharding
  (``optax.tree_map_params``); counters and the RNG are replicated.
  """
  params = abstract_params(cfg) if params is None else params
  axes = transformer.param_axes(cfg) if axes is None else axes
  p_shard = ShardingContext(mesh, rules).param_shardings(axes, params)
  opt = jax.eval_shape(tx.init, params)
  rep = replicated(mesh)
  o_shard = optax.tree_map_params(tx, lambda _, s: s, opt, p_shard, transform_non_params=lambda _: rep,
                                  is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  o_shard = jax.tree.map(lambda s: rep if s is None else s, o_shard,
                         is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
  shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def init_state(cfg: MMaDAConfig, tx: optax.GradientTransformation, shardings: TrainState,
               seed: int, params: Any | None = None) -> TrainState:
  """A fresh state: random params from ``seed`` (or the given ``params``), zero optimizer state."""
  rng = jax.random.PRNGKey(seed)
  if params is None:
    def init(key):
      p = transformer.init_params(cfg, jax.random.fold_in(key, 1))
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=key)
    return jax.jit(init, out_shardings=shardings)(rng)
  params = jax.tree.map(lambda x, s: jax.device_put(x.astype(jnp.dtype(cfg.param_dtype)), s),
                        params, shardings.params)

  def init_opt(p, key):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=key)
  return jax.jit(init_opt, out_shardings=shardings, donate_argnums=0)(params, rng)

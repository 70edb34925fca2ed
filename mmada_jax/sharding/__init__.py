"""Device meshes, logical-axis sharding rules and presets, the sharding context, host ↔ global transfer."""
from mmada_jax.sharding.context import (ShardingContext, constrain, current, record_constraints,
                                        use_sharding)
from mmada_jax.sharding.rules import (DEFAULT_PRESET, DEFAULT_RULES, MESH_AXES, PRESETS, logical_to_spec,
                                      make_mesh, param_shardings, parse_mesh_shape, parse_rules,
                                      shard_params)
from mmada_jax.sharding.transfer import place_batch, to_global, to_host

__all__ = ["DEFAULT_PRESET", "DEFAULT_RULES", "MESH_AXES", "PRESETS", "ShardingContext", "constrain",
           "current", "logical_to_spec", "make_mesh", "param_shardings", "parse_mesh_shape", "parse_rules",
           "place_batch", "record_constraints", "shard_params", "to_global", "to_host", "use_sharding"]

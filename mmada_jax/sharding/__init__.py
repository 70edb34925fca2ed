"""Device meshes and logical-axis sharding rules."""
from mmada_jax.sharding.rules import (DEFAULT_RULES, constrain, logical_to_spec, make_mesh,
                                      param_shardings, parse_mesh_shape, shard_params)

__all__ = ["DEFAULT_RULES", "constrain", "logical_to_spec", "make_mesh", "param_shardings",
           "parse_mesh_shape", "shard_params"]

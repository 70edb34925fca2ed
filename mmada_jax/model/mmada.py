"""``MMaDA``: the user-facing model object (checkpoint loading, validated inputs, jitted calls).

Holds an explicit parameter pytree and a static config; every computation is a pure jitted
function of ``(params, inputs)``. Generation methods are attached from ``mmada_jax.sampling``.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.checkpoint import hf_mmada, orbax_io
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig, canonical_dtype
from mmada_jax.sampling.api import GenerationMixin
from mmada_jax.sharding.rules import DEFAULT_RULES, logical_to_spec, shard_params


class MMaDA(GenerationMixin):
  """A loaded MMaDA model.

  Attributes:
    params: parameter pytree (see ``transformer`` for the layout).
    config: ``MMaDAConfig`` (static, hashable).
    mesh: optional ``jax.sharding.Mesh`` the parameters are sharded over.
  """

  def __init__(self, params: Any, config: MMaDAConfig, *, mesh: jax.sharding.Mesh | None = None,
               rules=None, hf_config: dict[str, Any] | None = None):
    transformer.check_params(params, config)
    self.config = config
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
    self.hf_config = dict(hf_config or {})
    self.params = params

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: str | None = None, *,
                      compute_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                      rules=None, progress: bool = False, **config_overrides) -> "MMaDA":
    """Loads an original Hugging Face-layout directory or an Orbax directory from the converter.

    Args:
      path: directory with config.json + model.safetensors (or shards + index), or one written
        by ``save_pretrained`` / ``python -m mmada_jax.convert``.
      dtype: parameter storage dtype ("float32" or "bfloat16"); None keeps the stored dtype.
      compute_dtype: matmul dtype (default: ``dtype``); norms, RoPE, softmax stay float32.
      mesh: shard parameters over this mesh by the logical-axis ``rules``.
      config_overrides: e.g. ``remat_policy="full"``, ``scan_layers=False``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"model directory not found: {path}")
    overrides = dict(config_overrides)
    if compute_dtype is not None:
      overrides["compute_dtype"] = canonical_dtype(compute_dtype)
    if orbax_io.is_orbax_model_dir(path):
      params, cfg = orbax_io.load_params(path, dtype, mesh=mesh, rules=rules, **overrides)
    else:
      params, cfg = hf_mmada.load_hf_checkpoint(path, dtype, mesh=mesh, rules=rules, progress=progress,
                                                **overrides)
    return cls(params, cfg, mesh=mesh, rules=rules, hf_config=hf_mmada.read_hf_config(path))

  @classmethod
  def init(cls, config: MMaDAConfig, key: jax.Array | int = 0, *, mesh=None, rules=None) -> "MMaDA":
    """A randomly initialised model (for tests, benchmarks and training from scratch)."""
    if isinstance(key, int):
      key = jax.random.key(key)
    params = jax.jit(transformer.init_params, static_argnums=0)(config, key)
    if mesh is not None:
      params = shard_params(params, transformer.param_axes(config), mesh, rules)
    return cls(params, config, mesh=mesh, rules=rules)

  def save_pretrained(self, path: str | os.PathLike, *, format: str = "orbax", dtype: str | None = None,
                      overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes the model: ``format="orbax"`` (ours) or ``"hf"`` (the original's safetensors layout)."""
    path = os.fspath(path)
    if format == "orbax":
      params = self.params
      if dtype is not None and canonical_dtype(dtype) != self.config.param_dtype:
        params = jax.tree.map(lambda x: x.astype(canonical_dtype(dtype)), params)
      cfg = self.config.replace(param_dtype=canonical_dtype(dtype or self.config.param_dtype))
      orbax_io.save_params(params, cfg, path, hf_config=self.hf_config, overwrite=overwrite)
    elif format == "hf":
      if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
      hf_mmada.save_hf_checkpoint(self.params, self.config, path, dtype=dtype, base_config=self.hf_config,
                                  max_shard_bytes=max_shard_bytes)
    else:
      raise ValueError(f"unknown format {format!r}; use 'orbax' or 'hf'")

  # ------------------------------------------------------------------ properties
  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

  def param_summary(self) -> list[tuple[str, tuple[int, ...], str, tuple]]:
    """(path, shape, dtype, logical axes) for every parameter."""
    axes = transformer.param_axes(self.config)
    flat, _ = jax.tree_util.tree_flatten_with_path(self.params)
    out = []
    for path, leaf in flat:
      keys = [p.key for p in path]
      ax = axes
      for k in keys:
        ax = ax[k]
      out.append(("/".join(keys), tuple(leaf.shape), str(leaf.dtype), ax))
    return out

  # ------------------------------------------------------------------ validation
  def check_ids(self, input_ids: Any, name: str = "input_ids") -> jax.Array:
    """Validates token ids: integer, rank 2, inside the vocabulary."""
    arr = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if arr.ndim != 2:
      raise ValueError(f"{name} must have rank 2 [batch, length], got shape {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    if arr.size:
      lo, hi = int(arr.min()), int(arr.max())
      if lo < 0 or hi >= self.config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad} outside the vocabulary [0, {self.config.vocab_size})")
    return jnp.asarray(arr, jnp.int32)

  def _check_mask(self, attention_mask: Any, shape: tuple[int, int]) -> jax.Array | None:
    if attention_mask is None:
      return None
    m = np.asarray(attention_mask) if not isinstance(attention_mask, jax.Array) else attention_mask
    if tuple(m.shape) != shape:
      raise ValueError(f"attention_mask must have shape {shape} (like input_ids), got {tuple(m.shape)}")
    if not (jnp.issubdtype(m.dtype, jnp.integer) or m.dtype == bool):
      raise TypeError(f"attention_mask must be bool or 0/1 integers, got dtype {m.dtype}")
    if m.size and (int(m.min()) < 0 or int(m.max()) > 1):
      raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
    return jnp.asarray(m, jnp.int32)

  def _check_bias(self, attention_bias: Any, shape: tuple[int, int]) -> jax.Array | None:
    if attention_bias is None:
      return None
    bias = np.asarray(attention_bias) if not isinstance(attention_bias, jax.Array) else attention_bias
    b, l = shape
    if bias.ndim != 4 or bias.shape[0] not in (1, b) or bias.shape[1] != 1 or tuple(bias.shape[2:]) != (l, l):
      raise ValueError(f"attention_bias must have shape [{b}, 1, {l}, {l}], got {tuple(bias.shape)}")
    if bias.dtype == bool:
      return jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"attention_bias must be bool (allow-mask) or float (additive), got {bias.dtype}")
    return jnp.asarray(bias, jnp.float32)

  # ------------------------------------------------------------------ compute
  @functools.cached_property
  def _logits_fn(self):
    cfg = self.config

    def fn(params, ids, mask, bias):
      return transformer.forward(params, cfg, ids, attention_mask=mask, attention_bias=bias)
    return jax.jit(fn)

  def _place_batch(self, x: jax.Array | None) -> jax.Array | None:
    if x is None or self.mesh is None:
      return x
    spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.rules, dict(self.mesh.shape), x.shape)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def logits(self, input_ids: Any, attention_mask: Any = None, attention_bias: Any = None) -> jax.Array:
    """Full-vocabulary logits, float32 [B, L, vocab_size].

    Args:
      input_ids: int [B, L] (numpy or jax).
      attention_mask: [B, L], 1 = token, 0 = padding: hard key-and-query padding mask (padded
        query rows get a uniform softmax, no NaN).
      attention_bias: [B, 1, L, L] bool allow-mask (True may attend) or float additive bias.
    """
    ids = self.check_ids(input_ids)
    mask = self._check_mask(attention_mask, tuple(ids.shape))
    bias = self._check_bias(attention_bias, tuple(ids.shape))
    if self.mesh is None:
      return self._logits_fn(self.params, ids, mask, bias)
    with jax.set_mesh(self.mesh):
      return self._logits_fn(self.params, self._place_batch(ids), self._place_batch(mask),
                             self._place_batch(bias))

  def __repr__(self) -> str:
    c = self.config
    return (f"MMaDA(n_layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
            f"vocab={c.vocab_size}, params={self.num_params:,}, dtype={c.param_dtype}/{c.dtype})")

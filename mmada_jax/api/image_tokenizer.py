"""``ImageTokenizer``: images ↔ MAGVIT-v2 codes, loading and saving the original checkpoint layout.

Images are NHWC: float in [-1, 1] or uint8 in 0..255; codes are int32 [B, h·w], row-major over the
(h, w) grid with h = H/f, w = W/f (f = 2**(encoder levels − 1), 16 for the released model).

dtypes follow Flax: ``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute
dtype of the convolutions (GroupNorm statistics and attention softmax stay float32; outputs are
float32).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.checkpoint import magvit
from mmada_jax.image_tokenizer.config import MagvitConfig
from mmada_jax.image_tokenizer.modules import HIGHEST, MagvitModel, init_params
from mmada_jax.model.config import canonical_dtype
from mmada_jax.sampling.arguments import prng_key, renamed_kwargs
from mmada_jax.sharding.context import ShardingContext
from mmada_jax.sharding.rules import DEFAULT_RULES
from mmada_jax.sharding.transfer import place_batch

FORMATS = ("hf",)
"""Formats of ``save_pretrained``: "hf", the original's diffusers layout (config.json +
pytorch_model.safetensors). The tokenizer is small (~95M parameters) and always read whole, so it
has no Orbax format."""
_OPTIONS = ("precision",)


@functools.lru_cache(maxsize=16)
def _jitted(config: MagvitConfig, dtype: Any, precision: Any):
  """Jitted (encode, encode_latent, decode) shared by all tokenizers of one config/dtype/precision."""
  model = MagvitModel(config, dtype=dtype, precision=precision)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=MagvitModel.encode))
  latent = jax.jit(lambda p, x: model.apply({"params": p}, x, method=MagvitModel.encode_latent))
  decode = jax.jit(lambda p, c, grid: model.apply({"params": p}, c, grid, method=MagvitModel.decode),
                   static_argnums=2)
  return encode, latent, decode


def _params_dtype(params: Any) -> str:
  leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  if not leaves:
    raise ValueError("params hold no floating-point arrays")
  names = {canonical_dtype(jnp.asarray(x).dtype) for x in leaves}
  if len(names) > 1:
    raise ValueError(f"params mix dtypes {sorted(names)}; pass param_dtype= to cast them to one")
  return names.pop()


class ImageTokenizer:
  """A MAGVIT-v2 tokenizer with its parameters; ``encode`` / ``decode`` are jitted (one compile per shape).

  ``param_dtype``: storage dtype of the weights (default: that of ``params``); ``dtype``: compute
  dtype (default: ``param_dtype``). With ``mesh``, params are replicated on it and the batch is
  placed by the logical ``batch`` axis of ``rules`` (dims it cannot split stay replicated).
  """

  def __init__(self, config: MagvitConfig, params: Any, *, param_dtype: Any = None, dtype: Any = None,
               mesh: Mesh | None = None, rules=None, precision: Any = HIGHEST):
    self.config = config
    self.param_dtype = jnp.dtype(canonical_dtype(param_dtype) if param_dtype is not None else _params_dtype(params))
    self.dtype = jnp.dtype(canonical_dtype(dtype)) if dtype is not None else self.param_dtype
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
    self.precision = precision
    self.model = MagvitModel(config, dtype=self.dtype, precision=precision)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.param_dtype), params)
    if mesh is not None:
      params = jax.device_put(params, NamedSharding(mesh, P()))
    self.params = params
    self._encode_fn, self._latent_fn, self._decode_fn = _jitted(config, self.dtype, precision)

  # ---- construction / persistence -------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, param_dtype: Any = None, dtype: Any = None,
                      mesh: Mesh | None = None, rules=None, **overrides: Any) -> "ImageTokenizer":
    """Loads a directory holding ``config.json`` and ``pytorch_model.safetensors`` (original key names).

    ``param_dtype``: storage dtype (None: as stored); ``dtype``: compute dtype (None:
    ``param_dtype``). NOTE: before this release ``dtype=`` set both; it now means compute, as in
    Flax. ``overrides``: ``precision=`` (of the convolutions, default HIGHEST).
    """
    unknown = sorted(set(overrides) - set(_OPTIONS))
    if unknown:
      raise TypeError(f"ImageTokenizer.from_pretrained() got unexpected keyword argument(s) {unknown}; "
                      f"options: {list(_OPTIONS)}")
    config, params = magvit.load_pretrained(os.fspath(path), param_dtype)
    return cls(config, params, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules, **overrides)

  @classmethod
  def init(cls, config: MagvitConfig, seed: int | jax.Array = 0, *, param_dtype: Any = None,
           dtype: Any = None, mesh: Mesh | None = None, rules=None, **deprecated: Any) -> "ImageTokenizer":
    """A randomly initialised tokenizer for ``config`` (see ``modules.init_params``); ``seed``: int
    or jax PRNG key; ``param_dtype`` None keeps the initialiser's float32. Deprecated: ``key=``
    (``seed``)."""
    if deprecated:
      seed = renamed_kwargs("ImageTokenizer.init", deprecated, {"key": "seed"}, current={"seed": (seed, 0)})["seed"]
    params = init_params(config, prng_key(seed))
    return cls(config, params, param_dtype=param_dtype, dtype=dtype, mesh=mesh, rules=rules)

  def save_pretrained(self, path: str | os.PathLike, *, format: str = "hf", param_dtype: Any = None,
                      overwrite: bool = False) -> None:
    """Writes ``config.json`` and ``pytorch_model.safetensors`` in the original layout (OIHW convs,
    torch key names, plus the ``quantize.embedding`` / ``quantize.power_vals`` buffers).

    ``format``: "hf" only (see ``FORMATS``); ``param_dtype`` casts the stored weights (default: as
    held); an existing non-empty ``path`` is refused unless ``overwrite``.
    """
    if format not in FORMATS:
      raise ValueError(f"unknown format {format!r} for an ImageTokenizer; supported: {FORMATS}")
    magvit.save_pretrained(self.config, self.params, os.fspath(path),
                           param_dtype=None if param_dtype is None else canonical_dtype(param_dtype),
                           overwrite=overwrite)

  # ---- input checks ---------------------------------------------------------------------------

  def _place_batch(self, x: jax.Array) -> jax.Array:
    return place_batch(x, ShardingContext(self.mesh, self.rules))

  def _prepare_images(self, images: Any) -> jax.Array:
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    c, f = self.config.image_channels, self.config.downsample_factor
    if x.ndim != 4:
      raise ValueError(f"images must have rank 4 [B, H, W, {c}], got shape {tuple(x.shape)}")
    if x.shape[-1] != c:
      hint = " (NCHW given? images are NHWC)" if x.shape[1] == c else ""
      raise ValueError(f"images must have {c} channels in the last axis, got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0 or x.shape[1] % f or x.shape[2] % f or x.shape[1] == 0 or x.shape[2] == 0:
      raise ValueError(f"images of shape {tuple(x.shape)}: need B >= 1 and H, W positive multiples of {f}")
    if x.dtype == np.uint8:
      x = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    elif jnp.issubdtype(x.dtype, jnp.floating):
      x = jnp.asarray(x, jnp.float32)
    else:
      raise ValueError(f"images must be float in [-1, 1] or uint8 in 0..255, got dtype {x.dtype}")
    return self._place_batch(x)

  def _prepare_codes(self, codes: Any, grid: tuple[int, int] | None) -> tuple[jax.Array, tuple[int, int]]:
    c = np.asarray(jax.device_get(codes))
    if c.ndim != 2:
      raise ValueError(f"codes must have rank 2 [B, h*w], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
      raise ValueError(f"codes must be integers, got dtype {c.dtype}")
    if c.shape[0] == 0 or c.shape[1] == 0:
      raise ValueError(f"codes of shape {c.shape} are empty")
    n = self.config.codebook_size
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= n:
      raise ValueError(f"codes must lie in [0, {n}), got values in [{lo}, {hi}]")
    length = c.shape[1]
    if grid is None:
      side = math.isqrt(length)
      if side * side != length:
        raise ValueError(f"code length {length} is not a square; pass grid=(h, w)")
      grid = (side, side)
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != length:
      raise ValueError(f"grid {grid} does not match code length {length}")
    return self._place_batch(jnp.asarray(c, jnp.int32)), grid

  # ---- public API -----------------------------------------------------------------------------

  def grid_size(self, height: int, width: int) -> tuple[int, int]:
    """Code grid (h, w) of an H×W image."""
    f = self.config.downsample_factor
    return height // f, width // f

  def encode_latent(self, images: Any) -> jax.Array:
    """images [B, H, W, C] → pre-quantisation latent float32 [B, h, w, K] (after ``quant_conv``)."""
    return self._latent_fn(self.params, self._prepare_images(images))

  def encode(self, images: Any) -> jax.Array:
    """images [B, H, W, C] (float in [-1, 1] or uint8) → codes int32 [B, h·w] in [0, 2^K)."""
    return self._encode_fn(self.params, self._prepare_images(images))

  def decode(self, codes: Any, grid: tuple[int, int] | None = None) -> jax.Array:
    """codes int [B, h·w] (square grid unless ``grid``=(h, w)) → images float32 [B, H, W, C], unclamped."""
    c, grid = self._prepare_codes(codes, grid)
    return self._decode_fn(self.params, c, grid)

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))

  def __repr__(self) -> str:
    return (f"ImageTokenizer({self.config.class_name}, {self.num_params / 1e6:.1f}M params, "
            f"{self.config.codebook_dim} bits, f={self.config.downsample_factor}, "
            f"param_dtype={self.param_dtype.name}, dtype={self.dtype.name})")

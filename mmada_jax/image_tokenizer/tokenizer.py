"""``ImageTokenizer``: images ↔ MAGVIT-v2 codes, loading and saving the original checkpoint layout.

Images are NHWC: float in [-1, 1] or uint8 in 0..255; codes are int32 [B, h·w], row-major over the
(h, w) grid with h = H/f, w = W/f (f = 2**(encoder levels − 1), 16 for the released model).
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmada_jax.checkpoint.safetensors_io import SafetensorsReader, write_safetensors
from mmada_jax.image_tokenizer import convert
from mmada_jax.image_tokenizer.config import MagvitConfig
from mmada_jax.image_tokenizer.modules import HIGHEST, MagvitModel, init_params

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
WEIGHTS_NAME = "pytorch_model.safetensors"


def _canonical_dtype(dtype: Any) -> Any:
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  key = name.lower().replace("torch.", "")
  if key not in _DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
  return _DTYPES[key]


@functools.lru_cache(maxsize=16)
def _jitted(config: MagvitConfig, dtype: Any, precision: Any):
  """Jitted (encode, encode_latent, decode) shared by all tokenizers of one config/dtype/precision."""
  model = MagvitModel(config, dtype=dtype, precision=precision)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=MagvitModel.encode))
  latent = jax.jit(lambda p, x: model.apply({"params": p}, x, method=MagvitModel.encode_latent))
  decode = jax.jit(lambda p, c, grid: model.apply({"params": p}, c, grid, method=MagvitModel.decode),
                   static_argnums=2)
  return encode, latent, decode


class ImageTokenizer:
  """A MAGVIT-v2 tokenizer with its parameters; ``encode`` / ``decode`` are jitted (one compile per shape).

  ``dtype`` is the storage and compute dtype of the weights (GroupNorm statistics and attention
  softmax stay float32; outputs are float32). With ``mesh``, params are replicated on it and the batch
  is sharded over its ``data`` axis when the batch size divides evenly (otherwise replicated).
  """

  def __init__(self, config: MagvitConfig, params: Any, *, mesh: Mesh | None = None,
               dtype: Any = "float32", precision: Any = HIGHEST):
    self.config = config
    self.dtype = _canonical_dtype(dtype)
    self.mesh = mesh
    self.model = MagvitModel(config, dtype=self.dtype, precision=precision)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self.dtype), params)
    if mesh is not None:
      params = jax.device_put(params, NamedSharding(mesh, P()))
    self.params = params
    self._encode_fn, self._latent_fn, self._decode_fn = _jitted(config, self.dtype, precision)

  # ---- construction / persistence -------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str, mesh: Mesh | None = None, dtype: Any = "float32") -> "ImageTokenizer":
    """Loads a directory holding ``config.json`` and ``pytorch_model.safetensors`` (original key names)."""
    config = MagvitConfig.from_pretrained_dir(path)
    with SafetensorsReader(path) as reader:
      params = convert.params_from_state_dict(config, reader, _canonical_dtype(dtype))
    return cls(config, params, mesh=mesh, dtype=dtype)

  @classmethod
  def init(cls, config: MagvitConfig, key: jax.Array, *, mesh: Mesh | None = None,
           dtype: Any = "float32") -> "ImageTokenizer":
    """A randomly initialised tokenizer for ``config`` (see ``modules.init_params``)."""
    params = init_params(config, key)
    return cls(config, params, mesh=mesh, dtype=dtype)

  def save_pretrained(self, path: str) -> None:
    """Writes ``config.json`` and ``pytorch_model.safetensors`` in the original layout (OIHW convs,
    torch key names, plus the ``quantize.embedding`` / ``quantize.power_vals`` buffers)."""
    os.makedirs(path, exist_ok=True)
    write_safetensors(convert.iter_state_dict(self.config, self.params), path, base_name=WEIGHTS_NAME)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(self.config.to_hf_config(), f, indent=2, sort_keys=True)
      f.write("\n")

  # ---- input checks ---------------------------------------------------------------------------

  def _place_batch(self, x: jax.Array) -> jax.Array:
    if self.mesh is None:
      return x
    spec = P()
    if "data" in self.mesh.axis_names and x.shape[0] % self.mesh.shape["data"] == 0:
      spec = P("data")
    return jax.device_put(x, NamedSharding(self.mesh, spec))

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
            f"{self.config.codebook_dim} bits, f={self.config.downsample_factor}, dtype={jnp.dtype(self.dtype).name})")

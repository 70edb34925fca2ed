"""Flax Linen modules of the MAGVIT-v2 VQGAN encoder and decoder (NHWC, conv kernels HWIO).

The module tree mirrors the original's attribute names, so a torch key maps to a parameter path by
joining each list index with the name before it: ``encoder.down.2.block.0.conv1.weight`` ->
``encoder/down_2/block_0/conv1/kernel``. Norm weights are ``scale``; conv weights are ``kernel``.

All modules are pure: ``MagvitModel(config).apply({'params': params}, x, method=...)``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmada_jax.image_tokenizer import lfq
from mmada_jax.image_tokenizer.config import NUM_GROUPS, MagvitConfig, VQGANConfig

Dtype = Any
HIGHEST = jax.lax.Precision.HIGHEST


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, precision, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 param_dtype=dtype, precision=precision, name=name)


def _norm(name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      param_dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GN → swish → conv3×3 → GN → swish → dropout → conv3×3, plus x (1×1 ``nin_shortcut`` if C changes).

  x: [B, H, W, C_in] → [B, H, W, out_ch].
  """
  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = swish(_norm("norm1", self.dtype)(x))
    h = _conv(self.out_ch, 3, "conv1", self.dtype, self.precision)(h)
    h = swish(_norm("norm2", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(h)
    h = _conv(self.out_ch, 3, "conv2", self.dtype, self.precision)(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, 1, "nin_shortcut", self.dtype, self.precision)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H·W positions (1×1 q/k/v/proj_out, scale C^-1/2), residual.

  x: [B, H, W, C] → [B, H, W, C].
  """
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = _norm("norm", self.dtype)(x)
    q = _conv(c, 1, "q", self.dtype, self.precision)(h).reshape(b, hh * ww, c)
    k = _conv(c, 1, "k", self.dtype, self.precision)(h).reshape(b, hh * ww, c)
    v = _conv(c, 1, "v", self.dtype, self.precision)(h).reshape(b, hh * ww, c)
    w = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision) * (int(c) ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", w, v, precision=self.precision).reshape(b, hh, ww, c)
    return x + _conv(c, 1, "proj_out", self.dtype, self.precision)(h)


class Downsample(nn.Module):
  """Zero-pad right and bottom by 1, then conv3×3 stride 2 (no padding): [B,H,W,C] → [B,⌊(H-1)/2⌋+1,…]."""
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour ×2, then conv3×3 (padding 1): [B,H,W,C] → [B,2H,2W,C]."""
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype, self.precision)(x)


class Level(nn.Module):
  """One resolution level: ``block_{b}`` ResnetBlocks, each followed by ``attn_{b}`` if ``attn``,
  then ``downsample`` / ``upsample`` when ``resample`` is 'down' / 'up'."""
  out_ch: int
  num_blocks: int
  attn: bool
  resample: str | None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_ch, self.dropout, self.dtype, self.precision, name=f"block_{i}")(x, train)
      if self.attn:
        x = AttnBlock(self.dtype, self.precision, name=f"attn_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, self.precision, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, self.precision, name="upsample")(x)
    return x


class Mid(nn.Module):
  """``block_1`` → ``attn_1`` → ``block_2`` at constant channels."""
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.dropout, self.dtype, self.precision, name="block_1")(x, train)
    x = AttnBlock(self.dtype, self.precision, name="attn_1")(x)
    return ResnetBlock(c, self.dropout, self.dtype, self.precision, name="block_2")(x, train)


class Encoder(nn.Module):
  """Image [B, H, W, in_ch] → pre-quantisation latent [B, H/f, W/f, z] (after ``quant_conv``)."""
  config: VQGANConfig
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    h = _conv(cfg.ch, 3, "conv_in", self.dtype, self.precision)(x.astype(self.dtype))
    attn = cfg.encoder_attn_levels()
    for level in range(cfg.num_levels):
      resample = "down" if level != cfg.num_levels - 1 else None
      h = Level(cfg.level_channels(level), cfg.num_res_blocks[level], attn[level], resample, cfg.dropout,
                self.dtype, self.precision, name=f"down_{level}")(h, train)
    h = Mid(cfg.dropout, self.dtype, self.precision, name="mid")(h, train)
    h = swish(_norm("norm_out", self.dtype)(h))
    h = _conv(cfg.z_channels, 3, "conv_out", self.dtype, self.precision)(h)
    return _conv(cfg.z_channels, 1, "quant_conv", self.dtype, self.precision)(h)


class Decoder(nn.Module):
  """Quantised latent [B, h, w, z] → image [B, h·f, w·f, out_ch] (unclamped)."""
  config: VQGANConfig
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    z = _conv(cfg.z_channels, 1, "post_quant_conv", self.dtype, self.precision)(z.astype(self.dtype))
    h = _conv(cfg.level_channels(cfg.num_levels - 1), 3, "conv_in", self.dtype, self.precision)(z)
    h = Mid(cfg.dropout, self.dtype, self.precision, name="mid")(h, train)
    attn = cfg.decoder_attn_levels()
    for level in reversed(range(cfg.num_levels)):
      resample = "up" if level != 0 else None
      h = Level(cfg.level_channels(level), cfg.num_res_blocks[level], attn[level], resample, cfg.dropout,
                self.dtype, self.precision, name=f"up_{level}")(h, train)
    h = swish(_norm("norm_out", self.dtype)(h))
    return _conv(cfg.out_ch, 3, "conv_out", self.dtype, self.precision)(h)


class MagvitModel(nn.Module):
  """Encoder + LFQ + decoder. Methods take and return NHWC arrays; codes are int32 [B, h·w]."""
  config: MagvitConfig
  dtype: Dtype = jnp.float32
  precision: Any = HIGHEST

  def setup(self):
    self.encoder = Encoder(self.config.encoder, self.dtype, self.precision)
    self.decoder = Decoder(self.config.decoder, self.dtype, self.precision)

  def encode_latent(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, C] in [-1, 1] → latent [B, h, w, K] (float32)."""
    return self.encoder(images, train).astype(jnp.float32)

  def encode(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] → codes int32 [B, h·w] (row-major over h, w)."""
    return lfq.flatten_codes(lfq.latent_to_indices(self.encode_latent(images)))

  def decode_latent(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """quantised latent [B, h, w, K] → images [B, H, W, C] float32."""
    return self.decoder(z_q, train).astype(jnp.float32)

  def decode(self, codes: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """codes int [B, h·w] with ``grid`` = (h, w) → images [B, H, W, C] float32."""
    return self.decode_latent(lfq.codes_to_latent(codes, self.config.codebook_dim, grid))

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Training forward: encode, straight-through LFQ, decode.

    Returns ``reconstruction`` [B,H,W,C], ``latent`` [B,h,w,K], ``indices`` int32 [B,h,w] and the
    scalar LFQ losses ``quantizer_loss`` and ``entropy_loss`` (already weighted as in the original).
    With ``train=True`` and a config dropout > 0, pass ``rngs={'dropout': key}`` to ``apply``.
    """
    cfg = self.config
    z = self.encode_latent(images, train)
    q = lfq.lfq_forward(z, cfg.beta, cfg.entropy_multiplier, cfg.commit_loss_multiplier)
    rec = self.decode_latent(q["z_q"], train)
    return {"reconstruction": rec, "latent": z, "indices": q["indices"],
            "quantizer_loss": q["quantizer_loss"], "entropy_loss": q["entropy_loss"]}


@functools.lru_cache(maxsize=32)
def abstract_params(config: MagvitConfig) -> dict[str, Any]:
  """The params pytree of ``config`` as float32 ``jax.ShapeDtypeStruct`` leaves (nothing allocated; cached,
  do not mutate)."""
  s = config.downsample_factor
  dummy = jax.ShapeDtypeStruct((1, s, s, config.image_channels), jnp.float32)
  variables = jax.eval_shape(lambda x: MagvitModel(config).init(jax.random.PRNGKey(0), x), dummy)
  return variables["params"]


def init_params(config: MagvitConfig, key: jax.Array, dtype: Dtype = jnp.float32) -> dict[str, Any]:
  """Random params for ``config``: conv kernels N(0, 1)/√fan_in, GroupNorm scale 1, biases 0.

  One normal draw is split over all kernels, so this compiles in a fraction of the time of
  ``MagvitModel.init`` (which traces the whole network and one RNG call per parameter).
  """
  abstract = abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  kernels = [(i, spec.shape) for i, (path, spec) in enumerate(leaves) if path[-1].key == "kernel"]
  total = sum(math.prod(shape) for _, shape in kernels)

  @jax.jit
  def make(k):
    flat = jax.random.normal(k, (total,), jnp.float32)
    out = [jnp.ones(spec.shape, dtype) if path[-1].key == "scale" else jnp.zeros(spec.shape, dtype)
           for path, spec in leaves]
    offset = 0
    for i, shape in kernels:
      n = math.prod(shape)
      fan_in = math.prod(shape[:-1])
      out[i] = (flat[offset:offset + n].reshape(shape) / math.sqrt(fan_in)).astype(dtype)
      offset += n
    return jax.tree_util.tree_unflatten(treedef, out)

  return make(key)

"""MAGVIT-v2 tokenizer configuration (VQGAN encoder/decoder + lookup-free quantizer).

``MagvitConfig.from_hf_config`` reads the diffusers-style ``config.json`` of the original checkpoint.
Two layouts exist:
  * with ``encoder_config`` / ``decoder_config`` / ``codebook_dim`` (the kwargs of a configurable subclass);
  * without them (the released ``showlab/magvitv2``: its ``MAGVITv2`` class takes no arguments and builds
    the hard-coded architecture returned by ``MagvitConfig.default_512()``).
Every value we do not implement is rejected with a ``ValueError`` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

NUM_GROUPS = 32  # GroupNorm groups of every ``Normalize`` in the original.
MAX_CODEBOOK_BITS = 30  # codes are int32.


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """Kwargs of the original ``VQGANEncoder`` / ``VQGANDecoder`` (same signature for both).

  Level ``l`` has ``num_res_blocks[l]`` ResnetBlocks with ``ch * ch_mult[l]`` output channels. An
  AttnBlock follows each ResnetBlock of a level whose current resolution is in ``attn_resolutions``
  (the encoder starts at ``resolution`` and halves per level; the decoder starts at
  ``resolution // 2**(levels-1)`` and doubles per level). ``in_ch`` is used by the encoder only,
  ``out_ch`` by the decoder only; ``dropout`` applies inside ResnetBlocks when training.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
  num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
  attn_resolutions: tuple[int, ...] = (5,)
  dropout: float = 0.0
  in_ch: int = 3
  out_ch: int = 3
  resolution: int = 256
  z_channels: int = 13
  double_z: bool = False

  def __post_init__(self):
    for name in ("ch_mult", "num_res_blocks", "attn_resolutions"):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
      object.__setattr__(self, name, tuple(_as_int(name, v) for v in value))
    for name in ("ch", "in_ch", "out_ch", "resolution", "z_channels"):
      object.__setattr__(self, name, _as_int(name, getattr(self, name)))
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
      raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {list(self.ch_mult)}")
    if len(self.num_res_blocks) != len(self.ch_mult):
      raise ValueError(f"num_res_blocks has {len(self.num_res_blocks)} entries but ch_mult has "
                       f"{len(self.ch_mult)}; the original needs one per level")
    if any(n < 0 for n in self.num_res_blocks):
      raise ValueError(f"num_res_blocks must be non-negative, got {list(self.num_res_blocks)}")
    for c in (self.ch,) + tuple(self.ch * m for m in self.ch_mult):
      if c % NUM_GROUPS:
        raise ValueError(f"ch={self.ch} with ch_mult={list(self.ch_mult)} gives {c} channels, which is not "
                         f"a multiple of the {NUM_GROUPS} GroupNorm groups")
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    if not isinstance(self.double_z, bool):
      raise ValueError(f"double_z must be a bool, got {self.double_z!r}")

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  def level_channels(self, level: int) -> int:
    return self.ch * self.ch_mult[level]

  def encoder_attn_levels(self) -> tuple[bool, ...]:
    """Per encoder level: whether its ResnetBlocks are followed by AttnBlocks."""
    res, out = self.resolution, []
    for _ in range(self.num_levels):
      out.append(res in self.attn_resolutions)
      res //= 2
    return tuple(out)

  def decoder_attn_levels(self) -> tuple[bool, ...]:
    """Per decoder level ``l`` (index = level, visited from the deepest): whether it has AttnBlocks."""
    res = self.resolution // 2 ** (self.num_levels - 1)
    out = [False] * self.num_levels
    for level in reversed(range(self.num_levels)):
      out[level] = res in self.attn_resolutions
      res *= 2
    return tuple(out)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for name in ("ch_mult", "num_res_blocks", "attn_resolutions"):
      d[name] = list(d[name])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str) -> "VQGANConfig":
    if not isinstance(d, Mapping):
      raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
      if key not in known:
        raise ValueError(f"{where}.{key} is not a field of the original VQGAN encoder/decoder "
                         f"(known: {sorted(known)})")
    try:
      return cls(**dict(d))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


def _as_int(name: str, v: Any) -> int:
  if isinstance(v, bool) or not isinstance(v, int):
    if isinstance(v, float) and v.is_integer():
      return int(v)
    raise ValueError(f"{name} must be an integer (or list of integers), got {v!r}")
  return int(v)


# The original decoder's defaults (``VQGANDecoder.__init__``), used by the hard-coded ``MAGVITv2``.
_DEFAULT_DECODER = VQGANConfig(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=(4, 4, 3, 4, 3))
_TOP_LEVEL_FIELDS = ("codebook_dim", "encoder_config", "decoder_config")


@dataclasses.dataclass(frozen=True)
class MagvitConfig:
  """A MAGVIT-v2 tokenizer: encoder, decoder and an LFQ with ``codebook_dim`` bits.

  Codes lie in [0, 2**codebook_dim); an image of H×W pixels gives (H/f)×(W/f) codes with
  f = ``downsample_factor``. ``beta``, ``entropy_multiplier`` and ``commit_loss_multiplier`` are the
  LFQ training-loss weights (fixed in the original, not stored in config.json).
  """
  encoder: VQGANConfig = VQGANConfig()
  decoder: VQGANConfig = _DEFAULT_DECODER
  codebook_dim: int = 13
  beta: float = 0.25
  entropy_multiplier: float = 0.1
  commit_loss_multiplier: float = 0.1
  class_name: str = "MAGVITv2"

  def __post_init__(self):
    k = _as_int("codebook_dim", self.codebook_dim)
    if not 1 <= k <= MAX_CODEBOOK_BITS:
      raise ValueError(f"codebook_dim must be in [1, {MAX_CODEBOOK_BITS}], got {k}")
    object.__setattr__(self, "codebook_dim", k)
    for part, cfg in (("encoder_config", self.encoder), ("decoder_config", self.decoder)):
      if not isinstance(cfg, VQGANConfig):
        raise ValueError(f"{part} must be a VQGANConfig, got {type(cfg).__name__}")
      if cfg.z_channels != k:
        raise ValueError(f"{part}.z_channels={cfg.z_channels} differs from codebook_dim={k}; the LFQ "
                         f"quantises each latent channel to one bit")
    if self.encoder.double_z:
      raise ValueError("encoder_config.double_z=true is not supported: the original's quant_conv expects "
                       "z_channels inputs, so such a model cannot run")
    if self.encoder.in_ch != self.decoder.out_ch:
      raise ValueError(f"encoder_config.in_ch={self.encoder.in_ch} differs from decoder_config.out_ch="
                       f"{self.decoder.out_ch}; encode and decode must use the same image channels")

  @property
  def codebook_size(self) -> int:
    return 2 ** self.codebook_dim

  @property
  def downsample_factor(self) -> int:
    """Pixels per code along each side (encoder); the decoder upsamples by ``upsample_factor``."""
    return 2 ** (self.encoder.num_levels - 1)

  @property
  def upsample_factor(self) -> int:
    return 2 ** (self.decoder.num_levels - 1)

  @property
  def image_channels(self) -> int:
    return self.encoder.in_ch

  def replace(self, **kw) -> "MagvitConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def default_512(cls) -> "MagvitConfig":
    """The released ``showlab/magvitv2`` architecture (used by MMaDA at 512 px: 32×32 codes).

    Encoder ch 128, ch_mult [1,2,2,4,4], num_res_blocks [4,3,4,3,4]; decoder ch_mult [1,1,2,2,4],
    num_res_blocks [4,4,3,4,3]; z = 13 bits; attn_resolutions [5] and resolution 256 (the original's
    constructor defaults), so there is attention only in the mid blocks.
    """
    return cls()

  @classmethod
  def from_hf_config(cls, d: Mapping[str, Any]) -> "MagvitConfig":
    """Builds the config from a diffusers ``config.json`` dict (see the module docstring)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"config must be a mapping, got {type(d).__name__}")
    for key in d:
      if not key.startswith("_") and key not in _TOP_LEVEL_FIELDS:
        raise ValueError(f"config field {key!r} is not supported (known: {list(_TOP_LEVEL_FIELDS)})")
    class_name = str(d.get("_class_name", "MAGVITv2"))
    has_enc, has_dec = "encoder_config" in d, "decoder_config" in d
    if has_enc != has_dec:
      raise ValueError("config has only one of encoder_config / decoder_config; give both or neither")
    if not has_enc:
      if "codebook_dim" in d and _as_int("codebook_dim", d["codebook_dim"]) != 13:
        raise ValueError(f"codebook_dim={d['codebook_dim']} without encoder_config/decoder_config: the "
                         f"hard-coded MAGVITv2 architecture has 13 bits")
      return cls(class_name=class_name)
    encoder = VQGANConfig.from_dict(d["encoder_config"], "encoder_config")
    decoder = VQGANConfig.from_dict(d["decoder_config"], "decoder_config")
    codebook_dim = d.get("codebook_dim", 13)
    return cls(encoder=encoder, decoder=decoder, codebook_dim=codebook_dim, class_name=class_name)

  def to_hf_config(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict (always with the explicit encoder/decoder kwargs)."""
    return {
        "_class_name": self.class_name,
        "_diffusers_version": "0.31.0",
        "codebook_dim": self.codebook_dim,
        "decoder_config": self.decoder.to_dict(),
        "encoder_config": self.encoder.to_dict(),
    }

  @classmethod
  def from_pretrained_dir(cls, path: str) -> "MagvitConfig":
    """Reads ``<path>/config.json``."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise ValueError(f"no config.json in {path}")
    with open(cfg_path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {cfg_path}: {e}") from e
    return cls.from_hf_config(d)

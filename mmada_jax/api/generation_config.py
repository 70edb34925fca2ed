"""``GenerationConfig``: the prompt layout and sampler defaults a checkpoint is meant to run with.

Saved as the ``mmada_jax`` section of ``generation_config.json`` by ``MMaDA.save_pretrained``
(both formats) and read back by ``from_pretrained``; ``MMaDA.generate_text / answer /
generate_images`` take every default they are not given from it. A checkpoint without one (an
original Hugging Face directory) gets one derived by :meth:`GenerationConfig.derive`, which logs
what it assumed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

from mmada_jax.model.config import MMaDAConfig

log = logging.getLogger("mmada_jax.api")

VERSION = 1
REMASKING = ("low_confidence", "random")

# The released MMaDA-8B checkpoints (Base after stage 1.3, MixCoT after 2.2) run at 512 px:
# S = 512 text tokens, N = 1024 image tokens (32 x 32).
RELEASED_MAX_TEXT_LEN = 512


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Prompt layout and sampler defaults of a checkpoint's training stage.

  Attributes:
    max_text_len: S, text tokens of a t2i prompt (the sequence is ``S + N + 3`` long).
    num_vq_tokens: N, image tokens per image.
    image_grid: (h, w) code grid of an image, ``h * w = N`` (None: square).
    gen_length, block_length, steps, temperature, remasking, guidance_scale: text / MMU sampler
      defaults (tokens generated, semi-autoregressive block size, total denoising steps, Gumbel
      temperature, remasking rule, CFG weight).
    t2i_steps, t2i_guidance_scale, t2i_temperature, noise_schedule, compound_temperature:
      text-to-image (MaskGIT) defaults.
  """
  max_text_len: int
  num_vq_tokens: int
  image_grid: tuple[int, int] | None = None
  gen_length: int = 128
  block_length: int = 128
  steps: int = 128
  temperature: float = 0.0
  remasking: str = "low_confidence"
  guidance_scale: float = 0.0
  t2i_steps: int = 15
  t2i_guidance_scale: float = 3.5
  t2i_temperature: float = 1.0
  noise_schedule: str = "cosine"
  compound_temperature: bool = True

  def __post_init__(self):
    for name in ("max_text_len", "num_vq_tokens", "gen_length", "block_length", "steps", "t2i_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"GenerationConfig.{name} must be a positive int, got {value!r}")
    for name in ("temperature", "guidance_scale", "t2i_guidance_scale", "t2i_temperature"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"GenerationConfig.{name} must be a number >= 0, got {value!r}")
      object.__setattr__(self, name, float(value))
    if self.remasking not in REMASKING:
      raise ValueError(f"GenerationConfig.remasking={self.remasking!r} is not one of {REMASKING}")
    if not isinstance(self.noise_schedule, str):
      raise ValueError(f"GenerationConfig.noise_schedule must be a schedule name, got {self.noise_schedule!r}")
    if not isinstance(self.compound_temperature, bool):
      raise ValueError(f"GenerationConfig.compound_temperature must be a bool, got {self.compound_temperature!r}")
    if self.gen_length % self.block_length:
      raise ValueError(f"GenerationConfig: gen_length={self.gen_length} is not a multiple of "
                       f"block_length={self.block_length}")
    if self.steps % (self.gen_length // self.block_length):
      raise ValueError(f"GenerationConfig: steps={self.steps} is not a multiple of the number of blocks "
                       f"{self.gen_length // self.block_length}")
    if self.image_grid is not None:
      grid = tuple(self.image_grid)
      if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"GenerationConfig.image_grid must be two positive ints (h, w), got {self.image_grid!r}")
      if grid[0] * grid[1] != self.num_vq_tokens:
        raise ValueError(f"GenerationConfig.image_grid {grid} does not hold num_vq_tokens={self.num_vq_tokens}")
      object.__setattr__(self, "image_grid", grid)

  @property
  def grid(self) -> tuple[int, int]:
    """(h, w) of an image's codes: ``image_grid``, or the square grid of ``num_vq_tokens``."""
    if self.image_grid is not None:
      return self.image_grid
    side = math.isqrt(self.num_vq_tokens)
    if side * side != self.num_vq_tokens:
      raise ValueError(f"num_vq_tokens={self.num_vq_tokens} is not a square; set GenerationConfig.image_grid")
    return side, side

  def replace(self, **kw: Any) -> "GenerationConfig":
    return dataclasses.replace(self, **kw)

  # ------------------------------------------------------------------ (de)serialisation
  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields plus ``version`` (the ``mmada_jax`` section of generation_config.json)."""
    d = dataclasses.asdict(self)
    d["image_grid"] = None if self.image_grid is None else list(self.image_grid)
    return {"version": VERSION, **d}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "generation config") -> "GenerationConfig":
    """Inverse of :meth:`to_dict`; an unknown field or version is an error naming it."""
    d = dict(d)
    version = d.pop("version", VERSION)
    if version != VERSION:
      raise ValueError(f"{where}: unsupported version {version!r} (this release reads version {VERSION})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    for name in ("max_text_len", "num_vq_tokens"):
      if name not in d:
        raise ValueError(f"{where}: required field {name!r} is missing")
    if d.get("image_grid") is not None:
      d["image_grid"] = tuple(d["image_grid"])
    try:
      return cls(**d)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e

  # ------------------------------------------------------------------ construction
  @classmethod
  def derive(cls, config: MMaDAConfig, hf_config: Mapping[str, Any] | None = None,
             where: str = "checkpoint") -> "GenerationConfig":
    """The generation config of a checkpoint that saved none, decided explicitly and logged.

    ``num_vq_tokens`` comes from the model config; ``max_text_len`` from config.json's
    ``max_text_len`` entry when it has one, else the released MMaDA-8B's S = 512; the sampler
    defaults are the original's (``mmu_generate``: 128 tokens, block 128, 128 steps, greedy,
    low-confidence; ``t2i_generate`` per its README: 15 steps, guidance 3.5, cosine, tau0 = 1).
    """
    hf = dict(hf_config or {})
    if hf.get("max_text_len") is not None:
      s, why = int(hf["max_text_len"]), "its config.json's max_text_len"
      log.info("%s has no generation_config.json section: max_text_len=%d from %s, num_vq_tokens=%d, "
               "the original's sampler defaults", where, s, why, config.num_vq_tokens)
    else:
      s = RELEASED_MAX_TEXT_LEN
      log.warning("%s has no saved generation config and its config.json has no max_text_len: assuming the "
                  "released MMaDA-8B prompt layout max_text_len=%d (num_vq_tokens=%d from config.json) and "
                  "the original's sampler defaults; pass max_text_len= to generate_images, or save the model "
                  "with a GenerationConfig, if it was trained with another text length",
                  where, s, config.num_vq_tokens)
    return cls(max_text_len=s, num_vq_tokens=int(config.num_vq_tokens))

  @classmethod
  def from_stage_config(cls, config: Any) -> "GenerationConfig":
    """The generation config of a training stage: ``config.data.max_text_len`` /
    ``num_image_tokens`` and the ``config.sampling`` section (gen_length, block_length,
    text_steps, temperature, t2i_steps, t2i_guidance_scale, t2i_temperature)."""
    data, sc = config.data, config.sampling
    return cls(max_text_len=int(data.max_text_len), num_vq_tokens=int(data.num_image_tokens),
               gen_length=int(sc.gen_length), block_length=int(sc.block_length), steps=int(sc.text_steps),
               temperature=float(sc.temperature), t2i_steps=int(sc.t2i_steps),
               t2i_guidance_scale=float(sc.t2i_guidance_scale), t2i_temperature=float(sc.t2i_temperature))

"""Generation methods of the ``MMaDA`` object: text, image understanding and text-to-image.

Each method builds the original's prompt layout with the text tokenizer (special tokens looked up
in it; image-token offset = its length), runs one compiled sampler, and decodes the result.
Every sampler setting not given is taken from the model's ``generation_config`` (the prompt layout
``max_text_len`` / ``num_vq_tokens`` and the stage's sampler defaults).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.sampling.arguments import renamed_kwargs
from mmada_jax.sampling.cache import generate_text_cached
from mmada_jax.sampling.t2i import generate_image_tokens
from mmada_jax.sampling.text import generate_text


@dataclasses.dataclass
class TextGeneration:
  """tokens: int32 [B, G] generated ids; texts: decoded strings (when a tokenizer was given);
  sequences: int32 [B, P+G] prompt + generation; trajectory: int32 [n_forward, B, P+G] or None."""
  tokens: np.ndarray
  texts: list[str] | None
  sequences: np.ndarray
  trajectory: np.ndarray | None = None
  n_forward: int | None = None


@dataclasses.dataclass
class ImageGeneration:
  """images: uint8 [B, H, W, 3]; codes: int32 [B, N]; trajectory: int32 [T, B, N] codes per step
  (MASKed slots as -1) or None."""
  images: np.ndarray
  codes: np.ndarray
  trajectory: np.ndarray | None = None


_TEXT_RENAMES = {"cfg_scale": "guidance_scale", "key": "seed"}
_IMAGE_RENAMES = {"cfg_scale": "guidance_scale", "key": "seed", "timesteps": "steps"}


def _texts(prompts: str | Sequence[str]) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError("prompts must be a non-empty list of strings")
  return prompts


def _need_tokenizer(tokenizer: Any, what: str) -> Any:
  if tokenizer is None:
    raise ValueError(f"{what} needs a text tokenizer (tokenizer=TextTokenizer.from_file(...))")
  return tokenizer


def _default(value: Any, fallback: Any) -> Any:
  return fallback if value is None else value


def to_uint8(images: Any) -> np.ndarray:
  """float images in [-1, 1] -> uint8 0..255, as the original: clamp((x+1)/2, 0, 1)·255."""
  x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return (x * 255.0).astype(np.uint8)


class GenerationMixin:
  """Adds ``generate_from_ids``, ``generate_text``, ``answer`` and ``generate_images`` to ``MMaDA``
  (which provides ``config``, ``generation_config``, ``check_ids`` and ``_on_mesh``)."""

  def _decode(self, tokenizer, tokens: np.ndarray, specials: SpecialTokens) -> list[str]:
    out = []
    for row in tokens:
      row = [int(t) for t in row]
      for stop in (specials.eos, specials.eot_id):
        if stop in row:
          row = row[:row.index(stop)]
      out.append(tokenizer.decode([t for t in row if t != self.config.mask_token_id]))
    return out

  def generate_from_ids(self, prompt_ids: Any, *, attention_mask: Any = None, gen_length: int | None = None,
                        block_length: int | None = None, steps: int | None = None,
                        temperature: float | None = None, guidance_scale: float | None = None,
                        remasking: str | None = None, cache: str | None = None, threshold: float | None = None,
                        stop_token_id: int | None = None, seed: int | jax.Array = 0,
                        mesh: jax.sharding.Mesh | None = None, return_trajectory: bool = False,
                        **deprecated: Any) -> TextGeneration:
    """Semi-autoregressive block sampling after token-id prompts int [B, P] (left-padded, with
    ``attention_mask`` [B, P] 0 on padding).

    Settings left None come from ``self.generation_config`` (gen_length, block_length, steps,
    temperature, guidance_scale, remasking). ``cache`` ('prefix' or 'dual') / ``threshold`` /
    ``stop_token_id`` select the cached and parallel-decoding sampler; otherwise the exact
    original algorithm. ``seed``: int or jax PRNG key. ``mesh``: run on this mesh (default: the
    model's). Deprecated: ``cfg_scale=`` (``guidance_scale``), ``key=`` (``seed``).
    """
    if deprecated:
      new = renamed_kwargs("generate_from_ids", deprecated, _TEXT_RENAMES,
                           current={"guidance_scale": (guidance_scale, None), "seed": (seed, 0)})
      guidance_scale, seed = new.get("guidance_scale", guidance_scale), new.get("seed", seed)
    gc = self.generation_config
    steps = int(_default(steps, gc.steps))
    common = dict(gen_length=int(_default(gen_length, gc.gen_length)),
                  block_length=int(_default(block_length, gc.block_length)), steps=steps,
                  temperature=float(_default(temperature, gc.temperature)),
                  guidance_scale=float(_default(guidance_scale, gc.guidance_scale)),
                  remasking=_default(remasking, gc.remasking), seed=seed, return_trajectory=return_trajectory)
    ids = self.check_ids(prompt_ids, "prompt_ids")
    with self._on_mesh(mesh) as (params, place):
      ids, mask = place(ids), place(None if attention_mask is None else np.asarray(attention_mask))
      if cache is None and threshold is None and stop_token_id is None:
        s = generate_text(params, self.config, ids, attention_mask=mask, **common)
        n_fwd = steps
      else:
        s = generate_text_cached(params, self.config, ids, attention_mask=mask, cache=cache or "none",
                                 threshold=threshold, stop_token_id=stop_token_id, **common)
        n_fwd = int(np.asarray(s.n_forward))
      seq = np.asarray(s.tokens)
      traj = None if s.trajectory is None else np.asarray(s.trajectory)[:n_fwd]
    return TextGeneration(seq[:, ids.shape[1]:], None, seq, traj, n_fwd)

  def generate_text(self, prompts: str | Sequence[str], *, tokenizer: Any, chat: bool = True,
                    **kwargs: Any) -> TextGeneration:
    """Text generation: ``prompts`` are user messages rendered with the chat template
    (``chat=False``: raw text with BOS). Keyword arguments as :meth:`generate_from_ids`
    (``gen_length``, ``block_length``, ``steps``, ``temperature``, ``guidance_scale``,
    ``remasking``, ``cache``, ``threshold``, ``stop_token_id``, ``seed``, ``mesh``,
    ``return_trajectory``)."""
    tokenizer = _need_tokenizer(tokenizer, "generate_text")
    sp = SpecialTokens.from_tokenizer(tokenizer)
    texts = _texts(prompts)
    if chat:
      ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    else:
      ids = [[sp.bos] + [i for i in tokenizer.encode(t, add_special_tokens=False) if i != sp.bos] for t in texts]
    batch = builders.text_gen_prompt(ids, specials=sp)
    out = self.generate_from_ids(batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    out.texts = self._decode(tokenizer, out.tokens, sp)
    return out

  def answer(self, images: Any, questions: str | Sequence[str], *, image_tokenizer: Any, tokenizer: Any,
             **kwargs: Any) -> TextGeneration:
    """Image understanding: images float [B, H, W, 3] in [-1, 1] (or uint8) and one question
    each; the prompt is ``[mmu][soi] image [eoi] + chat template``. Keyword arguments as
    :meth:`generate_from_ids`."""
    tokenizer = _need_tokenizer(tokenizer, "answer")
    if image_tokenizer is None:
      raise ValueError("answer needs an image tokenizer (image_tokenizer=ImageTokenizer.from_pretrained(...))")
    sp = SpecialTokens.from_tokenizer(tokenizer)
    qs = _texts(questions)
    codes = np.asarray(image_tokenizer.encode(images))
    if codes.shape[0] != len(qs):
      raise ValueError(f"answer: {codes.shape[0]} images for {len(qs)} questions")
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    batch = builders.mmu_gen_prompt(sp.image_token_ids(codes), chats, specials=sp)
    out = self.generate_from_ids(batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    out.texts = self._decode(tokenizer, out.tokens, sp)
    return out

  def generate_images(self, prompts: str | Sequence[str], *, image_tokenizer: Any, tokenizer: Any,
                      guidance_scale: float | None = None, steps: int | None = None,
                      temperature: float | None = None, noise_schedule: str | None = None,
                      max_text_len: int | None = None, num_image_tokens: int | None = None,
                      compound_temperature: bool | None = None, seed: int | jax.Array = 0,
                      mesh: jax.sharding.Mesh | None = None, return_trajectory: bool = False,
                      **deprecated: Any) -> ImageGeneration:
    """Text-to-image MaskGIT decoding with classifier-free guidance against the empty prompt.

    Returns uint8 images [B, H, W, 3]. Settings left None come from ``self.generation_config``:
    ``max_text_len`` (S) and ``num_image_tokens`` (N, decoded on its ``grid``) are the prompt
    layout the checkpoint was trained with; ``guidance_scale``, ``steps``, ``temperature``,
    ``noise_schedule``, ``compound_temperature`` its t2i defaults. ``seed``: int or PRNG key.
    ``mesh``: run on this mesh (default: the model's). Deprecated: ``cfg_scale=``
    (``guidance_scale``), ``timesteps=`` (``steps``), ``key=`` (``seed``).
    """
    if deprecated:
      new = renamed_kwargs("generate_images", deprecated, _IMAGE_RENAMES,
                           current={"guidance_scale": (guidance_scale, None), "seed": (seed, 0),
                                    "steps": (steps, None)})
      guidance_scale = new.get("guidance_scale", guidance_scale)
      seed, steps = new.get("seed", seed), new.get("steps", steps)
    tokenizer = _need_tokenizer(tokenizer, "generate_images")
    if image_tokenizer is None:
      raise ValueError("generate_images needs an image tokenizer (image_tokenizer=ImageTokenizer.from_pretrained(...))")
    gc = self.generation_config
    guidance_scale = float(_default(guidance_scale, gc.t2i_guidance_scale))
    s = int(_default(max_text_len, gc.max_text_len))
    if num_image_tokens is None:
      n, grid = gc.num_vq_tokens, gc.grid
    else:
      n, grid = int(num_image_tokens), None
    total = s + n + 3
    if total > self.config.max_sequence_length:
      raise ValueError(f"generate_images: the prompt layout max_text_len={s} + {n} image tokens + 3 = {total} "
                       f"exceeds the model's max_sequence_length {self.config.max_sequence_length}")
    codebook = int(image_tokenizer.config.codebook_size)
    if codebook != self.config.codebook_size:
      raise ValueError(f"generate_images: the image tokenizer has {codebook} codes but the model was built for "
                       f"codebook_size={self.config.codebook_size}")
    sp = SpecialTokens.from_tokenizer(tokenizer)
    texts = _texts(prompts)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    cond = builders.t2i_gen_prompt(ids, s, num_image_tokens=n, specials=sp)
    uncond = builders.t2i_uncond_prompt(len(texts), s, num_image_tokens=n, specials=sp)
    use_cfg = guidance_scale > 0
    with self._on_mesh(mesh) as (params, place):
      sample = generate_image_tokens(
          params, self.config, place(cond.input_ids), attention_mask=place(cond.attention_mask),
          uncond_input_ids=place(uncond.input_ids) if use_cfg else None,
          uncond_attention_mask=place(uncond.attention_mask) if use_cfg else None,
          steps=int(_default(steps, gc.t2i_steps)), guidance_scale=guidance_scale,
          temperature=float(_default(temperature, gc.t2i_temperature)),
          noise_schedule=_default(noise_schedule, gc.noise_schedule), num_vq_tokens=n, codebook_size=codebook,
          image_token_offset=sp.image_offset,
          compound_temperature=bool(_default(compound_temperature, gc.compound_temperature)),
          seed=seed, return_trajectory=return_trajectory)
      codes = np.asarray(sample.codes)
      raw_traj = None if sample.trajectory is None else np.asarray(sample.trajectory)
    bad = (codes < 0) | (codes >= codebook)
    if bad.any():
      raise ValueError(f"generate_images: sampled image code {int(codes[bad][0])} lies outside the image "
                       f"tokenizer's codebook [0, {codebook})")
    images = to_uint8(image_tokenizer.decode(codes, grid))
    traj = None
    if raw_traj is not None:
      t = raw_traj[:, : len(texts), -(n + 1):-1]     # cond rows, image slots
      traj = np.where(t == self.config.mask_token_id, -1, t - sp.image_offset).astype(np.int32)
    return ImageGeneration(images, codes.astype(np.int32), traj)

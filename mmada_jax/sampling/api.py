"""Generation methods of the ``MMaDA`` object: text, image understanding and text-to-image.

Each method builds the original's prompt layout with the text tokenizer (special tokens looked up
in it; image-token offset = its length), runs one compiled sampler, and decodes the result.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import SpecialTokens
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


def _key(seed: int | jax.Array | None) -> jax.Array:
  if seed is None:
    seed = 0
  return jax.random.key(seed) if isinstance(seed, int) else seed


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


def to_uint8(images: Any) -> np.ndarray:
  """float images in [-1, 1] -> uint8 0..255, as the original: clamp((x+1)/2, 0, 1)·255."""
  x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return (x * 255.0).astype(np.uint8)


class GenerationMixin:
  """Adds ``generate_text``, ``answer`` and ``generate_images`` to a class with ``params`` and
  ``config`` attributes (``MMaDA``)."""

  def _decode(self, tokenizer, tokens: np.ndarray, specials: SpecialTokens) -> list[str]:
    out = []
    for row in tokens:
      row = [int(t) for t in row]
      for stop in (specials.eos, specials.eot_id):
        if stop in row:
          row = row[:row.index(stop)]
      out.append(tokenizer.decode([t for t in row if t != self.config.mask_token_id]))
    return out

  def generate_from_ids(self, prompt_ids: Any, *, attention_mask: Any = None, gen_length: int = 128,
                        block_length: int = 128, steps: int = 128, temperature: float = 0.0,
                        cfg_scale: float = 0.0, remasking: str = "low_confidence",
                        cache: str | None = None, threshold: float | None = None,
                        stop_token_id: int | None = None, seed: int | jax.Array | None = 0,
                        return_trajectory: bool = False) -> TextGeneration:
    """Semi-autoregressive block sampling after token-id prompts int [B, P] (left-padded, with
    ``attention_mask`` [B, P] 0 on padding). ``cache``/``threshold`` select the cached and
    parallel-decoding sampler ('prefix' or 'dual'); otherwise the exact original algorithm."""
    ids = self.check_ids(prompt_ids, "prompt_ids")
    common = dict(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                  cfg_scale=cfg_scale, remasking=remasking, attention_mask=attention_mask,
                  key=_key(seed), return_trajectory=return_trajectory)
    if cache is None and threshold is None and stop_token_id is None:
      s = generate_text(self.params, self.config, ids, **common)
      n_fwd = steps
    else:
      s = generate_text_cached(self.params, self.config, ids, cache=cache or "none", threshold=threshold,
                               stop_token_id=stop_token_id, **common)
      n_fwd = int(np.asarray(s.n_forward))
    seq = np.asarray(s.tokens)
    traj = None if s.trajectory is None else np.asarray(s.trajectory)[:n_fwd]
    return TextGeneration(seq[:, ids.shape[1]:], None, seq, traj, n_fwd)

  def generate_text(self, prompts: str | Sequence[str], *, tokenizer: Any, chat: bool = True,
                    **kwargs) -> TextGeneration:
    """Text generation: ``prompts`` are user messages rendered with the chat template
    (``chat=False``: raw text with BOS). Keyword arguments as :meth:`generate_from_ids`."""
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
             **kwargs) -> TextGeneration:
    """Image understanding: images float [B, H, W, 3] in [-1, 1] (or uint8) and one question
    each; the prompt is ``[mmu][soi] image [eoi] + chat template``. Keyword arguments as
    :meth:`generate_from_ids`."""
    tokenizer = _need_tokenizer(tokenizer, "answer")
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
                      guidance_scale: float = 3.5, steps: int = 15, temperature: float = 1.0,
                      noise_schedule: str = "cosine", max_text_len: int | None = None,
                      num_image_tokens: int | None = None, seed: int | jax.Array | None = 0,
                      compound_temperature: bool = True, return_trajectory: bool = False) -> ImageGeneration:
    """Text-to-image MaskGIT decoding with classifier-free guidance against the empty prompt.

    Returns uint8 images [B, H, W, 3]. ``max_text_len`` (S) defaults to the checkpoint's
    ``max_text_len`` entry or 128 (stage 1); ``num_image_tokens`` to the config's ``num_vq_tokens``.
    """
    tokenizer = _need_tokenizer(tokenizer, "generate_images")
    sp = SpecialTokens.from_tokenizer(tokenizer)
    texts = _texts(prompts)
    s = int(max_text_len or getattr(self, "hf_config", {}).get("max_text_len", 128))
    n = int(num_image_tokens or self.config.num_vq_tokens)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    cond = builders.t2i_gen_prompt(ids, s, num_image_tokens=n, specials=sp)
    uncond = builders.t2i_uncond_prompt(len(texts), s, num_image_tokens=n, specials=sp)
    codebook = int(getattr(image_tokenizer.config, "codebook_size", self.config.codebook_size))
    sample = generate_image_tokens(
        self.params, self.config, cond.input_ids, attention_mask=cond.attention_mask,
        uncond_input_ids=uncond.input_ids if guidance_scale > 0 else None,
        uncond_attention_mask=uncond.attention_mask if guidance_scale > 0 else None,
        timesteps=steps, guidance_scale=guidance_scale, temperature=temperature,
        noise_schedule=noise_schedule, num_vq_tokens=n, codebook_size=codebook,
        image_token_offset=sp.image_offset, compound_temperature=compound_temperature,
        key=_key(seed), return_trajectory=return_trajectory)
    codes = np.clip(np.asarray(sample.codes), 0, codebook - 1)
    images = to_uint8(image_tokenizer.decode(codes))
    traj = None
    if sample.trajectory is not None:
      t = np.asarray(sample.trajectory)[:, : len(texts), -(n + 1):-1]     # cond rows, image slots
      traj = np.where(t == self.config.mask_token_id, -1, t - sp.image_offset).astype(np.int32)
    return ImageGeneration(images, codes.astype(np.int32), traj)

"""Periodic sample generation during training: text (block diffusion) and an image grid (MaskGIT).

Every ``sampling.every`` steps the current parameters generate

* text for ``sampling.text_prompts`` (chat template, low-confidence remasking), written to
  ``WORKDIR/samples/step_<s>.txt`` and TensorBoard text;
* image tokens for ``sampling.t2i_prompts`` (CFG with the empty prompt), decoded by the MAGVIT-v2
  tokenizer in ``sampling.image_tokenizer`` into ``WORKDIR/samples/step_<s>.png`` (without a
  tokenizer the PNG shows each code grid in false colour).

With the toy source the prompts come from the toy vocabulary and text is written as ids.
All processes run the samplers (SPMD); process 0 writes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar

import jax
import numpy as np
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting import builders
from mmada_jax.sharding import to_host


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """The ``config.sampling`` section: samples every ``every`` steps (0 = off) from ``seed``.

  ``text_prompts`` / ``t2i_prompts``: strings, tokenised with ``data.text_tokenizer`` (the toy
  source uses its own prompts). Text: ``gen_length`` tokens in blocks of ``block_length``,
  ``text_steps`` denoising steps, ``temperature``. Images: ``t2i_steps``, ``t2i_guidance_scale``,
  ``t2i_temperature`` (named as in :class:`mmada_jax.api.GenerationConfig`). ``image_tokenizer``:
  MAGVIT-v2 directory that decodes image tokens to pixels ("" = a false-colour map of the code
  grid)."""
  every: int = 0
  seed: int = 0
  text_prompts: list[str] = dataclasses.field(default_factory=lambda: ["Describe a sunny day at the beach."])
  t2i_prompts: list[str] = dataclasses.field(
      default_factory=lambda: ["A red bicycle leaning on a wall.", "A bowl of fruit."])
  gen_length: int = 64
  block_length: int = 32
  text_steps: int = 64
  temperature: float = 0.0
  t2i_steps: int = 12
  t2i_guidance_scale: float = 3.0
  t2i_temperature: float = 1.0
  image_tokenizer: str = ""
  RENAMED_KEYS: ClassVar[dict[str, str]] = {"t2i_timesteps": "t2i_steps", "guidance_scale": "t2i_guidance_scale"}


def _palette_image(codes: np.ndarray, codebook: int, scale: int = 8) -> np.ndarray:
  """codes [N] (square grid) -> uint8 [h·scale, w·scale, 3] false-colour map."""
  side = int(np.sqrt(codes.size))
  grid = codes[:side * side].reshape(side, side).astype(np.int64)
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (max(codebook, 1), 3), dtype=np.uint8)
  return np.kron(colours[grid % max(codebook, 1)], np.ones((scale, scale, 1), np.uint8))


def _tile(images: list[np.ndarray]) -> np.ndarray:
  h = max(i.shape[0] for i in images)
  w = max(i.shape[1] for i in images)
  out = np.full((h, (w + 2) * len(images), 3), 255, np.uint8)
  for k, im in enumerate(images):
    out[:im.shape[0], k * (w + 2):k * (w + 2) + im.shape[1]] = im
  return out


class _Prompts:
  """Token ids of the text and t2i prompts plus a decoder, from the toy vocabulary or a tokenizer."""

  def __init__(self, config: ConfigDict):
    sc, s = config.sampling, int(config.data.max_text_len)
    n = int(config.data.num_image_tokens)
    if str(config.data_source) == "toy":
      from mmada_jax.train.toy_data import TOY_SPECIALS as sp
      self.specials = sp
      chats = [[sp.bos, sp.start_header, 70, sp.end_header, 3, sp.eot_id, sp.start_header, 71, sp.end_header],
               [sp.bos, 10, 12, 14, 16]]
      captions = [[c * 8, c * 8 + 1] for c in range(min(4, int(config.toy.classes)))]
      self.decode = lambda ids: " ".join(str(int(i)) for i in ids)
    else:
      from mmada_jax.prompting.special_tokens import SpecialTokens
      from mmada_jax.prompting.text_tokenizer import TextTokenizer
      tok = TextTokenizer.from_file(str(config.data.text_tokenizer))
      self.specials = SpecialTokens.from_tokenizer(tok)
      chats = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in sc.text_prompts]
      captions = [tok.encode(p) for p in sc.t2i_prompts]
      self.decode = lambda ids: tok.decode([int(i) for i in ids])
    self.text = builders.text_gen_prompt(chats, specials=self.specials) if chats else None
    self.t2i = builders.t2i_gen_prompt(captions, s, num_image_tokens=n, specials=self.specials) if captions else None
    self.uncond = (builders.t2i_uncond_prompt(len(captions), s, num_image_tokens=n, specials=self.specials)
                   if captions else None)


def make_sampler(config: ConfigDict, model_cfg: MMaDAConfig, mesh, workdir: str, writer,
                 say: Callable[[str], None]) -> Callable[[Any, int], None] | None:
  """The hook ``(params, step) -> None``, or None (with a message) when samplers are unavailable."""
  try:
    from mmada_jax.sampling import generate_image_tokens, generate_text
  except ImportError as e:
    say(f"sampling.every={config.sampling.every} but the samplers cannot be imported ({e}); no samples")
    return None
  sc = config.sampling
  prompts = _Prompts(config)
  image_tok = None
  if sc.image_tokenizer:
    from mmada_jax.api.image_tokenizer import ImageTokenizer
    image_tok = ImageTokenizer.from_pretrained(str(sc.image_tokenizer))
  out_dir = os.path.join(workdir, "samples")
  main = jax.process_index() == 0
  n = int(config.data.num_image_tokens)
  codebook = int(model_cfg.codebook_size)

  def sample(params: Any, step: int) -> None:
    key = jax.random.fold_in(jax.random.PRNGKey(int(sc.seed)), step)
    lines = []
    if prompts.text is not None:
      out = generate_text(params, model_cfg, prompts.text.input_ids, gen_length=int(sc.gen_length),
                          block_length=int(sc.block_length), steps=int(sc.text_steps),
                          temperature=float(sc.temperature), attention_mask=prompts.text.attention_mask,
                          seed=jax.random.fold_in(key, 0), mask_id=prompts.specials.mask)
      tokens = to_host(out.tokens, names=None)  # every process: all rows
      p = prompts.text.input_ids.shape[1]
      for i, row in enumerate(tokens):
        prompt = prompts.text.input_ids[i][prompts.text.attention_mask[i] > 0]
        lines.append(f"PROMPT: {prompts.decode(prompt)}\nOUTPUT: {prompts.decode(row[p:])}")
    images = None
    if prompts.t2i is not None:
      res = generate_image_tokens(
          params, model_cfg, prompts.t2i.input_ids, attention_mask=prompts.t2i.attention_mask,
          uncond_input_ids=prompts.uncond.input_ids, uncond_attention_mask=prompts.uncond.attention_mask,
          steps=int(sc.t2i_steps), guidance_scale=float(sc.t2i_guidance_scale),
          temperature=float(sc.t2i_temperature), num_vq_tokens=n, codebook_size=codebook,
          image_token_offset=prompts.specials.image_offset, seed=jax.random.fold_in(key, 1),
          mask_id=prompts.specials.mask)
      codes = to_host(res.codes, names=None)
      if image_tok is not None:
        pix = to_host(image_tok.decode(codes), names=None)
        images = [np.clip((im + 1.0) * 127.5, 0, 255).astype(np.uint8) for im in pix]
      else:
        images = [_palette_image(c, codebook) for c in codes]
    if not main:
      return
    os.makedirs(out_dir, exist_ok=True)
    if lines:
      text = "\n\n".join(lines)
      with open(os.path.join(out_dir, f"step_{step:08d}.txt"), "w") as f:
        f.write(text + "\n")
      writer.write_text(step, "samples/text", text)
    if images:
      from PIL import Image
      grid = _tile(images)
      Image.fromarray(grid).save(os.path.join(out_dir, f"step_{step:08d}.png"))
      writer.write_image(step, "samples/t2i", grid)
    say(f"step {step}: wrote samples to {out_dir}")

  return sample

"""UniGRPO rollouts: sampling G responses per prompt with the compiled samplers.

* :func:`sample_text_groups`: text and MMU, the semi-AR block sampler (``generate_text``, or
  ``generate_text_cached`` when ``rl.cache`` / ``rl.threshold`` are set) on left-padded prompts;
* :func:`sample_image_groups`: T2I, the MaskGIT sampler, then an image decoder for the scorers;
* :func:`magvit_decoder`: MAGVIT-v2 codes → uint8 pixels.

Every function takes this process's records: the prompts are repeated G times (a group's rows
are contiguous and never straddle processes) and placed as global arrays, rows sharded by the
run's logical ``batch`` rule (:mod:`mmada_jax.sharding.transfer`). The sampled tokens stay on the
devices (global arrays); only the prompts' attention masks (built on the host) come back as this
process's numpy rows.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.rl.prompts import Record, pad_prompts
from mmada_jax.sharding import ShardingContext, current, to_global


def sharding_for(mesh: jax.sharding.Mesh | None) -> ShardingContext:
  """The run's sharding context (its rules) on ``mesh`` (None: plain single-device arrays)."""
  ctx = current()
  return ctx if ctx.mesh is mesh else ShardingContext(mesh, ctx.rules)


def global_std(x: np.ndarray) -> float:
  """Population std of a per-row value over every process's rows."""
  if jax.process_count() == 1:
    return float(np.std(x))
  from jax.experimental import multihost_utils
  return float(np.std(np.asarray(multihost_utils.process_allgather(x, tiled=True))))


def sample_text_groups(params: Any, model_cfg: MMaDAConfig, cfg: GRPOConfig, records: Sequence[Record],
                       key: jax.Array, mesh: jax.sharding.Mesh | None, specials: SpecialTokens
                       ) -> tuple[jax.Array, np.ndarray, int]:
  """G text / MMU rollouts per record.

  Returns (tokens int32 [n·G·processes, P + gen_length] prompt + response, a global array on the
  devices; attention_mask int32 [n·G, P + gen_length] numpy, this process's rows (the prompt's
  padding mask, then ones); response_start = P), P = ``cfg.max_prompt_len``.
  """
  g = cfg.group_size
  ids, attn = pad_prompts([rec["prompt_ids"] for rec in records], cfg.max_prompt_len, specials.pad)
  ids, attn = np.repeat(ids, g, axis=0), np.repeat(attn, g, axis=0)
  sh = sharding_for(mesh)
  gids, gattn = to_global((ids, attn), sh)
  common = dict(gen_length=cfg.gen_length, block_length=cfg.block_length, steps=cfg.gen_steps,
                temperature=cfg.temperature, guidance_scale=cfg.guidance_scale, remasking=cfg.remasking,
                attention_mask=gattn, seed=key, mask_id=int(model_cfg.mask_token_id))
  if cfg.cache == "none" and cfg.threshold <= 0:
    from mmada_jax.sampling.text import generate_text
    out = generate_text(params, model_cfg, gids, **common).tokens
  else:
    from mmada_jax.sampling.cache import generate_text_cached
    out = generate_text_cached(params, model_cfg, gids, cache=cfg.cache,
                               threshold=cfg.threshold if cfg.threshold > 0 else None, **common).tokens
  full_attn = np.concatenate([attn, np.ones((attn.shape[0], cfg.gen_length), np.int32)], axis=1)
  return out.astype(jnp.int32), full_attn, int(cfg.max_prompt_len)


def sample_image_groups(params: Any, model_cfg: MMaDAConfig, cfg: GRPOConfig, records: Sequence[Record],
                        key: jax.Array, mesh: jax.sharding.Mesh | None, specials: SpecialTokens
                        ) -> tuple[jax.Array, np.ndarray, int, jax.Array]:
  """G T2I rollouts per record (classifier-free guidance when ``cfg.t2i_guidance_scale > 0``).

  Returns (tokens int32 [rows, S + N + 3]: the t2i prompt with the sampled image tokens, global
  on the devices; attention_mask int32 numpy, this process's rows; response_start (the first
  image slot); codes int32 [rows, N] global on the devices, for the image decoder).
  """
  from mmada_jax.sampling.t2i import generate_image_tokens
  g, sp = cfg.group_size, specials
  n = int(model_cfg.num_vq_tokens)
  text = [rec["prompt_ids"] for rec in records]
  pb = builders.t2i_gen_prompt(text, cfg.max_text_len, num_image_tokens=n, specials=sp)
  un = builders.t2i_uncond_prompt(len(text), cfg.max_text_len, num_image_tokens=n, specials=sp)
  ids, attn = np.repeat(pb.input_ids, g, 0), np.repeat(pb.attention_mask, g, 0)
  uids, uattn = np.repeat(un.input_ids, g, 0), np.repeat(un.attention_mask, g, 0)
  use_cfg = cfg.t2i_guidance_scale > 0
  sh = sharding_for(mesh)
  sample = generate_image_tokens(
      params, model_cfg, to_global(ids, sh), attention_mask=to_global(attn, sh),
      uncond_input_ids=to_global(uids, sh) if use_cfg else None,
      uncond_attention_mask=to_global(uattn, sh) if use_cfg else None, steps=cfg.t2i_steps,
      guidance_scale=cfg.t2i_guidance_scale, temperature=cfg.t2i_temperature, noise_schedule=cfg.noise_schedule,
      image_token_offset=int(sp.image_offset), seed=key, mask_id=int(model_cfg.mask_token_id))
  codes = sample.codes.astype(jnp.int32)
  start = ids.shape[1] - n - 1
  tokens = _place_codes(to_global(ids.astype(np.int32), sh), codes, start, int(sp.image_offset))
  return tokens, attn.astype(np.int32), int(start), codes


@functools.partial(jax.jit, static_argnums=(2, 3))
def _place_codes(ids: jax.Array, codes: jax.Array, start: int, offset: int) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(ids, (codes + offset).astype(jnp.int32), start, axis=1)


def magvit_decoder(tokenizer: Any) -> Callable[[jax.Array], jax.Array]:
  """``codes int [B, N] (square grid) -> uint8 [B, H, W, 3]`` (``round(clip((x+1)/2)·255)``)
  through an ``ImageTokenizer``'s compiled decoder, on the devices: a batch-sharded global codes
  array gives batch-sharded images (no host copy; the sampler's codes lie in the codebook)."""
  def decode(codes: jax.Array) -> jax.Array:
    side = math.isqrt(int(codes.shape[1]))
    if side * side != int(codes.shape[1]):
      raise ValueError(f"magvit_decoder: {codes.shape[1]} codes per image is not a square grid")
    return _to_uint8(tokenizer._decode_fn(tokenizer.params, codes, (side, side)))
  return decode


@jax.jit
def _to_uint8(x: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)

"""Cached and confidence-threshold ("low_confidence_dynamic") variants of the text/MMU sampler.

Beyond the original (which recomputes the whole sequence at every step), in one compiled program:

* **Approximate KV cache** (Fast-dLLM style; exact only for ``cache='none'``). At the first step of
  each block the whole sequence is run once and every layer's post-RoPE K/V is kept. The later
  steps of the block run only a window of ``W = block_length + horizon`` tokens starting at the
  block, at their absolute positions, attending to:
    - ``'prefix'``: the cached K/V of the tokens before the block, plus the window itself; tokens
      after the window are not seen (``horizon`` defaults to the rest of the generation, i.e.
      Fast-dLLM's prefix cache; MMaDA's RL rollout uses horizon 128);
    - ``'dual'``: as 'prefix', plus the block-start K/V of the tokens after the window
      (``horizon`` defaults to 0: Fast-dLLM's dual cache).
  The cache is refreshed once per block. Bidirectional attention makes cached states stale as
  tokens are committed, hence "approximate". Only in-block masked tokens are eligible on window
  steps (prompt MASKs are eligible on each block's full step, as in the original).
* **Threshold parallel decoding** (``threshold=tau``): every eligible masked token whose score
  (softmax probability of its sampled token) is >= tau is committed, plus at least
  ``min_transfer``: 'best' = the single best token (Fast-dLLM / the RL rollout), 'schedule' = the
  static LLaDA schedule's ``n_i`` top tokens (a huge threshold then equals the plain sampler).
  A block ends (``lax.while_loop``) as soon as it has no MASK left, capped at block_length steps
  ('best') or the schedule's steps per block.
* ``stop_token_id``: stop after a block whose last token is this id in every row (the original's
  ``mmu_generate_fast`` early exit); the blocks after it stay MASK.

The LM head is projected only at the positions a step can commit: the block (the window steps'
block, and on full steps too unless a MASK lies before the block, as in ``generate_text``).
With ``cache='none'`` and ``threshold=None`` the result (and trajectory) equals ``generate_text``
for the same seed. Noise: step key = fold_in(fold_in(key, block), step), as the plain sampler.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model import MMaDAConfig, transformer
from mmada_jax.sampling.arguments import prng_key, renamed_kwargs
from mmada_jax.sampling.text import (NEG_INF, block_logits, check_text_args, chosen_probability,
                                     full_attention_mask, initial_sequence, masked_before, sample_tokens,
                                     select_top, step_key, transfer_count)

CACHE_MODES = ("none", "prefix", "dual")
MIN_TRANSFER = ("best", "schedule")


class CachedTextSample(NamedTuple):
  """tokens int32 [B, P+G]; n_forward int32 [] model calls made (CFG pairs count once);
  block_steps int32 [num_blocks] steps taken per block (0 after a stop); trajectory int32
  [max_forward, B or 2B, P+G] full-sequence model inputs (rows >= n_forward are zero) or None."""
  tokens: jax.Array
  n_forward: jax.Array
  block_steps: jax.Array
  trajectory: jax.Array | None


def window_logits(params: Any, cfg: MMaDAConfig, tokens: jax.Array, kv: tuple[jax.Array, jax.Array],
                  start: jax.Array, key_ok: jax.Array, *, block_length: int, window: int,
                  dual: bool) -> jax.Array:
  """Logits float32 [R, block_length, V] of the block at ``start`` from a window forward.

  tokens int32 [R, L]: the current sequence; kv: cached K/V of all L tokens, each
  [n_layers, R, L, kv_heads, head_dim]; key_ok bool [R, L]: padding mask of the keys. The window
  ``tokens[:, start:start+window]`` (MASK-padded past L, those keys disabled) is run at its absolute
  positions against the cached keys before ``start`` (and, if ``dual``, at or after
  ``start + window``); its own stale cache entries are replaced by its fresh K/V.
  """
  rows, total = tokens.shape
  pad = window - block_length
  padded = jnp.concatenate([tokens, jnp.full((rows, pad), cfg.mask_token_id, tokens.dtype)], axis=1)
  win = jax.lax.dynamic_slice(padded, (0, start), (rows, window))
  wpos = start + jnp.arange(window)
  cpos = jnp.arange(total)
  cached_ok = cpos < start
  if dual:
    cached_ok = cached_ok | (cpos >= start + window)
  key_ok_pad = jnp.concatenate([key_ok, jnp.zeros((rows, pad), bool)], axis=1)
  win_ok = jax.lax.dynamic_slice(key_ok_pad, (0, start), (rows, window)) & (wpos < total)[None]
  allow = jnp.concatenate([cached_ok[None] & key_ok, win_ok], axis=1)[:, None, None, :]
  hidden = transformer.forward(params, cfg, win, positions=wpos, kv_cache=kv, attention_bias=allow,
                               return_hidden=True)
  return transformer.project_logits(params, cfg, hidden[:, :block_length])


@functools.partial(jax.jit, static_argnames=(
    "cfg", "prompt_len", "gen_length", "block_length", "steps", "remasking", "use_cfg", "sample",
    "mask_id", "record", "cache", "window", "use_threshold", "min_transfer", "use_stop"))
def _cached_core(params, x, attention_mask, cfg_mult, temperature, threshold, stop_token, key, *,
                 cfg: MMaDAConfig, prompt_len: int, gen_length: int, block_length: int, steps: int,
                 remasking: str, use_cfg: bool, sample: bool, mask_id: int, record: bool, cache: str,
                 window: int, use_threshold: bool, min_transfer: str, use_stop: bool):
  b, total = x.shape
  kb = block_length
  num_blocks = gen_length // kb
  s = steps // num_blocks
  rows = 2 * b if use_cfg else b
  pos = jnp.arange(total)[None, :]
  prompt_index = x != mask_id
  schedule_floor = (not use_threshold) or min_transfer == "schedule"
  max_steps = s if schedule_floor else kb
  k_max = -(-kb // s) if schedule_floor else 1
  traj = jnp.zeros((num_blocks * max_steps if record else 0, rows, total), jnp.int32)
  # Key-side padding mask of the model rows (the CFG path runs without one, as the original).
  key_ok = jnp.ones((rows, total), bool) if attention_mask is None or use_cfg else attention_mask.astype(bool)
  fwd_mask = None if use_cfg else attention_mask

  def model_rows(x):
    return jnp.concatenate([x, jnp.where(prompt_index, mask_id, x)], axis=0) if use_cfg else x

  def guide(lg):
    if not use_cfg:
      return lg
    cond, un = jnp.split(lg, 2, axis=0)
    return un + cfg_mult * (cond - un)

  def full_step(x, want_kv, start, end, blk, i, masked_in_block):
    """One full-sequence step: (x after it, model input, K/V or None). The LM head is projected
    at the block only, unless a MASK lies before it (then everywhere, as the plain sampler)."""
    inp = model_rows(x)
    out = transformer.forward(params, cfg, inp, attention_mask=fwd_mask, return_kv=want_kv, return_hidden=True)
    hidden, kv = out if want_kv else (out, None)
    x = jax.lax.cond(
        masked_before(x, start, mask_id),
        lambda: commit(x, guide(transformer.project_logits(params, cfg, hidden)), start, end, blk, i,
                       masked_in_block, False),
        lambda: commit(x, guide(block_logits(params, cfg, hidden, start, kb)), start, end, blk, i,
                       masked_in_block, True, full_noise=True))
    return x, inp, kv

  def window_step_logits(x, kv, start):
    inp = model_rows(x)
    lg = window_logits(params, cfg, inp, kv, start, key_ok, block_length=kb, window=window,
                       dual=cache == "dual")
    return guide(lg), inp

  def commit(x, logits, start, end, blk, i, masked_in_block, on_window, full_noise=False):
    """Samples, scores and commits one step; logits cover [0, L) or, on_window, [start, end).
    ``full_noise``: the Gumbel noise of the whole sequence (a full step's), sliced to the block."""
    kg, ku = step_key(key, blk, i) if key is not None else (None, None)
    gumbel = None
    if sample and full_noise:
      gumbel = jax.random.gumbel(kg, (b, total, logits.shape[2]), jnp.float32)
      gumbel = jax.lax.dynamic_slice(gumbel, (0, start, 0), logits.shape)
    elif sample:
      gumbel = jax.random.gumbel(kg, logits.shape, jnp.float32)
    x0 = sample_tokens(logits, temperature, gumbel)
    if remasking == "low_confidence":
      p = chosen_probability(logits, x0)
    else:
      p = jax.random.uniform(ku, (b, total), jnp.float32)
      if on_window:
        p = jax.lax.dynamic_slice(p, (0, start), (b, kb))
    if on_window:
      x0 = jax.lax.dynamic_update_slice(x, x0, (0, start))
      p = jax.lax.dynamic_update_slice(jnp.full((b, total), NEG_INF, jnp.float32), p, (0, start))
    p = jnp.where(pos >= end, NEG_INF, p)
    mask_index = x == mask_id
    x0 = jnp.where(mask_index, x0, x)
    conf = jnp.where(mask_index, p, NEG_INF)
    count = transfer_count(masked_in_block, s, i) if schedule_floor else jnp.ones((b,), jnp.int32)
    transfer = select_top(conf, count, k_max)
    if use_threshold:
      transfer = transfer | ((conf >= threshold) & (conf > NEG_INF))
    return jnp.where(transfer, x0, x)

  def record_step(traj, n_fwd, inp):
    if record:
      traj = jax.lax.dynamic_update_index_in_dim(traj, inp, n_fwd, 0)
    return traj, n_fwd + 1

  def block_body(state):
    blk, x, traj, n_fwd, block_steps, _ = state
    start = prompt_len + blk * kb
    end = start + kb
    in_block = (pos >= start) & (pos < end)
    masked_in_block = jnp.sum((x == mask_id) & in_block, axis=1).astype(jnp.int32)

    x, inp, kv = full_step(x, cache != "none", start, end, blk, 0, masked_in_block)
    traj, n_fwd = record_step(traj, n_fwd, inp)

    def step_cond(c):
      i, x = c[0], c[1]
      return (i < max_steps) & jnp.any((x == mask_id) & in_block)

    def step_body(c):
      i, x, traj, n_fwd = c
      if cache == "none":
        x, inp, _ = full_step(x, False, start, end, blk, i, masked_in_block)
      else:
        logits, inp = window_step_logits(x, kv, start)
        x = commit(x, logits, start, end, blk, i, masked_in_block, True)
      traj, n_fwd = record_step(traj, n_fwd, inp)
      return i + 1, x, traj, n_fwd

    i, x, traj, n_fwd = jax.lax.while_loop(step_cond, step_body, (jnp.int32(1), x, traj, n_fwd))
    block_steps = block_steps.at[blk].set(i)
    done = jnp.all(x[:, end - 1] == stop_token) if use_stop else jnp.bool_(False)
    return blk + 1, x, traj, n_fwd, block_steps, done

  def block_cond(state):
    return (state[0] < num_blocks) & ~state[5]

  init = (jnp.int32(0), x, traj, jnp.int32(0), jnp.zeros((num_blocks,), jnp.int32), jnp.bool_(False))
  _, x, traj, n_fwd, block_steps, _ = jax.lax.while_loop(block_cond, block_body, init)
  return x, n_fwd, block_steps, traj


def generate_text_cached(params: Any, cfg: MMaDAConfig, prompt: Any, *, gen_length: int,
                         block_length: int, steps: int, temperature: float = 0.0,
                         guidance_scale: float = 0.0, remasking: str = "low_confidence",
                         attention_mask: Any = None, cache: str = "prefix", horizon: int | None = None,
                         threshold: float | None = None, min_transfer: str = "best",
                         stop_token_id: int | None = None, seed: int | jax.Array = 0,
                         mask_id: int | None = None, return_trajectory: bool = False,
                         **deprecated: Any) -> CachedTextSample:
  """Block-diffusion text/MMU sampling with an approximate KV cache and/or threshold decoding.

  Arguments as ``generate_text`` (prompt int [B, P]; noise from ``seed``, an int or a PRNG key), plus:
    cache: 'none' (exact), 'prefix' or 'dual' (see module doc).
    horizon: tokens after the block recomputed with it on cached steps (static); default: the rest
      of the generation for 'prefix', 0 for 'dual'. Clipped to gen_length - block_length.
    threshold: commit every eligible token with score >= threshold (low_confidence only); None =
      the static schedule only.
    min_transfer: with a threshold, 'best' (>= 1 token per step) or 'schedule' (>= n_i tokens).
    stop_token_id: early exit after a block ending with this token in every row.
    deprecated: ``cfg_scale=`` (now ``guidance_scale``), ``key=`` (now ``seed``).
  """
  if deprecated:
    new = renamed_kwargs("generate_text_cached", deprecated, {"cfg_scale": "guidance_scale", "key": "seed"},
                         current={"guidance_scale": (guidance_scale, 0.0), "seed": (seed, 0)})
    guidance_scale, seed = new.get("guidance_scale", guidance_scale), new.get("seed", seed)
  key = prng_key(seed)
  mask_id = cfg.mask_token_id if mask_id is None else int(mask_id)
  _, _, total = check_text_args(cfg, prompt, gen_length, block_length, steps, remasking, temperature,
                                guidance_scale, attention_mask)
  if cache not in CACHE_MODES:
    raise ValueError(f"cache={cache!r} is not one of {CACHE_MODES}")
  if min_transfer not in MIN_TRANSFER:
    raise ValueError(f"min_transfer={min_transfer!r} is not one of {MIN_TRANSFER}")
  if threshold is not None and remasking != "low_confidence":
    raise ValueError("threshold decoding needs remasking='low_confidence' (random scores have no meaning)")
  if horizon is not None and int(horizon) < 0:
    raise ValueError(f"horizon must be >= 0, got {horizon}")
  sample = temperature > 0
  b, p = np.shape(prompt)
  rest = gen_length - block_length
  if horizon is None:
    horizon = rest if cache == "prefix" else 0
  window = block_length + min(int(horizon), rest)
  use_cfg = guidance_scale > 0
  x = initial_sequence(prompt, gen_length, mask_id)
  attn = None if use_cfg else full_attention_mask(attention_mask, b, total)
  tokens, n_fwd, block_steps, traj = _cached_core(
      params, x, attn, jnp.float32(float(guidance_scale) + 1.0), jnp.float32(temperature),
      jnp.float32(np.inf if threshold is None else threshold),
      jnp.int32(-1 if stop_token_id is None else stop_token_id),
      key if (sample or remasking == "random") else None,
      cfg=cfg, prompt_len=p, gen_length=gen_length, block_length=block_length, steps=steps,
      remasking=remasking, use_cfg=use_cfg, sample=sample, mask_id=mask_id, record=return_trajectory,
      cache=cache, window=window, use_threshold=threshold is not None, min_transfer=min_transfer,
      use_stop=stop_token_id is not None)
  return CachedTextSample(tokens, n_fwd, block_steps, traj if return_trajectory else None)

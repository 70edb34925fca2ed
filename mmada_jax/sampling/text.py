"""Semi-autoregressive masked-diffusion text sampler (LLaDA ``generate`` / MMaDA ``mmu_generate``).

One compiled program: ``lax.fori_loop`` over blocks, and inside it over the steps of a block.
Each step recomputes the whole sequence (as the original), predicts the masked tokens, and
commits the ``n_i`` most confident masked tokens at or before the end of the current block,
``n_i = floor(m/s) + [i < m mod s]`` with ``m`` the row's masked count in the block at block start
and ``s`` the steps per block. MMU uses the same sampler on the MMU prompt.

The LM head is projected only at the current block's positions unless a MASK lies before the
block (then at every position, :func:`masked_before`): only those positions can be committed, so
the tokens are the same. Noise is drawn for the whole sequence and sliced, as before.

Deviations from the original (all invisible at temperature 0 on the reference fixtures):
  * Gumbel-max sampling runs in float32 as ``argmax(logits + tau * g)``, g ~ Gumbel(0, 1); the
    original computes ``exp(logits) / (-log u)^tau`` in float64, the same argmax in exact arithmetic.
  * The low-confidence score is the float32 softmax probability of the chosen token (the
    original uses float64). Only rankings matter; ties on the fixtures are unaffected.
  * A row whose transfer count exceeds its eligible positions commits only eligible ones (the
    original's ``topk`` would pick ``-inf`` positions; this cannot happen with the static schedule).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model import MMaDAConfig, transformer
from mmada_jax.sampling.arguments import prng_key, renamed_kwargs

REMASKING = ("low_confidence", "random")
NEG_INF = -jnp.inf


class TextSample(NamedTuple):
  """tokens int32 [B, P+G]; trajectory int32 [steps, B or 2B (CFG), P+G] (model inputs) or None."""
  tokens: jax.Array
  trajectory: jax.Array | None


# ---------------------------------------------------------------------------------------------
# Step helpers shared with the cached sampler.

def transfer_count(masked: jax.Array, steps: int, i: jax.Array) -> jax.Array:
  """int32 [B]: tokens to commit at step i of a block with ``masked`` [B] masked tokens at its start."""
  base, rem = masked // steps, masked % steps
  return base + (i < rem).astype(jnp.int32)


def select_top(conf: jax.Array, count: jax.Array, k_max: int) -> jax.Array:
  """bool [B, L]: the ``count[b]`` (<= k_max, static) highest finite scores of each row of ``conf``.

  Ties go to the lower position (``lax.top_k`` order); ``-inf`` marks ineligible positions.
  """
  b, l = conf.shape
  k_max = max(1, min(int(k_max), l))
  vals, idx = jax.lax.top_k(conf, k_max)
  keep = (jnp.arange(k_max)[None, :] < count[:, None]) & (vals > NEG_INF)
  return jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], idx].set(keep)


def sample_tokens(logits: jax.Array, temperature: jax.Array | float, gumbel: jax.Array | None) -> jax.Array:
  """int32 [...]: Gumbel-max sample ``argmax(logits + tau * gumbel)`` (plain argmax if gumbel is None)."""
  if gumbel is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.argmax(logits + jnp.asarray(temperature, jnp.float32) * gumbel, axis=-1).astype(jnp.int32)


def chosen_probability(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """float32 [...]: softmax(logits)[token] computed in float32 (max-shifted, as torch's softmax)."""
  logits = logits.astype(jnp.float32)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  sel = jnp.take_along_axis(e, tokens[..., None], axis=-1)[..., 0]
  return sel / jnp.sum(e, axis=-1)


def step_key(key: jax.Array, block: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(gumbel key, uniform key) of step ``step`` in block ``block``; shared by every text sampler."""
  k = jax.random.fold_in(jax.random.fold_in(key, block), step)
  kg, ku = jax.random.split(k)
  return kg, ku


def model_hidden(params: Any, cfg: MMaDAConfig, x: jax.Array, attention_mask: jax.Array | None,
                 prompt_index: jax.Array, use_cfg: bool, mask_id: int) -> tuple[jax.Array, jax.Array]:
  """(final-norm hidden states [B or 2B, L, d], model input int32 [B or 2B, L]) of one
  full-sequence step.

  With CFG the unconditional rows are ``x`` with the prompt positions set to MASK, run in the
  same batch without any attention mask (as the original); :func:`guide` combines the two halves.
  """
  if use_cfg:
    inp = jnp.concatenate([x, jnp.where(prompt_index, mask_id, x)], axis=0)
    return transformer.forward(params, cfg, inp, return_hidden=True), inp
  return transformer.forward(params, cfg, x, attention_mask=attention_mask, return_hidden=True), x


def guide(logits: jax.Array, cfg_mult: jax.Array, use_cfg: bool) -> jax.Array:
  """CFG on logits [2B, ..., V] (conditional rows first): ``un + cfg_mult * (cond - un)`` with
  ``cfg_mult = w + 1`` (w = ``guidance_scale``); logits unchanged without CFG."""
  if not use_cfg:
    return logits
  cond, un = jnp.split(logits, 2, axis=0)
  return un + cfg_mult * (cond - un)


def masked_before(x: jax.Array, start: jax.Array, mask_id: int) -> jax.Array:
  """bool []: some row of ``x`` [B, L] has a MASK before position ``start``.

  Such a MASK (one in the prompt, or one left by an earlier block) is eligible to be committed
  (as in the original), so that step needs the logits of every position up to the block's end;
  otherwise only the block's own positions can be committed and their logits suffice.
  """
  return jnp.any((x == mask_id) & (jnp.arange(x.shape[1])[None, :] < start))


def block_logits(params: Any, cfg: MMaDAConfig, hidden: jax.Array, start: jax.Array,
                 block_length: int) -> jax.Array:
  """float32 logits [R, block_length, V] of positions [start, start + block_length) of
  ``hidden`` [R, L, d]: the LM head projected at the block only."""
  rows, _, d = hidden.shape
  h = jax.lax.dynamic_slice(hidden, (0, start, 0), (rows, block_length, d))
  return transformer.project_logits(params, cfg, h)


# ---------------------------------------------------------------------------------------------
# Validation shared with the cached sampler.

def check_text_args(cfg: MMaDAConfig, prompt: Any, gen_length: int, block_length: int, steps: int,
                    remasking: str, temperature: float, guidance_scale: float,
                    attention_mask: Any) -> tuple[int, int, int]:
  """Raises ValueError on an invalid setting; returns (num_blocks, steps_per_block, P+G)."""
  if np.ndim(prompt) != 2:
    raise ValueError(f"prompt must be int [batch, prompt_len], got shape {np.shape(prompt)}")
  if int(gen_length) <= 0 or int(block_length) <= 0:
    raise ValueError(f"gen_length ({gen_length}) and block_length ({block_length}) must be positive")
  if gen_length % block_length:
    raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
  num_blocks = gen_length // block_length
  if int(steps) <= 0 or steps % num_blocks:
    raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                     f"gen_length/block_length={num_blocks}")
  if remasking not in REMASKING:
    raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if guidance_scale < 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
  b, p = np.shape(prompt)
  total = p + gen_length
  if total > cfg.max_sequence_length:
    raise ValueError(f"prompt length {p} + gen_length {gen_length} = {total} exceeds the model's "
                     f"max_sequence_length {cfg.max_sequence_length}")
  if attention_mask is not None and tuple(np.shape(attention_mask)) not in ((b, p), (b, total)):
    raise ValueError(f"attention_mask must be [B, P]={(b, p)} or [B, P+G]={(b, total)}, got "
                     f"{tuple(np.shape(attention_mask))}")
  return num_blocks, steps // num_blocks, total


def full_attention_mask(attention_mask: Any, batch: int, total: int) -> jax.Array | None:
  """int32 [B, P+G] padding mask (a prompt mask [B, P] is extended with ones), or None."""
  if attention_mask is None:
    return None
  m = jnp.asarray(attention_mask).astype(jnp.int32)
  if m.shape[1] != total:
    m = jnp.concatenate([m, jnp.ones((batch, total - m.shape[1]), jnp.int32)], axis=1)
  return m


def initial_sequence(prompt: Any, gen_length: int, mask_id: int) -> jax.Array:
  """int32 [B, P+G]: the prompt followed by gen_length MASK tokens."""
  prompt = jnp.asarray(prompt).astype(jnp.int32)
  return jnp.concatenate([prompt, jnp.full((prompt.shape[0], gen_length), mask_id, jnp.int32)], axis=1)


# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=(
    "cfg", "prompt_len", "gen_length", "block_length", "steps", "remasking", "use_cfg", "sample",
    "mask_id", "record"))
def _generate_core(params, x, attention_mask, cfg_mult, temperature, key, rand_tape, gumbel_tape, *,
                   cfg: MMaDAConfig, prompt_len: int, gen_length: int, block_length: int, steps: int,
                   remasking: str, use_cfg: bool, sample: bool, mask_id: int, record: bool):
  b, total = x.shape
  num_blocks = gen_length // block_length
  s = steps // num_blocks
  pos = jnp.arange(total)[None, :]
  prompt_index = x != mask_id
  k_max = -(-block_length // s)
  rows = 2 * b if use_cfg else b
  traj = jnp.zeros((steps if record else 0, rows, total), jnp.int32)

  def block_body(blk, carry):
    x, traj = carry
    start = prompt_len + blk * block_length
    end = start + block_length
    in_block = (pos >= start) & (pos < end)
    masked_in_block = jnp.sum((x == mask_id) & in_block, axis=1).astype(jnp.int32)

    def commit(x, logits, gumbel, rand, lo):
      """x after one step from logits [B, W, V] of positions [lo, lo + W) (W = L or block)."""
      w = logits.shape[1]
      if gumbel is not None and w != total:
        gumbel = jax.lax.dynamic_slice(gumbel, (0, lo, 0), (b, w, gumbel.shape[2]))
      x0 = sample_tokens(logits, temperature, gumbel)
      if remasking == "low_confidence":
        p = chosen_probability(logits, x0)
      else:
        p = rand if w == total else jax.lax.dynamic_slice(rand, (0, lo), (b, w))
      if w != total:
        x0 = jax.lax.dynamic_update_slice(x, x0, (0, lo))
        p = jax.lax.dynamic_update_slice(jnp.full((b, total), NEG_INF, jnp.float32), p, (0, lo))
      return x0, p

    def step_body(i, carry):
      x, traj = carry
      k = blk * s + i
      mask_index = x == mask_id
      hidden, inp = model_hidden(params, cfg, x, attention_mask, prompt_index, use_cfg, mask_id)
      if key is not None:
        kg, ku = step_key(key, blk, i)
      gumbel = rand = None
      if sample:   # the full sequence's noise, sliced to the block where only it is projected
        gumbel = gumbel_tape[k] if gumbel_tape is not None else jax.random.gumbel(kg, (b, total, cfg.vocab_size),
                                                                                  jnp.float32)
      if remasking == "random":
        rand = rand_tape[k] if rand_tape is not None else jax.random.uniform(ku, (b, total), jnp.float32)
      x0, p = jax.lax.cond(
          masked_before(x, start, mask_id),
          lambda: commit(x, guide(transformer.project_logits(params, cfg, hidden), cfg_mult, use_cfg),
                         gumbel, rand, 0),
          lambda: commit(x, guide(block_logits(params, cfg, hidden, start, block_length), cfg_mult, use_cfg),
                         gumbel, rand, start))
      p = jnp.where(pos >= end, NEG_INF, p)
      x0 = jnp.where(mask_index, x0, x)
      conf = jnp.where(mask_index, p, NEG_INF)
      transfer = select_top(conf, transfer_count(masked_in_block, s, i), k_max)
      if record:
        traj = jax.lax.dynamic_update_index_in_dim(traj, inp, k, 0)
      return jnp.where(transfer, x0, x), traj

    return jax.lax.fori_loop(0, s, step_body, (x, traj))

  x, traj = jax.lax.fori_loop(0, num_blocks, block_body, (x, traj))
  return x, traj


_TEXT_RENAMES = {"cfg_scale": "guidance_scale", "key": "seed"}
_TAPES_GONE = ("recorded noise is replayed only by the parity harness (mmada_jax.parity.replay); "
               "pass seed= for fresh noise")


def generate_text(params: Any, cfg: MMaDAConfig, prompt: Any, *, gen_length: int, block_length: int,
                  steps: int, temperature: float = 0.0, guidance_scale: float = 0.0,
                  remasking: str = "low_confidence", attention_mask: Any = None,
                  seed: int | jax.Array = 0, mask_id: int | None = None, return_trajectory: bool = False,
                  **deprecated: Any) -> TextSample:
  """Samples ``gen_length`` tokens after ``prompt`` (int [B, P]) in ``gen_length/block_length`` blocks.

  Args:
    steps: total denoising steps (forward passes, or CFG pairs), a multiple of the block count.
    temperature: Gumbel temperature; 0 = greedy argmax.
    guidance_scale: unsupervised CFG weight w (> 0 appends prompt->MASK rows; no attention mask then).
    remasking: 'low_confidence' (score = softmax probability of the chosen token) or 'random'
      (score ~ U(0, 1)).
    attention_mask: optional int [B, P] or [B, P+G], 1 = token, 0 = padding (hard key/query mask,
      as the original's boolean outer-product bias); ignored on the CFG path, as the original.
    seed: int or jax PRNG key of the Gumbel and random-remasking noise (step key =
      fold_in(fold_in(key, block), i)); unused when greedy with low-confidence remasking.
    mask_id: MASK token id (default ``cfg.mask_token_id``).
    return_trajectory: also return the model input of every forward, int32 [steps, B or 2B, P+G].
    deprecated: ``cfg_scale=`` (now ``guidance_scale``), ``key=`` (now ``seed``), with a
      DeprecationWarning.
  """
  if deprecated:
    new = renamed_kwargs("generate_text", deprecated, _TEXT_RENAMES,
                         removed={"rand_tape": _TAPES_GONE, "gumbel_tape": _TAPES_GONE},
                         current={"guidance_scale": (guidance_scale, 0.0), "seed": (seed, 0)})
    guidance_scale, seed = new.get("guidance_scale", guidance_scale), new.get("seed", seed)
  return _generate_text(params, cfg, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                        temperature=temperature, guidance_scale=guidance_scale, remasking=remasking,
                        attention_mask=attention_mask, key=prng_key(seed), mask_id=mask_id,
                        return_trajectory=return_trajectory)


def _generate_text(params: Any, cfg: MMaDAConfig, prompt: Any, *, gen_length: int, block_length: int,
                   steps: int, temperature: float = 0.0, guidance_scale: float = 0.0,
                   remasking: str = "low_confidence", attention_mask: Any = None,
                   key: jax.Array | None = None, rand_tape: Any = None, gumbel_tape: Any = None,
                   mask_id: int | None = None, return_trajectory: bool = False) -> TextSample:
  """:func:`generate_text` with a PRNG ``key`` or recorded noise (the parity replay's entry).

  rand_tape: float32 [steps, B, P+G], replayed uniform scores for 'random' remasking;
  gumbel_tape: float32 [steps, B, P+G, V], replayed Gumbel noise for temperature > 0. A tape
  replaces the key's noise of its kind.
  """
  mask_id = cfg.mask_token_id if mask_id is None else int(mask_id)
  num_blocks, _, total = check_text_args(cfg, prompt, gen_length, block_length, steps, remasking,
                                         temperature, guidance_scale, attention_mask)
  b, p = np.shape(prompt)
  sample = temperature > 0
  if sample and key is None and gumbel_tape is None:
    raise ValueError("temperature > 0 needs a PRNG key or a gumbel_tape")
  if remasking == "random" and key is None and rand_tape is None:
    raise ValueError("remasking='random' needs a PRNG key or a rand_tape")
  if rand_tape is not None:
    if tuple(np.shape(rand_tape)) != (steps, b, total):
      raise ValueError(f"rand_tape must have shape {(steps, b, total)}, got {tuple(np.shape(rand_tape))}")
    rand_tape = jnp.asarray(rand_tape, jnp.float32)
  if gumbel_tape is not None:
    want = (steps, b, total, cfg.vocab_size)
    if tuple(np.shape(gumbel_tape)) != want:
      raise ValueError(f"gumbel_tape must have shape {want}, got {tuple(np.shape(gumbel_tape))}")
    gumbel_tape = jnp.asarray(gumbel_tape, jnp.float32)
  use_cfg = guidance_scale > 0
  x = initial_sequence(prompt, gen_length, mask_id)
  attn = None if use_cfg else full_attention_mask(attention_mask, b, total)
  tokens, traj = _generate_core(
      params, x, attn, jnp.float32(float(guidance_scale) + 1.0), jnp.float32(temperature),
      key if (sample and gumbel_tape is None) or (remasking == "random" and rand_tape is None) else None,
      rand_tape if remasking == "random" else None, gumbel_tape if sample else None,
      cfg=cfg, prompt_len=p, gen_length=gen_length, block_length=block_length, steps=steps,
      remasking=remasking, use_cfg=use_cfg, sample=sample, mask_id=mask_id, record=return_trajectory)
  return TextSample(tokens, traj if return_trajectory else None)

"""Monte-Carlo log-likelihood of a continuation under a masked-diffusion model (LLaDA's estimator).

For a prompt ``p`` (never masked) and a continuation ``x`` of ``n`` tokens, the model's evidence
lower bound is

    log p(x | p) >= -E_{k ~ U{1..n}} E_{S ⊂ x, |S| = k} [ (n / k) · Σ_{j ∈ S} CE_j(x with S masked) ],

estimated as LLaDA evaluates it: each round takes ``b`` copies of ``p + x`` whose mask counts are
spread evenly over ``[1, n]`` with one random offset (``k_i = ((offset + round(i·n/b)) mod n) + 1``,
offset uniform in ``[0, n)``), masks ``k_i`` continuation positions of copy ``i`` uniformly at
random, and averages ``Σ_masked CE / (k_i / n)`` over the copies; the estimate is minus the mean
over ``mc_num / b`` rounds. Each copy is marginally an unbiased draw of the bound's integrand, the
rounds are independent, so the reported standard error is that of the round means (one round:
of the copies, an upper bound since the copies are stratified).

Classifier-free guidance (``guidance_scale`` w > 0) runs an unconditional pass with the prompt
masked too and uses ``un + (w + 1) · (cond − un)``.

A single-token continuation is always fully masked (ratio 1), so the estimate is then the exact
log-probability for any ``mc_num``. The whole estimate (all rounds) is one jitted program per
(sequence length, copies, rounds, CFG on/off); the prompt length and the seed are traced.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sampling.arguments import prng_key


@dataclasses.dataclass(frozen=True)
class LikelihoodEstimate:
  """log_likelihood: the estimate (nats); stderr: its Monte-Carlo standard error; rounds: the
  number of rounds; copies: copies per round; round_values: float64 [rounds] per-round estimates."""
  log_likelihood: float
  stderr: float
  rounds: int
  copies: int
  round_values: np.ndarray


def mc_layout(mc_num: int, batch_size: int) -> tuple[int, int]:
  """``(copies per round, rounds)`` for ``mc_num`` samples in batches of ``batch_size``: copies =
  min(batch_size, mc_num), which must divide ``mc_num``."""
  if mc_num < 1 or batch_size < 1:
    raise ValueError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be >= 1")
  copies = min(batch_size, mc_num)
  if mc_num % copies:
    raise ValueError(f"mc_num={mc_num} must be a multiple of batch_size={copies}")
  return copies, mc_num // copies


def mask_counts(key: jax.Array, n: jax.Array, copies: int) -> jax.Array:
  """int32 [copies] mask counts in [1, n]: an even spread over [1, n] with a random offset."""
  offset = jax.random.randint(key, (), 0, n)
  spread = jnp.round(jnp.arange(copies, dtype=jnp.float32) * n.astype(jnp.float32) / copies).astype(jnp.int32)
  return (offset + spread) % n + 1


def continuation_masks(key: jax.Array, prompt_len: jax.Array, length: int, counts: jax.Array) -> jax.Array:
  """bool [copies, length]: ``counts[i]`` continuation positions (>= prompt_len) masked in row i,
  chosen uniformly at random."""
  copies = counts.shape[0]
  pos = jnp.arange(length)
  scores = jax.random.uniform(key, (copies, length))
  scores = jnp.where(pos[None] < prompt_len, 2.0, scores)          # prompt sorts last
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  return ranks < counts[:, None]


@functools.partial(jax.jit, static_argnames=("cfg", "copies", "rounds", "use_cfg"))
def round_estimates(params: Any, cfg: MMaDAConfig, seq: jax.Array, prompt_len: jax.Array, key: jax.Array,
                    guidance_scale: jax.Array, *, copies: int, rounds: int, use_cfg: bool) -> jax.Array:
  """float32 [rounds, copies]: per copy, ``Σ_masked CE / (k/n)`` for seq int32 [L] whose first
  ``prompt_len`` tokens are the prompt."""
  length = seq.shape[0]
  n = length - prompt_len
  rows = jnp.broadcast_to(seq[None], (copies, length))
  in_prompt = (jnp.arange(length) < prompt_len)[None]

  def one_round(_, rkey):
    kc, km = jax.random.split(rkey)
    counts = mask_counts(kc, n, copies)
    masked = continuation_masks(km, prompt_len, length, counts)
    noisy = jnp.where(masked, cfg.mask_token_id, rows)
    if use_cfg:
      un = jnp.where(in_prompt, cfg.mask_token_id, noisy)
      both = transformer.forward(params, cfg, jnp.concatenate([noisy, un], 0))
      cond, uncond = both[:copies], both[copies:]
      logits = uncond + (guidance_scale + 1.0) * (cond - uncond)
    else:
      logits = transformer.forward(params, cfg, noisy)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = jnp.take_along_axis(logp, rows[..., None], axis=-1)[..., 0]
    ce = jnp.sum(jnp.where(masked, -tok_logp, 0.0), axis=1)
    ratio = counts.astype(jnp.float32) / n.astype(jnp.float32)
    return None, ce / ratio

  _, out = jax.lax.scan(one_round, None, jax.random.split(key, rounds))
  return out


def _ids(x: Any, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{name} must be a 1-d sequence of token ids, got shape {arr.shape} dtype {arr.dtype}")
  return arr.astype(np.int32)


def log_likelihood(model: Any, prompt_ids: Sequence[int], continuation_ids: Sequence[int], *, mc_num: int = 128,
                   batch_size: int = 8, guidance_scale: float = 0.0, seed: int | jax.Array = 0) -> LikelihoodEstimate:
  """The Monte-Carlo estimate of ``log p(continuation | prompt)`` (module docstring).

  Args:
    model: an ``MMaDA`` (its ``params``, ``config`` and mesh are used).
    prompt_ids: int [P] (may be empty); continuation_ids: int [n], n >= 1.
    mc_num: Monte-Carlo samples in all; batch_size: copies per forward pass (see :func:`mc_layout`).
    guidance_scale: CFG weight w (0 = off).
    seed: int or PRNG key; the same seed gives the same estimate.
  """
  prompt, cont = _ids(prompt_ids, "prompt_ids"), _ids(continuation_ids, "continuation_ids")
  if cont.size == 0:
    raise ValueError("continuation_ids is empty: the likelihood of nothing is not estimated")
  if guidance_scale < 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
  copies, rounds = mc_layout(mc_num, batch_size)
  seq = model.check_ids(np.concatenate([prompt, cont])[None], "prompt_ids + continuation_ids")[0]
  with model._on_mesh(None) as (params, _):
    vals = round_estimates(params, model.config, seq, jnp.int32(prompt.size), prng_key(seed),
                           jnp.float32(guidance_scale), copies=copies, rounds=rounds, use_cfg=guidance_scale > 0)
  vals = np.asarray(vals, np.float64)
  per_round = vals.mean(axis=1)
  if rounds > 1:
    stderr = float(per_round.std(ddof=1) / math.sqrt(rounds))
  elif copies > 1:
    stderr = float(vals[0].std(ddof=1) / math.sqrt(copies))
  else:
    stderr = 0.0
  return LikelihoodEstimate(-float(per_round.mean()), stderr, rounds, copies, -per_round)

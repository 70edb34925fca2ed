"""UniGRPO structured masking of rollout responses (spec §8.2), pure jnp with explicit PRNG keys.

Each rollout row holds a prompt and a response of R tokens at positions
``response_start .. response_start + R - 1``. The **prompt is never masked**: only response
positions can become MASK (anything outside the response window is copied unchanged).

Per row and per inner iteration n = 1..μ a mask ratio p_n is drawn:

* ``method="unigrpo"`` (default, the paper's structured noising; the formula is our
  reconstruction, spec §8.2 [infer]): with T = ``num_timesteps`` (1000) and r1 ~ U[0, 1) drawn
  independently per row, ``t1 = floor(r1 * T)`` and

      spacing="linspace" (default):  t_n = t1 + floor((n - 1) * (T - t1) / (μ - 1))   (μ > 1)
                                     t_1 = t1                                         (μ = 1)
      spacing="stratified":          t_n = (t1 + floor((n - 1) * T / μ)) mod T

  and ``p_n = t_n / T``. "linspace" is "evenly spaced from the random start to the end T", the
  reading of Algorithm 1 in the spec; it is computed in integer arithmetic, so t_1 = t1 and
  t_μ = T exactly (the last inner iteration always masks the whole trainable response, the
  state the sampler starts from). "stratified" is the one formula that reproduces the paper's
  worked example exactly (t1 = 100, μ = 5 → 100, 300, 500, 700, 900): evenly spaced with step
  T/μ, wrapping at T, so each t_n is marginally uniform. The start is drawn per row so that the
  rows of a batch cover different noise levels at every inner step.

  Then **exactly** ``n_mask = clip(round(p_n * R_i), 1, R_i)`` of the row's R_i trainable response
  tokens are masked, a uniformly random subset (ranks of uniform noise). Exact counts make the
  realised ratio follow the schedule (the point of the structured schedule) instead of adding
  binomial noise on top of it, and the floor of 1 keeps every sequence's per-token mean defined.

* ``method="random"`` (the public RL code's ``random_masking``): ``p ~ U[random_low,
  random_high]`` (0.1, 0.9) independently per row and iteration, and each trainable response token
  is masked independently with probability p (Bernoulli; a row can get no masked token, and then
  contributes nothing to that step's loss).

Trainable versus hidden tail: :func:`response_positions` splits a response at its first stop
token (EOS / ``<|eot_id|>``). With ``tail="mask"`` (default, the public code's ``post_num=1``)
the tokens up to and including the first stop are trainable and every token after it is always
MASK in the input and never scored, so the model is not handed the answer length and the loss is
not diluted by EOS padding. With ``tail="train"`` every response token is trainable (MMaDA SFT
trains EOS padding like any token; use this for image tokens, which have no stop token).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

METHODS = ("unigrpo", "random")
SPACINGS = ("linspace", "stratified")
TAILS = ("mask", "train")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Static masking settings (see the module docstring)."""
  method: str = "unigrpo"
  num_timesteps: int = 1000
  spacing: str = "linspace"
  random_low: float = 0.1
  random_high: float = 0.9

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"masking method {self.method!r} is not one of {METHODS}")
    if self.spacing not in SPACINGS:
      raise ValueError(f"masking spacing {self.spacing!r} is not one of {SPACINGS}")
    if int(self.num_timesteps) < 1:
      raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
    if not 0.0 <= self.random_low <= self.random_high <= 1.0:
      raise ValueError(f"need 0 <= random_low ({self.random_low}) <= random_high ({self.random_high}) <= 1")


def unigrpo_timesteps(key: jax.Array, batch: int, mu: int, num_timesteps: int = 1000,
                      spacing: str = "linspace") -> jax.Array:
  """int32 [mu, batch]: the timesteps t_n of the μ inner iterations of each row (module doc)."""
  if mu < 1:
    raise ValueError(f"mu (inner iterations) must be >= 1, got {mu}")
  if spacing not in SPACINGS:
    raise ValueError(f"spacing {spacing!r} is not one of {SPACINGS}")
  t_total = int(num_timesteps)
  r1 = jax.random.uniform(key, (batch,), jnp.float32)
  t1 = jnp.clip(jnp.floor(r1 * t_total).astype(jnp.int32), 0, t_total - 1)
  return timesteps_from_start(t1, mu, t_total, spacing)


def timesteps_from_start(t1: jax.Array, mu: int, num_timesteps: int = 1000, spacing: str = "linspace"
                         ) -> jax.Array:
  """int32 [mu, B]: t_1..t_mu from the start timesteps t1 int [B] (module docstring formulas)."""
  t1 = jnp.asarray(t1, jnp.int32).reshape(-1)
  t_total = int(num_timesteps)
  n = jnp.arange(mu, dtype=jnp.int32)[:, None]
  if spacing == "stratified":
    return (t1[None, :] + (n * t_total) // mu) % t_total
  if mu == 1:
    return t1[None, :]
  return t1[None, :] + (n * (t_total - t1[None, :])) // (mu - 1)


def mask_ratios(key: jax.Array, batch: int, mu: int, config: MaskingConfig) -> jax.Array:
  """float32 [mu, batch]: the mask ratio of each row at each inner iteration."""
  if config.method == "unigrpo":
    t = unigrpo_timesteps(key, batch, mu, config.num_timesteps, config.spacing)
    return t.astype(jnp.float32) / jnp.float32(config.num_timesteps)
  return jax.random.uniform(key, (mu, batch), jnp.float32, config.random_low, config.random_high)


def exact_count_mask(key: jax.Array, eligible: jax.Array, ratio: jax.Array) -> jax.Array:
  """bool [B, R]: exactly ``clip(round(ratio * n_eligible), 1, n_eligible)`` eligible positions.

  Args: eligible bool [B, R]; ratio float [B]. Rows without eligible positions get no mask.
  The subset is uniform: positions are ranked by U(0,1) noise (ineligible ones last).
  """
  eligible = eligible.astype(bool)
  count = jnp.sum(eligible, axis=-1).astype(jnp.float32)
  n = jnp.clip(jnp.round(ratio.astype(jnp.float32) * count), 1.0, jnp.maximum(count, 1.0))
  noise = jnp.where(eligible, jax.random.uniform(key, eligible.shape, jnp.float32), 2.0)
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return eligible & (rank < n.astype(jnp.int32)[:, None])


def bernoulli_mask(key: jax.Array, eligible: jax.Array, ratio: jax.Array) -> jax.Array:
  """bool [B, R]: each eligible position masked independently with probability ratio[b]."""
  u = jax.random.uniform(key, eligible.shape, jnp.float32)
  return eligible.astype(bool) & (u < ratio.astype(jnp.float32)[:, None])


def sample_response_masks(key: jax.Array, trainable: jax.Array, mu: int,
                          config: MaskingConfig) -> tuple[jax.Array, jax.Array]:
  """The μ maskings of a batch of responses.

  Args:
    trainable: bool [B, R], response positions that may be masked and scored.
    mu: inner iterations (static).
  Returns:
    (masked bool [mu, B, R] — the positions replaced by MASK and scored, ratio float32 [mu, B]).
  """
  b = trainable.shape[0]
  k_ratio, k_pos = jax.random.split(key)
  ratio = mask_ratios(k_ratio, b, mu, config)
  keys = jax.random.split(k_pos, mu)
  fn = exact_count_mask if config.method == "unigrpo" else bernoulli_mask
  masked = jax.vmap(fn, in_axes=(0, None, 0))(keys, trainable, ratio)
  return masked, ratio


def response_positions(response_start: jax.Array, num_response: int) -> jax.Array:
  """int32 [B, R]: sequence positions of the response tokens (``response_start`` int [B])."""
  return jnp.asarray(response_start, jnp.int32)[:, None] + jnp.arange(num_response, dtype=jnp.int32)[None, :]


def split_response(response: jax.Array, stop_ids: Sequence[int], tail: str = "mask"
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Trainable and always-masked parts of responses int [B, R] (module docstring).

  Returns:
    trainable bool [B, R]; hidden_tail bool [B, R] (always MASK, never scored);
    length int32 [B]: tokens before the first stop token (R when there is none).
  """
  if tail not in TAILS:
    raise ValueError(f"tail {tail!r} is not one of {TAILS}")
  response = jnp.asarray(response)
  r = response.shape[-1]
  is_stop = jnp.zeros(response.shape, bool)
  for s in stop_ids:
    is_stop = is_stop | (response == int(s))
  pos = jnp.arange(r, dtype=jnp.int32)[None, :]
  first = jnp.min(jnp.where(is_stop, pos, r), axis=-1).astype(jnp.int32)
  if tail == "train":
    return jnp.ones(response.shape, bool), jnp.zeros(response.shape, bool), first
  trainable = pos <= first[:, None]
  return trainable, ~trainable, first


def noisy_inputs(tokens: jax.Array, response_start: jax.Array, masked: jax.Array,
                 hidden_tail: jax.Array, mask_id: int) -> jax.Array:
  """int32 [..., B, L]: ``tokens`` [B, L] with MASK at the masked and hidden-tail response positions.

  ``masked`` is bool [..., B, R] (e.g. [mu, B, R]); ``hidden_tail`` bool [B, R]. Positions outside
  the response window — the prompt, image prefix, soi/eoi — are never changed.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, length = tokens.shape
  r = masked.shape[-1]
  pos = response_positions(response_start, r)
  rows = jnp.arange(b)[:, None]

  def one(m):
    full = jnp.zeros((b, length), bool).at[rows, pos].set(m | hidden_tail)
    return jnp.where(full, jnp.int32(mask_id), tokens)

  lead = masked.shape[:-2]
  flat = masked.reshape((-1, b, r))
  return jax.vmap(one)(flat).reshape(lead + (b, length))

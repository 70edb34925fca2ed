"""The UniGRPO objective on partially masked responses (spec §8.2, with §8.3's variants).

For a row i with advantage A_i, masked response positions M_i (the same perturbed input is fed to
π_θ, π_old and π_ref) and per-token log-likelihoods ``logp = log π(o_t | prompt, õ)`` at t ∈ M_i:

    ρ_t    = exp(logp_θ − logp_old)                          (log-ratio clipped to ±max_log_ratio)
    pol_i  = (1/|M_i|) Σ_t min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i)
    kl_i   = (1/|M_i|) Σ_t [exp(d_t) − d_t − 1],   d_t = logp_ref − logp_θ     (k3 estimator)
    loss   = −(1/Σ w) Σ_i w_i (pol_i − β kl_i)

``w_i`` is the sequence weight (1, or 0 for a group dropped by the accuracy filter). Variants of
the public RL code: ``kl_target="old"`` (d_t = logp_old − logp_θ, no reference model) and
``kl_reduce="sum"`` (kl_i = Σ_t k3 without the 1/|M_i|). |M_i| is clamped to ≥ 1.

Metrics (all float32 scalars; token means are over the masked tokens of weighted rows):
``policy_loss`` (−mean pol_i), ``kl`` (mean over rows of the per-token mean k3 against the KL
target, whatever ``kl_reduce``), ``clip_frac`` (fraction of masked tokens where the clipped branch
is active, i.e. the token's gradient is zeroed: ρ > 1+ε with A > 0 or ρ < 1−ε with A < 0),
``ratio_mean``, ``entropy`` (mean softmax entropy of π_θ in nats, when given), ``masked_tokens``
(mean |M_i|), ``advantage_abs`` (mean |A_i|).

Default β = 0.04 with the token-averaged KL against a frozen reference: the form and value of
DeepSeekMath's GRPO and of d1's diffu-GRPO, the objective UniGRPO modifies. The public RL
code's 0.01 multiplies a *summed* KL against π_old (a trust region, not an anchor); use
``kl_target="old", kl_reduce="sum", beta=0.01`` to reproduce it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.rl.masking import response_positions

KL_TARGETS = ("ref", "old")
KL_REDUCE = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static objective settings (see the module docstring)."""
  epsilon: float = 0.2
  beta: float = 0.04
  kl_target: str = "ref"
  kl_reduce: str = "mean"
  max_log_ratio: float = 20.0

  def __post_init__(self):
    if self.kl_target not in KL_TARGETS:
      raise ValueError(f"kl_target {self.kl_target!r} is not one of {KL_TARGETS}")
    if self.kl_reduce not in KL_REDUCE:
      raise ValueError(f"kl_reduce {self.kl_reduce!r} is not one of {KL_REDUCE}")
    if not 0.0 <= self.epsilon < 1.0:
      raise ValueError(f"epsilon must lie in [0, 1), got {self.epsilon}")
    if self.beta < 0:
      raise ValueError(f"beta must be >= 0, got {self.beta}")

  @property
  def needs_ref(self) -> bool:
    """Whether the objective reads reference-policy log-probs."""
    return self.kl_target == "ref" and self.beta > 0


def token_logprobs(logits: jax.Array, targets: jax.Array, with_entropy: bool = False
                   ) -> tuple[jax.Array, jax.Array | None]:
  """(log softmax(logits)[target] float32 [...], softmax entropy float32 [...] or None).

  ``logits`` [..., V] any float dtype (computed in float32); ``targets`` int [...] in [0, V). An
  out-of-range target is an error, never a silently wrong likelihood: inside a traced program it
  cannot raise, so its log-probability is NaN (the loss turns NaN and the trainer stops on it);
  the UniGRPO stage checks its targets on the host before they reach the device
  (:func:`check_targets`), which names the offending rows.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets.astype(jnp.int32)[..., None], axis=-1, mode="fill",
                               fill_value=jnp.nan, wrap_negative_indices=False)
  logp = picked[..., 0] - lse
  if not with_entropy:
    return logp, None
  p = jnp.exp(logits - lse[..., None])
  return logp, lse - jnp.sum(p * logits, axis=-1)


def check_targets(targets: Any, vocab_range: tuple[int, int], what: str = "targets") -> None:
  """Host check: every token id of ``targets`` int [B, R] lies in ``[start, end)`` (the scored
  vocabulary); raises ValueError naming the first offending rows and values otherwise."""
  t = np.asarray(targets)
  start, end = int(vocab_range[0]), int(vocab_range[1])
  bad = (t < start) | (t >= end)
  if bad.any():
    rows = np.flatnonzero(bad.any(axis=tuple(range(1, t.ndim)))) if t.ndim > 1 else np.flatnonzero(bad)
    raise ValueError(f"{what}: {int(bad.sum())} token ids outside the scored vocabulary [{start}, {end}) "
                     f"(rows {rows[:8].tolist()}{' …' if rows.size > 8 else ''}; values "
                     f"{np.unique(t[bad])[:8].tolist()})")


def response_logprobs(params: Any, cfg: MMaDAConfig, input_ids: jax.Array, response_start: jax.Array,
                      targets: jax.Array, *, attention_mask: jax.Array | None = None,
                      vocab_range: tuple[int, int] | None = None, with_entropy: bool = False
                      ) -> tuple[jax.Array, jax.Array | None]:
  """Per-token log-likelihood of the response under the model fed ``input_ids``.

  Logits are projected only at the R response positions (not the whole sequence).

  Args:
    input_ids: int [B, L] (the perturbed sequence); attention_mask: int [B, L] or None.
    response_start: int [B], first response position of each row.
    targets: int [B, R] clean response token ids.
    vocab_range: (start, end) to score against a slice of the vocabulary (T2I: the codebook
      columns, as the MaskGIT sampler draws from); targets are token ids (start is subtracted).
      A target outside the scored vocabulary gives NaN (:func:`token_logprobs`).
  Returns:
    (logp float32 [B, R], entropy float32 [B, R] or None).
  """
  b, r = targets.shape
  hidden = transformer.forward(params, cfg, input_ids, attention_mask=attention_mask, return_hidden=True)
  pos = response_positions(response_start, r)
  h = hidden[jnp.arange(b)[:, None], pos]
  start, end = (0, None) if vocab_range is None else (int(vocab_range[0]), int(vocab_range[1]))
  logits = transformer.project_logits(params, cfg, h, start, end)
  return token_logprobs(logits, targets - start, with_entropy)


def grpo_rows(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
              loss_mask: jax.Array, config: LossConfig, entropy: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-row terms of the objective (module docstring), float32 [B] each: ``objective`` (pol_i −
  β kl_i), ``pol``, ``kl_mean`` (per-token mean k3), ``count`` (|M_i|), and the token sums behind
  the token-mean metrics: ``clip_tokens``, ``ratio_sum``, ``entropy_sum`` (when ``entropy``);
  ``adv`` (A_i). Arguments as :func:`grpo_objective`'s."""
  f32 = jnp.float32
  logp = logp.astype(f32)
  old = jax.lax.stop_gradient(old_logp.astype(f32))
  m = loss_mask.astype(f32)
  adv = jax.lax.stop_gradient(advantages.astype(f32))[:, None]
  lim = f32(config.max_log_ratio)
  eps = f32(config.epsilon)

  count = jnp.sum(m, axis=-1)
  denom = jnp.maximum(count, 1.0)
  ratio = jnp.exp(jnp.clip(logp - old, -lim, lim))
  clipped = jnp.clip(ratio, 1.0 - eps, 1.0 + eps)
  surr = jnp.minimum(ratio * adv, clipped * adv)
  pol = jnp.sum(m * surr, axis=-1) / denom

  if config.kl_target == "ref":
    if ref_logp is None:
      if config.beta > 0:
        raise ValueError("kl_target='ref' with beta > 0 needs ref_logp")
      target = old
    else:
      target = jax.lax.stop_gradient(ref_logp.astype(f32))
  else:
    target = old
  d = jnp.clip(target - logp, -lim, lim)
  k3 = jnp.exp(d) - d - 1.0
  kl_sum = jnp.sum(m * k3, axis=-1)
  kl_mean = kl_sum / denom
  kl_term = kl_mean if config.kl_reduce == "mean" else kl_sum
  active = ((ratio > 1.0 + eps) & (adv > 0)) | ((ratio < 1.0 - eps) & (adv < 0))
  out = {"objective": pol - f32(config.beta) * kl_term, "pol": pol, "kl_mean": kl_mean, "count": count,
         "clip_tokens": jnp.sum(m * active.astype(f32), axis=-1),
         "ratio_sum": jax.lax.stop_gradient(jnp.sum(m * ratio, axis=-1)), "adv": adv[:, 0]}
  if entropy is not None:
    out["entropy_sum"] = jnp.sum(m * jax.lax.stop_gradient(entropy.astype(f32)), axis=-1)
  return out


def reduce_rows(rows: dict[str, jax.Array], seq_weight: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) from :func:`grpo_rows` terms [B] (possibly several tasks' rows concatenated):
  ``loss = −Σ w_i objective_i / Σ w_i``; sequence means of pol / kl / |M| / |A|, token means
  (over the masked tokens of weighted rows) of the clip fraction, ρ and the entropy."""
  f32 = jnp.float32
  b = rows["objective"].shape[0]
  w = jnp.ones((b,), f32) if seq_weight is None else seq_weight.astype(f32)
  w_total = jnp.sum(w)
  safe = jnp.maximum(w_total, 1e-12)

  def seq_mean(x):
    return jnp.where(w_total > 0, jnp.sum(w * x) / safe, 0.0)

  tok_total = jnp.sum(w * rows["count"])

  def tok_mean(x):
    return jnp.where(tok_total > 0, jnp.sum(w * x) / jnp.maximum(tok_total, 1e-12), 0.0)

  loss = -seq_mean(rows["objective"])
  metrics = {
      "policy_loss": -seq_mean(rows["pol"]),
      "kl": seq_mean(rows["kl_mean"]),
      "clip_frac": tok_mean(rows["clip_tokens"]),
      "ratio_mean": tok_mean(rows["ratio_sum"]),
      "masked_tokens": seq_mean(rows["count"]),
      "advantage_abs": seq_mean(jnp.abs(rows["adv"])),
  }
  if "entropy_sum" in rows:
    metrics["entropy"] = tok_mean(rows["entropy_sum"])
  return loss, {k: jax.lax.stop_gradient(v).astype(f32) for k, v in metrics.items()}


def grpo_objective(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                   advantages: jax.Array, loss_mask: jax.Array, config: LossConfig,
                   seq_weight: jax.Array | None = None, entropy: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped policy objective with the k3 KL penalty (module docstring).

  Args:
    logp: float [B, R] log π_θ at the response tokens (differentiated).
    old_logp, ref_logp: float [B, R] log π_old / log π_ref on the same inputs (treated as data;
      ref_logp may be None when ``config.needs_ref`` is False).
    advantages: float [B]; loss_mask: bool/float [B, R] (1 = masked and scored).
    seq_weight: float [B] (default 1); entropy: float [B, R] for the metric, optional.
  Returns:
    (loss float32 scalar, metrics dict of float32 scalars).
  """
  return reduce_rows(grpo_rows(logp, old_logp, ref_logp, advantages, loss_mask, config, entropy), seq_weight)

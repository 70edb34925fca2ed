"""UniGRPO updates: the π_old / π_ref pass over a rollout's μ maskings, and the trainer's loss.

* :func:`prepare_updates` (one jitted no-grad program, ``lax.map`` over the μ maskings): the
  structured maskings of a rollout batch and log π_old / log π_ref of its response tokens on
  those exact inputs;
* :func:`grpo_loss_fn`: log π_θ at the response positions of one inner iteration's batch, then
  :func:`mmada_jax.rl.loss.grpo_objective`;
* :func:`mixed_loss_fn`: the unified stage's loss over a batch ``{task: that task's batch}``
  (each task's own shapes and scored vocabulary), one objective over all rows;
* :func:`batch_spec`: the batch :func:`grpo_loss_fn` reads, as ``ShapeDtypeStruct`` s;
* :func:`step_layout`: the μ inner batches of a rollout, kept on the devices, in the train step's
  layout ``[A, rows/A, ...]``.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.rl import masking as mask_lib
from mmada_jax.rl.loss import LossConfig, grpo_rows, reduce_rows, response_logprobs

ROW_STATISTICS = ("advantages", "seq_weight", "reward", "reward_std", "response_length", "mask_ratio")
"""The float32 [B] leaves of an update batch (besides ``reward/<name>``)."""


def batch_spec(rows: int, length: int, response: int, reward_names: Sequence[str] = ()
               ) -> dict[str, jax.ShapeDtypeStruct]:
  """One inner iteration's batch (:func:`grpo_loss_fn`) for ``rows`` rollouts of ``length``
  tokens with a ``response``-token window: input_ids, attention_mask int32 [rows, length];
  response_start int32 [rows]; targets int32, loss_mask bool, old_logp / ref_logp float32
  [rows, response]; :data:`ROW_STATISTICS` and ``reward/<name>`` per reward float32 [rows]."""
  i32, f32 = jnp.int32, jnp.float32
  s = jax.ShapeDtypeStruct
  out = {"input_ids": s((rows, length), i32), "attention_mask": s((rows, length), i32),
         "response_start": s((rows,), i32), "targets": s((rows, response), i32),
         "loss_mask": s((rows, response), jnp.bool_), "old_logp": s((rows, response), f32),
         "ref_logp": s((rows, response), f32)}
  out.update({k: s((rows,), f32) for k in ROW_STATISTICS})
  out.update({f"reward/{name}": s((rows,), f32) for name in reward_names})
  return out


@functools.partial(jax.jit, static_argnames=("model_cfg", "mu", "masking", "mask_id", "vocab_range", "need_ref"))
def prepare_updates(params: Any, ref_params: Any, tokens: jax.Array, attention_mask: jax.Array,
                    response_start: jax.Array, trainable: jax.Array, hidden_tail: jax.Array, key: jax.Array,
                    *, model_cfg: MMaDAConfig, mu: int, masking: mask_lib.MaskingConfig, mask_id: int,
                    vocab_range: tuple[int, int] | None, need_ref: bool) -> dict[str, jax.Array]:
  """The μ maskings of a rollout batch and log π_old / log π_ref of its response tokens.

  Args: tokens int [B, L] (clean rollouts); attention_mask int [B, L]; response_start int [B];
  trainable, hidden_tail bool [B, R] (:func:`masking.split_response`).
  Returns: input_ids int32 [μ, B, L]; loss_mask bool [μ, B, R]; mask_ratio float32 [μ, B];
  old_logp, ref_logp float32 [μ, B, R] (ref = old when ``need_ref`` is False).
  """
  b, r = trainable.shape
  masked, ratio = mask_lib.sample_response_masks(key, trainable, mu, masking)
  noisy = mask_lib.noisy_inputs(tokens, response_start, masked, hidden_tail, mask_id)
  pos = mask_lib.response_positions(response_start, r)
  targets = tokens[jnp.arange(b)[:, None], pos]

  def logp(p, x):
    return response_logprobs(p, model_cfg, x, response_start, targets, attention_mask=attention_mask,
                             vocab_range=vocab_range)[0]

  old = jax.lax.map(lambda x: logp(params, x), noisy)
  ref = jax.lax.map(lambda x: logp(ref_params, x), noisy) if need_ref else old
  return {"input_ids": noisy, "loss_mask": masked, "mask_ratio": ratio, "old_logp": old, "ref_logp": ref}


def _task_rows(params: Any, batch: Mapping[str, jax.Array], model_cfg: MMaDAConfig, loss_cfg: LossConfig,
               vocab_range: tuple[int, int] | None) -> dict[str, jax.Array]:
  logp, ent = response_logprobs(params, model_cfg, batch["input_ids"], batch["response_start"],
                                batch["targets"], attention_mask=batch["attention_mask"],
                                vocab_range=vocab_range, with_entropy=True)
  return grpo_rows(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
                   loss_cfg, ent)


def _row_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  out = {"reward_mean": jnp.mean(batch["reward"].astype(jnp.float32))}
  for k in ("reward_std", "response_length", "mask_ratio"):
    out[k] = jnp.mean(batch[k].astype(jnp.float32))
  return out


def grpo_loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any, *,
                 model_cfg: MMaDAConfig, loss_cfg: LossConfig, vocab_range: tuple[int, int] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The trainer's loss: log π_θ at the response tokens of ``batch`` → UniGRPO objective.

  ``batch`` (one inner iteration, rows [B]): input_ids, attention_mask [B, L]; response_start [B];
  targets int [B, R]; loss_mask bool [B, R]; old_logp, ref_logp float32 [B, R]; advantages,
  seq_weight [B]; rollout statistics ``reward``, ``reward_std``, ``response_length``,
  ``mask_ratio``, ``reward/<name>`` [B] are averaged into the metrics.
  """
  del rng, frozen
  loss, metrics = reduce_rows(_task_rows(params, batch, model_cfg, loss_cfg, vocab_range), batch["seq_weight"])
  metrics["loss"] = loss
  metrics.update(_row_stats(batch))
  for k, v in batch.items():
    if k.startswith("reward/"):
      metrics[k] = jnp.mean(v.astype(jnp.float32))
  return loss, metrics


def mixed_loss_fn(params: Any, batch: Mapping[str, Mapping[str, jax.Array]], rng: jax.Array, frozen: Any, *,
                  model_cfg: MMaDAConfig, loss_cfg: LossConfig,
                  vocab_ranges: Mapping[str, tuple[int, int] | None]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The unified stage's loss: ``batch[task]`` is that task's inner-iteration batch (as
  :func:`grpo_loss_fn`'s); every task's rows get their per-row terms (per-token means within each
  row, the task's own scored vocabulary), and ONE objective is formed over the concatenated rows:
  ``loss = −Σ_i w_i (pol_i − β kl_i) / Σ_i w_i`` over all tasks' rows — each rollout counts once,
  whatever its response length. Metrics: the global ones of :func:`grpo_loss_fn` over all rows,
  and per task ``reward_mean/<t>``, ``reward/<t>/<name>``, ``kl/<t>``, ``clip_frac/<t>``,
  ``entropy/<t>``, ``response_length/<t>``, ``policy_loss/<t>``."""
  del rng, frozen
  names = sorted(batch)
  per = {t: _task_rows(params, batch[t], model_cfg, loss_cfg, vocab_ranges[t]) for t in names}
  rows = {k: jnp.concatenate([per[t][k] for t in names]) for k in per[names[0]]}
  weight = jnp.concatenate([batch[t]["seq_weight"].astype(jnp.float32) for t in names])
  loss, metrics = reduce_rows(rows, weight)
  metrics["loss"] = loss
  flat = {k: jnp.concatenate([batch[t][k].astype(jnp.float32) for t in names])
          for k in ("reward", "reward_std", "response_length", "mask_ratio")}
  metrics.update(_row_stats(flat))
  for t in names:
    _, m = reduce_rows(per[t], batch[t]["seq_weight"])
    stats = _row_stats(batch[t])
    metrics.update({f"reward_mean/{t}": stats["reward_mean"], f"response_length/{t}": stats["response_length"],
                    f"kl/{t}": m["kl"], f"clip_frac/{t}": m["clip_frac"], f"policy_loss/{t}": m["policy_loss"],
                    f"entropy/{t}": m["entropy"]})
    for k, v in batch[t].items():
      if k.startswith("reward/"):
        metrics[f"reward/{t}/{k[len('reward/'):]}"] = jnp.mean(v.astype(jnp.float32))
  return loss, metrics


def step_layout(tree: Any, micro: int | None, shardings: tuple[Any, ...] | None = None) -> Any:
  """Device leaves ``[B, ...]`` (global rows) → ``[A, B/A, ...]`` with micro-batch ``a`` holding
  rows ``a, a+A, …`` — the layout ``sharding.to_global(..., micro=A)`` gives host rows, so both
  paths put the same rows in each micro-batch. ``shardings[k]``: the NamedSharding of a result of
  rank k + 2 (``P(None, <batch axes>, ...)``), or None (no mesh). ``micro=None``: as it is."""
  if micro is None:
    return tree
  for x in jax.tree.leaves(tree):
    if x.shape[0] % micro:
      raise ValueError(f"{x.shape[0]} rollout rows do not split into optimizer.grad_accum={micro} micro-batches")
  return _step_layout(tree, int(micro), shardings)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _step_layout(tree: Any, micro: int, shardings: tuple[Any, ...] | None) -> Any:
  def leaf(x):
    y = jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)
    return y if shardings is None else jax.lax.with_sharding_constraint(y, shardings[y.ndim - 2])
  return jax.tree.map(leaf, tree)

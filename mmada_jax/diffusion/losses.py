"""MMaDA training losses (``models/modeling_mmada.py::forward_process``), pure jnp.

Each loss is written as ``Σ_positions w · CE`` with a per-position weight w [B, L] float32:

* t2i: w = 1/count on (position ≥ S+1, label ≠ -100): mean CE, no 1/p.
* lm (pre-training): w = 1/(p_b · B · L) on masked positions.
* lm_chat / mmu: w = 1/(p_b · ans_len_b · B) on masked positions.

"Masked" is ``input_ids == MASK`` (and label ≠ -100), as in the original. CE is over the full
vocabulary in float32 (logsumexp). The weights let a trainer compute logits only where w > 0
(:func:`select_positions`) instead of full [B, L, V] logits; every function here also accepts
full logits. Everything is jit-able with static batch sizes and lengths.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from mmada_jax.prompting.special_tokens import IGNORE_ID


class LossCoefficients(NamedTuple):
  """Weights of the three losses in the total: c_t2i·L_t2i + c_lm·L_lm + c_mmu·L_mmu."""

  t2i: float = 1.0
  lm: float = 1.0
  mmu: float = 1.0


# cross-entropy --------------------------------------------------------------------------------

def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-position CE over the last axis: logits [..., V] (any float dtype), labels [...] int.

  Returns float32 [...]: logsumexp(logits) - logits[label] in float32, 0 where label = -100.
  """
  logits = logits.astype(jnp.float32)
  labels = jnp.asarray(labels)
  valid = labels != IGNORE_ID
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def weighted_loss(ce: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ weights · ce (float32 scalar); positions with weight 0 contribute 0 even if ce is inf."""
  return jnp.sum(jnp.where(weights != 0, weights * ce, 0.0), dtype=jnp.float32)


def select_positions(weights: jax.Array, max_positions: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first ``max_positions`` positions with nonzero weight, for computing logits there only.

  Args: weights [B, L] (or any shape; flattened row-major).
  Returns: (flat indices [K] int32 into the flattened weights, their weights [K] float32 with 0 on
  unused slots, number of nonzero positions that did not fit (int32; nonzero = loss truncated)).
  """
  flat = weights.reshape(-1)
  k = int(max_positions)
  nonzero = flat != 0
  order = jnp.argsort(~nonzero, stable=True)[:k].astype(jnp.int32)
  count = jnp.sum(nonzero, dtype=jnp.int32)
  used = jnp.arange(order.shape[0]) < count
  return order, jnp.where(used, flat[order], 0.0).astype(jnp.float32), jnp.maximum(count - k, 0)


# per-task weights ---------------------------------------------------------------------------

def _row(x: jax.Array) -> jax.Array:
  """Per-row [B] -> [B, 1]; per-position [B, L] (the original's repeated layout) kept. float32."""
  x = jnp.asarray(x, jnp.float32)
  return x[:, None] if x.ndim == 1 else x


def t2i_loss_weights(labels: jax.Array, max_text_len: int) -> jax.Array:
  """Weights [B, L] of the t2i loss: 1/count on positions ≥ S+1 with label ≠ -100 (0 if none)."""
  pos = jnp.arange(labels.shape[1])[None, :]
  valid = (pos >= max_text_len + 1) & (labels != IGNORE_ID)
  count = jnp.sum(valid, dtype=jnp.float32)
  return jnp.where(valid, 1.0 / jnp.maximum(count, 1.0), 0.0)


def _masked(input_ids: jax.Array, labels: jax.Array, mask_id: int) -> jax.Array:
  return (input_ids == mask_id) & (labels != IGNORE_ID)


def lm_loss_weights(input_ids: jax.Array, labels: jax.Array, p_mask: jax.Array, mask_id: int) -> jax.Array:
  """Weights [B, L] of the pre-training lm loss Σ CE/p / (B·L) over masked positions.
  p_mask: [B] or [B, L] float."""
  b, length = input_ids.shape
  return jnp.where(_masked(input_ids, labels, mask_id), 1.0 / (_row(p_mask) * (b * length)), 0.0)


def answer_loss_weights(input_ids: jax.Array, labels: jax.Array, p_mask: jax.Array, answer_lengths: jax.Array,
                        mask_id: int, min_answer_length: int | None = None) -> jax.Array:
  """Weights [B, L] of the lm_chat / mmu loss (1/B) Σ_b Σ_masked CE / (p_b · ans_len_b).

  answer_lengths: [B] or [B, L] #answer positions; ``min_answer_length`` clamps it from below
  (stage 2.2 clamps lm_chat at 1; the original mmu loss does not clamp).
  """
  b = input_ids.shape[0]
  ans = _row(answer_lengths)
  if min_answer_length is not None:
    ans = jnp.maximum(ans, float(min_answer_length))
  return jnp.where(_masked(input_ids, labels, mask_id), 1.0 / (_row(p_mask) * ans * b), 0.0)


# losses from logits -------------------------------------------------------------------------

def t2i_loss(logits: jax.Array, labels: jax.Array, max_text_len: int) -> jax.Array:
  """Mean CE over t2i positions ≥ S+1 with label ≠ -100. logits [B, L, V], labels [B, L]."""
  return weighted_loss(token_cross_entropy(logits, labels), t2i_loss_weights(labels, max_text_len))


def lm_loss(logits: jax.Array, labels: jax.Array, input_ids: jax.Array, p_mask: jax.Array,
            mask_id: int) -> jax.Array:
  """Pre-training lm loss Σ_masked CE/p / (B·L). logits [B, L, V]; ids, labels [B, L]."""
  return weighted_loss(token_cross_entropy(logits, labels), lm_loss_weights(input_ids, labels, p_mask, mask_id))


def answer_loss(logits: jax.Array, labels: jax.Array, input_ids: jax.Array, p_mask: jax.Array,
                answer_lengths: jax.Array, mask_id: int, min_answer_length: int | None = None) -> jax.Array:
  """lm_chat / mmu loss (1/B) Σ_b Σ_masked CE / (p_b · ans_len_b). logits [B, L, V]."""
  w = answer_loss_weights(input_ids, labels, p_mask, answer_lengths, mask_id, min_answer_length)
  return weighted_loss(token_cross_entropy(logits, labels), w)


lm_chat_loss = answer_loss
mmu_loss = answer_loss


# mixed batch --------------------------------------------------------------------------------

def mixed_loss_weights(batch: Mapping[str, jax.Array], *, batch_sizes: tuple[int, int, int], max_text_len: int,
                       mask_id: int, min_answer_length_lm: int | None = None,
                       min_answer_length_mmu: int | None = None) -> dict[str, jax.Array]:
  """Per-task weights [B, L] (zero outside the task's rows) of a t2i + lm + mmu batch.

  Args:
    batch: ``input_ids``, ``labels`` [B, L]; ``p_mask_lm`` [B_lm(, L)]; ``p_mask_mmu`` and
      ``answer_lengths`` [B_mmu(, L)]; optional ``answer_lengths_lm`` [B_lm(, L)]: when present
      the lm rows use the answer-length (lm_chat) formula, else the pre-training one, exactly as
      the original ``forward_process(answer_lengths_lm=...)``.
    batch_sizes: static (B_t2i, B_lm, B_mmu), rows in that order, summing to B.
  Returns: {"t2i", "lm", "mmu"} -> [B, L] float32. A task with batch size 0 has zero weights.
  """
  ids, labels = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["labels"])
  nt, nl, nm = (int(x) for x in batch_sizes)
  if nt + nl + nm != ids.shape[0]:
    raise ValueError(f"batch sizes {batch_sizes} do not add up to the batch of {ids.shape[0]} rows")
  length = ids.shape[1]
  parts = {k: [] for k in ("t2i", "lm", "mmu")}

  def put(task: str, rows: slice, w: jax.Array | None):
    for k in parts:
      n = rows.stop - rows.start
      parts[k].append(w if (k == task and w is not None) else jnp.zeros((n, length), jnp.float32))

  t2i_rows, lm_rows, mmu_rows = slice(0, nt), slice(nt, nt + nl), slice(nt + nl, nt + nl + nm)
  if nt:
    put("t2i", t2i_rows, t2i_loss_weights(labels[t2i_rows], max_text_len))
  if nl:
    if batch.get("answer_lengths_lm") is not None:
      w = answer_loss_weights(ids[lm_rows], labels[lm_rows], batch["p_mask_lm"], batch["answer_lengths_lm"],
                              mask_id, min_answer_length_lm)
    else:
      w = lm_loss_weights(ids[lm_rows], labels[lm_rows], batch["p_mask_lm"], mask_id)
    put("lm", lm_rows, w)
  if nm:
    put("mmu", mmu_rows, answer_loss_weights(ids[mmu_rows], labels[mmu_rows], batch["p_mask_mmu"],
                                             batch["answer_lengths"], mask_id, min_answer_length_mmu))
  return {k: jnp.concatenate(v, axis=0) if v else jnp.zeros((0, length), jnp.float32) for k, v in parts.items()}


def mixed_loss(logits: jax.Array | None, batch: Mapping[str, jax.Array], *, batch_sizes: tuple[int, int, int],
               max_text_len: int, mask_id: int, coeffs: LossCoefficients | tuple = LossCoefficients(),
               min_answer_length_lm: int | None = None, min_answer_length_mmu: int | None = None,
               ce: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss of a concatenated t2i + lm + mmu batch (see :func:`mixed_loss_weights`).

  Args:
    logits: [B, L, V] logits of the whole batch, or None when ``ce`` is given.
    ce: [B, L] float32 per-position CE (e.g. computed at :func:`select_positions` only and
      scattered; any value where the weights are 0), instead of logits.
    coeffs: (c_t2i, c_lm, c_mmu).
  Returns: (c_t2i·L_t2i + c_lm·L_lm + c_mmu·L_mmu, {"loss_t2i", "loss_lm", "loss_mmu"}), float32.
  """
  if ce is None:
    if logits is None:
      raise ValueError("mixed_loss needs logits or ce")
    ce = token_cross_entropy(logits, batch["labels"])
  weights = mixed_loss_weights(batch, batch_sizes=batch_sizes, max_text_len=max_text_len, mask_id=mask_id,
                               min_answer_length_lm=min_answer_length_lm,
                               min_answer_length_mmu=min_answer_length_mmu)
  parts = {f"loss_{k}": weighted_loss(ce, w) for k, w in weights.items()}
  c = LossCoefficients(*coeffs)
  total = c.t2i * parts["loss_t2i"] + c.lm * parts["loss_lm"] + c.mmu * parts["loss_mmu"]
  return total, parts

"""The mixed t2i / lm / mmu masked-diffusion objective of pre-training and SFT (spec §4.3).

* :class:`MixedSpec`: its static settings (``config.stage`` / ``config.data``);
* :data:`BATCH_KEYS` / :func:`batch_spec`: the clean batch it reads (one dict per task);
* :func:`noise_mixed_batch`: masks that batch on device and concatenates the tasks' rows;
* :func:`chunked_cross_entropy`: the fused LM head + CE over chunks of positions (less memory);
* :func:`mixed_loss_fn`: one forward over the noised rows, the weighted t2i/lm/mmu loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from mmada_jax.diffusion import losses, masking
from mmada_jax.diffusion.schedules import get_schedule
from mmada_jax.model import lm_head, transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.builders import training_attention_bias
from mmada_jax.prompting.special_tokens import IGNORE_ID

TASKS = ("t2i", "lm", "mmu")
T2I_ATTENTION = ("hard", "original_additive")
LM_FORMATS = ("lm", "lm_chat")

BATCH_KEYS: dict[str, tuple[str, str]] = {"t2i": ("input_ids", "attention_mask"),
                                          "lm": ("input_ids", "prompt_mask"),
                                          "mmu": ("input_ids", "prompt_mask")}
"""The clean batch of :func:`noise_mixed_batch`: per present task, these int32 [rows, L] leaves."""


def batch_spec(rows: Mapping[str, int], length: int) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The clean mixed batch as ``ShapeDtypeStruct`` s: ``rows[task]`` rows of ``length`` tokens for
  each task with rows > 0 (a task with 0 rows is absent), int32 (:data:`BATCH_KEYS`)."""
  unknown = sorted(set(rows) - set(BATCH_KEYS))
  if unknown:
    raise ValueError(f"mixed batch: unknown tasks {unknown}; tasks are {TASKS}")
  out = {t: {k: jax.ShapeDtypeStruct((int(rows[t]), int(length)), jnp.int32) for k in BATCH_KEYS[t]}
         for t in TASKS if int(rows.get(t, 0)) > 0}
  if not out:
    raise ValueError("every flow has batch_size 0: set data.t2i/lm/mmu.batch_size")
  return out


@dataclasses.dataclass(frozen=True)
class MixedSpec:
  """Static settings of the mixed objective (from ``config.stage`` and ``config.data``)."""
  max_text_len: int
  mask_id: int
  mask_schedule: str = "cosine"
  min_masking_rate: float = 0.0
  text_eps: float = masking.TEXT_EPS
  lm_format: str = "lm"
  t2i_attention: str = "hard"
  coeffs: tuple[float, float, float] = (1.0, 1.0, 1.0)
  min_answer_length_lm: int = 0
  logits_chunk: int = 0

  @classmethod
  def from_config(cls, config: ConfigDict, model_cfg: MMaDAConfig) -> "MixedSpec":
    sc = config.stage
    spec = cls(max_text_len=int(config.data.max_text_len), mask_id=int(model_cfg.mask_token_id),
               mask_schedule=str(sc.mask_schedule), min_masking_rate=float(sc.min_masking_rate),
               text_eps=float(sc.text_eps), lm_format=str(sc.lm_format), t2i_attention=str(sc.t2i_attention),
               coeffs=(float(sc.coeff_t2i), float(sc.coeff_lm), float(sc.coeff_mmu)),
               min_answer_length_lm=int(sc.min_answer_length_lm), logits_chunk=int(sc.logits_chunk))
    if spec.logits_chunk < 0:
      raise ValueError(f"stage.logits_chunk={spec.logits_chunk} must be >= 0 (0 = full [B, L, V] logits)")
    if spec.t2i_attention not in T2I_ATTENTION:
      raise ValueError(f"stage.t2i_attention={spec.t2i_attention!r} is not one of {T2I_ATTENTION}")
    if spec.lm_format not in LM_FORMATS:
      raise ValueError(f"stage.lm_format={spec.lm_format!r} is not one of {LM_FORMATS}")
    get_schedule(spec.mask_schedule)
    return spec


def noise_mixed_batch(batch: dict, rng: jax.Array, spec: MixedSpec) -> tuple[dict, tuple[int, int, int]]:
  """Masks a t2i/lm/mmu batch on device; returns the concatenated loss batch and row counts.

  Returns ({input_ids, labels, attention_mask [B, L], p_mask_lm, p_mask_mmu, answer_lengths
  [B_task], answer_lengths_lm [B_lm] (lm_chat only)}, (B_t2i, B_lm, B_mmu)).
  """
  k_img, k_lm, k_mmu = jax.random.split(rng, 3)
  ids, labels, attn, sizes = [], [], [], []
  out: dict[str, jax.Array] = {}
  s, mask_id = spec.max_text_len, spec.mask_id
  if "t2i" in batch:
    t = batch["t2i"]["input_ids"].astype(jnp.int32)
    b, length = t.shape
    n = length - s - 3
    img = masking.mask_image_tokens(k_img, t[:, s + 2:s + 2 + n], mask_id=mask_id,
                                    schedule=spec.mask_schedule, min_masking_rate=spec.min_masking_rate)
    pos = jnp.arange(length)[None, :]
    ids.append(t.at[:, s + 2:s + 2 + n].set(img.input_ids))
    labels.append(jnp.where(pos >= s + 1, t, IGNORE_ID).at[:, s + 2:s + 2 + n].set(img.labels))
    attn.append(batch["t2i"]["attention_mask"].astype(jnp.int32))
    sizes.append(b)
  else:
    sizes.append(0)
  for task, key in (("lm", k_lm), ("mmu", k_mmu)):
    if task not in batch:
      sizes.append(0)
      continue
    x = batch[task]["input_ids"].astype(jnp.int32)
    use_prompt = task == "mmu" or spec.lm_format == "lm_chat"
    tm = masking.mask_text_tokens(key, x, mask_id=mask_id, eps=spec.text_eps,
                                  prompt_mask=batch[task]["prompt_mask"] if use_prompt else None)
    ids.append(tm.input_ids)
    if task == "mmu":
      n_img = x.shape[1] - s
      labels.append(jnp.where(jnp.arange(x.shape[1])[None, :] < n_img, IGNORE_ID, x))
      out["p_mask_mmu"], out["answer_lengths"] = tm.p_mask[:, 0], tm.answer_lengths
    else:
      labels.append(x)
      out["p_mask_lm"] = tm.p_mask[:, 0]
      if use_prompt:
        out["answer_lengths_lm"] = tm.answer_lengths
    attn.append(jnp.ones_like(x))
    sizes.append(x.shape[0])
  out["input_ids"] = jnp.concatenate(ids, axis=0)
  out["labels"] = jnp.concatenate(labels, axis=0)
  out["attention_mask"] = jnp.concatenate(attn, axis=0)
  return out, tuple(sizes)


def chunked_cross_entropy(params: Any, cfg: MMaDAConfig, hidden: jax.Array, labels: jax.Array,
                          chunk: int) -> jax.Array:
  """Per-position CE [B, L] float32 from final-norm hidden states [B, L, d], applying the LM head
  to ``chunk`` positions at a time (:func:`mmada_jax.model.lm_head.fused_cross_entropy`).

  Equal to ``token_cross_entropy(project_logits(hidden), labels)``, but neither the forward nor
  the backward holds the float32 logits [B, L, V] (at the 8B shapes, 1539 positions × 134,656
  vocabulary = 0.83 GB per row): one chunk's [B, chunk, V] at a time, in a ``lax.scan``.
  """
  return lm_head.fused_cross_entropy(hidden, params["lm_head"], labels, chunk=chunk, dtype=cfg.dtype)


def mixed_loss_fn(params, batch, rng, frozen, *, model_cfg: MMaDAConfig, spec: MixedSpec):
  """One forward over the concatenated noised batch; weighted t2i/lm/mmu loss (spec §4.3).

  ``spec.logits_chunk > 0`` computes the LM head and cross-entropy in sequence chunks
  (:func:`chunked_cross_entropy`): same loss, less memory.
  """
  del frozen
  lb, sizes = noise_mixed_batch(batch, rng, spec)
  kw = dict(return_hidden=spec.logits_chunk > 0)
  if spec.t2i_attention == "hard":
    out = transformer.forward(params, model_cfg, lb["input_ids"], attention_mask=lb["attention_mask"], **kw)
  else:
    bias = training_attention_bias(lb["attention_mask"], sizes[0], mode="original_additive")
    out = transformer.forward(params, model_cfg, lb["input_ids"], attention_bias=bias, **kw)
  if spec.logits_chunk > 0:   # ``out`` is the final-norm hidden state
    logits, ce = None, chunked_cross_entropy(params, model_cfg, out, lb["labels"], spec.logits_chunk)
  else:
    logits, ce = out, None
  total, parts = losses.mixed_loss(
      logits, lb, ce=ce, batch_sizes=sizes, max_text_len=spec.max_text_len, mask_id=spec.mask_id,
      coeffs=losses.LossCoefficients(*spec.coeffs),
      min_answer_length_lm=spec.min_answer_length_lm if spec.min_answer_length_lm > 0 else None)
  return total, {"loss": total, **parts}

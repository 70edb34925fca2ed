"""The mixed t2i + lm + mmu stages: ``pretrain`` (stages 1.x) and ``sft`` (Mix-CoT, stages 2.x).

The objective itself is :mod:`mmada_jax.diffusion.objectives`; this module binds it to the
trainer: the data iterator named by ``config.data_source``, the vocabulary check against the
data's token ids, and the batch spec (``data.<task>.batch_size`` global rows of
``L = S_f + data.num_image_tokens + 3`` tokens per task, S_f = ``data.<task>.max_text_len`` or
``data.max_text_len``; tasks of different lengths get one forward each).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from mmada_jax.diffusion import objectives
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.train.stages import Stage, register_stage


def make_data_iterator(config: ConfigDict, process_index: int, process_count: int):
  """The mixed t2i/lm/mmu iterator named by ``config.data_source``: 'records' (the grain pipeline
  of ``mmada_jax.data`` over ``config.data``, whose ``metrics()`` the step loop writes: rows per
  source ``data/<task>/<name>``) or 'toy' (:mod:`mmada_jax.train.toy_data`)."""
  source = str(config.data_source)
  if source == "toy":
    from mmada_jax.train.toy_data import make_toy_iterator
    return make_toy_iterator(config.data, config.toy, process_index, process_count, int(config.data.seed))
  if source == "records":
    from mmada_jax.data.pipeline import make_mixed_iterator
    return make_mixed_iterator(config.data, process_index=process_index, process_count=process_count)
  raise ValueError(f"config.data_source={source!r} is not one of ('records', 'toy')")


def check_vocabulary(config: ConfigDict, model_cfg: MMaDAConfig) -> None:
  """The model's MASK id and vocabulary must match the data's token ids (clear error if not)."""
  if str(config.data_source) == "toy":
    from mmada_jax.train.toy_data import IMAGE_OFFSET, TOY_SPECIALS
    mask, top, where = TOY_SPECIALS.mask, IMAGE_OFFSET + int(config.toy.codebook_size), "the toy source"
  elif str(config.data_source) == "records":
    from mmada_jax.prompting.special_tokens import SpecialTokens
    from mmada_jax.prompting.text_tokenizer import TextTokenizer
    tok = TextTokenizer.from_file(str(config.data.text_tokenizer))
    sp = SpecialTokens.from_tokenizer(tok)
    mask, top = sp.mask, sp.image_offset + int(model_cfg.codebook_size)
    where = f"tokenizer {config.data.text_tokenizer}"
  else:
    return
  if model_cfg.mask_token_id != mask:
    raise ValueError(f"model.mask_token_id={model_cfg.mask_token_id} but {where} uses MASK id {mask}")
  if model_cfg.vocab_size < top:
    raise ValueError(f"model.vocab_size={model_cfg.vocab_size} cannot hold the image tokens of {where} "
                     f"(ids up to {top - 1}: image offset + codebook_size)")


def task_text_lens(config: ConfigDict) -> dict[str, int]:
  """S_f per present task: ``data.<task>.max_text_len``, or ``data.max_text_len`` where that is 0."""
  from mmada_jax.data.config import flow_text_len
  return {t: flow_text_len(config.data, t) for t in objectives.TASKS if int(config.data[t].batch_size) > 0}


def mixed_batch_spec(config: ConfigDict) -> dict[str, dict[str, Any]]:
  """The global batch of one step: ``data.<task>.batch_size`` rows (tasks with 0 rows absent) of
  ``S_f + data.num_image_tokens + 3`` int32 tokens, S_f per :func:`task_text_lens`
  (:func:`objectives.batch_spec`)."""
  n = int(config.data.num_image_tokens)
  lens = task_text_lens(config)
  if not lens:
    raise ValueError("every flow has batch_size 0: set data.t2i/lm/mmu.batch_size")
  spec: dict[str, dict[str, Any]] = {}
  for t, s in lens.items():
    spec.update(objectives.batch_spec({t: int(config.data[t].batch_size)}, s + n + 3))
  return spec


def mixed_sequences(batch: Any) -> tuple[int, int]:
  """(rows over the present tasks, mean token length per row, rounded up) of a mixed batch (host
  batch or spec); rows × length is the step's token count when the tasks share one length."""
  present = [t for t in objectives.TASKS if t in batch]
  shapes = [np.shape(batch[t]["input_ids"]) for t in present]
  rows = sum(int(sh[0]) for sh in shapes)
  tokens = sum(int(sh[0]) * int(sh[1]) for sh in shapes)
  return rows, -(-tokens // max(1, rows))


def _mixed_stage(name: str, config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool) -> Stage:
  spec = objectives.MixedSpec.from_config(config, model_cfg)
  batch = mixed_batch_spec(config)
  lens = task_text_lens(config)
  if not abstract:
    check_vocabulary(config, model_cfg)
  if len(set(lens.values())) <= 1:
    spec = dataclasses.replace(spec, max_text_len=next(iter(lens.values())))

    def loss_fn(params, batch, rng, frozen):
      return objectives.mixed_loss_fn(params, batch, rng, frozen, model_cfg=model_cfg, spec=spec)
  else:
    task_specs = {t: dataclasses.replace(spec, max_text_len=s) for t, s in lens.items()}

    def loss_fn(params, batch, rng, frozen):
      # Tasks of different lengths: one forward per task. Each task's loss is normalised over its
      # own rows and noise_mixed_batch draws every task's masks from its own split of ``rng``, so
      # the sum equals the one-forward loss of equal-length tasks.
      total, parts = jnp.float32(0.0), {}
      for t in objectives.TASKS:
        if t not in batch:
          continue
        loss, m = objectives.mixed_loss_fn(params, {t: batch[t]}, rng, frozen, model_cfg=model_cfg,
                                           spec=task_specs[t])
        total = total + loss
        parts = m if not parts else {k: parts[k] + m[k] for k in parts}
      parts["loss"] = total
      return total, parts

  def make_batches(process_index: int, process_count: int):
    if abstract:
      raise RuntimeError(f"stage {name!r} was built abstract (shapes only): it has no data")
    return make_data_iterator(config, process_index, process_count)

  return Stage(name=name, loss_fn=loss_fn, make_batches=make_batches, sequences=mixed_sequences,
               batch_spec=lambda: batch)


@register_stage("pretrain")
def pretrain_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """Stages 1.1–1.3 style mixed pre-training (lm rows: pre-training or chat formula per config)."""
  return _mixed_stage("pretrain", config, model_cfg, abstract)


@register_stage("sft")
def sft_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """Mix-CoT SFT (stages 2.x): the same loss with lm_chat rows (prompt never noised, 1/ans_len)."""
  if config.stage.lm_format != "lm_chat":
    raise ValueError("stage 'sft' trains lm_chat rows: set stage.lm_format='lm_chat'")
  return _mixed_stage("sft", config, model_cfg, abstract)

"""Training stages: what a step feeds the model and how the loss is formed.

The trainer never branches on a stage's name. A :class:`Stage` supplies

* ``make_batches(process_index, process_count)``: an iterator of per-host numpy batch pytrees
  (every leaf [B_local, ...]) with ``get_state()`` / ``set_state()`` (JSON-able);
* ``loss_fn(params, batch, rng, frozen) -> (loss, metrics)``: pure and traced inside the jitted
  step, once per micro-batch (metrics: dict of float32 scalars);
* optional ``pre_step(ctx, batch) -> batch``: host-side work before each step (GRPO rollouts and
  rewards), given a :class:`StepContext` with the current state;
* optional ``init_frozen(params) -> pytree``: arrays the loss reads but never trains (a
  reference policy), built once from the run's *initial* parameters (``init_from``'s, or the
  seeded random init; also on resume) and passed to every step;
* ``sequences(batch) -> (rows, length)``: global sequences per step and their length, for
  tokens/s and MFU.

``STAGES`` maps ``config.stage.name`` to a factory ``(config, model_cfg) -> Stage``. A stage
living elsewhere registers itself with :func:`register_stage` when its module (named by
``config.stage.module``) is imported.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from mmada_jax.diffusion import losses, masking
from mmada_jax.diffusion.schedules import get_schedule
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.builders import training_attention_bias
from mmada_jax.prompting.special_tokens import IGNORE_ID
from mmada_jax.sharding.rules import constrain

LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What ``pre_step`` may read: the current (device) state, the step about to run, and setup."""
  state: Any
  step: int
  mesh: jax.sharding.Mesh
  config: ConfigDict
  model_cfg: MMaDAConfig
  frozen: Any


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  loss_fn: LossFn
  make_batches: Callable[[int, int], Iterator]
  sequences: Callable[[Any], tuple[int, int]]
  metric_names: tuple[str, ...] = ("loss",)
  pre_step: Optional[Callable[[StepContext, Any], Any]] = None
  init_frozen: Optional[Callable[[Any], Any]] = None


StageFactory = Callable[[ConfigDict, MMaDAConfig], Stage]
STAGES: dict[str, StageFactory] = {}


def register_stage(name: str) -> Callable[[StageFactory], StageFactory]:
  def deco(factory: StageFactory) -> StageFactory:
    STAGES[name] = factory
    return factory
  return deco


def get_stage(config: ConfigDict, model_cfg: MMaDAConfig) -> Stage:
  """Builds the stage named by ``config.stage.name`` (importing ``config.stage.module`` first)."""
  name = str(config.stage.name)
  module = str(config.stage.get("module", "") or "")
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"stage {name!r}: cannot import its module {module!r} ({e})") from e
  if name not in STAGES:
    hint = f" (config.stage.module={module!r} did not register it)" if module else ""
    raise ValueError(f"training stage {name!r} is not registered{hint}; registered stages: "
                     f"{sorted(STAGES)}")
  return STAGES[name](config, model_cfg)


# ------------------------------------------------------------------- data sources

def make_data_iterator(config: ConfigDict, process_index: int, process_count: int):
  """The mixed t2i/lm/mmu iterator named by ``config.data_source``: 'records' (the grain
  pipeline of ``mmada_jax.data`` over ``config.data``) or 'toy' (:mod:`mmada_jax.train.toy_data`)."""
  source = str(config.data_source)
  if source == "toy":
    from mmada_jax.train.toy_data import make_toy_iterator
    return make_toy_iterator(config.data, config.toy, process_index, process_count, int(config.data.seed))
  if source == "records":
    from mmada_jax.data.pipeline import make_mixed_iterator
    return make_mixed_iterator(config.data, process_index=process_index, process_count=process_count)
  raise ValueError(f"config.data_source={source!r} is not one of ('records', 'toy')")


# ------------------------------------------------------------------- mixed t2i + lm + mmu

TASKS = ("t2i", "lm", "mmu")
T2I_ATTENTION = ("hard", "original_additive")
LM_FORMATS = ("lm", "lm_chat")


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
               min_answer_length_lm=int(sc.min_answer_length_lm), logits_chunk=int(sc.get("logits_chunk", 0)))
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
  to ``chunk`` positions at a time, each chunk rematerialised in the backward pass.

  Equal to ``token_cross_entropy(project_logits(hidden), labels)``, but only one chunk's float32
  logits [B, chunk, V] is live at a time instead of [B, L, V] (at the 8B shapes, 1539 positions ×
  134,656 vocabulary = 0.83 GB per row). The chunk loop is unrolled so that XLA's cost analysis
  counts every chunk.
  """
  b, length, _ = hidden.shape
  n = max(1, math.ceil(length / max(1, int(chunk))))
  c = math.ceil(length / n)
  pad = n * c - length
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_ID)

  @functools.partial(jax.checkpoint, prevent_cse=True)
  def piece(head: jax.Array, h: jax.Array, lab: jax.Array) -> jax.Array:
    logits = transformer.project_logits({"lm_head": head}, cfg, h)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    return losses.token_cross_entropy(logits, lab)

  ce = [piece(params["lm_head"], hidden[:, i * c:(i + 1) * c], labels[:, i * c:(i + 1) * c]) for i in range(n)]
  return jnp.concatenate(ce, axis=1)[:, :length]


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


def _mixed_sequences(process_count: int):
  def sequences(batch) -> tuple[int, int]:
    rows = sum(int(np.shape(batch[t]["input_ids"])[0]) for t in TASKS if t in batch)
    length = next(int(np.shape(batch[t]["input_ids"])[1]) for t in TASKS if t in batch)
    return rows * process_count, length
  return sequences


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


def _mixed_stage(name: str, config: ConfigDict, model_cfg: MMaDAConfig) -> Stage:
  spec = MixedSpec.from_config(config, model_cfg)
  check_vocabulary(config, model_cfg)

  def loss_fn(params, batch, rng, frozen):
    return mixed_loss_fn(params, batch, rng, frozen, model_cfg=model_cfg, spec=spec)

  def make_batches(process_index: int, process_count: int):
    return make_data_iterator(config, process_index, process_count)

  return Stage(name=name, loss_fn=loss_fn, make_batches=make_batches,
               sequences=_mixed_sequences(jax.process_count()),
               metric_names=("loss", "loss_t2i", "loss_lm", "loss_mmu"))


@register_stage("pretrain")
def pretrain_stage(config: ConfigDict, model_cfg: MMaDAConfig) -> Stage:
  """Stages 1.1–1.3 style mixed pre-training (lm rows: pre-training or chat formula per config)."""
  return _mixed_stage("pretrain", config, model_cfg)


@register_stage("sft")
def sft_stage(config: ConfigDict, model_cfg: MMaDAConfig) -> Stage:
  """Mix-CoT SFT (stages 2.x): the same loss with lm_chat rows (prompt never noised, 1/ans_len)."""
  if config.stage.lm_format != "lm_chat":
    raise ValueError("stage 'sft' trains lm_chat rows: set stage.lm_format='lm_chat'")
  return _mixed_stage("sft", config, model_cfg)

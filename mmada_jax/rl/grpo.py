"""The UniGRPO training stage (spec §8): rollouts → rewards → advantages → μ masked updates.

One rollout cycle serves μ = ``inner_updates`` optimizer steps:

1. ``pre_step`` (host) on the first step of a cycle, with the current params (= π_old):
   * G rollouts per prompt with the compiled samplers — text and MMU: the semi-AR block sampler
     (``generate_text``, or ``generate_text_cached`` when ``cache``/``threshold`` are set); T2I:
     the MaskGIT sampler, then an image decoder for the image scorers;
   * rewards on the host (:mod:`mmada_jax.rl.rewards`), group-normalised advantages
     (:mod:`mmada_jax.rl.advantages`), optionally the accuracy filter;
   * the μ structured maskings (:mod:`mmada_jax.rl.masking`) and, in one jitted no-grad
     program (``lax.map`` over the μ maskings), log π_old and log π_ref of every response token
     on those exact inputs.
   Each step of the cycle then returns the batch of its inner iteration n (the same perturbed
   input is used for π_θ, π_old and π_ref).
2. ``loss_fn`` (jitted by the trainer): log π_θ at the response positions only, then
   :func:`mmada_jax.rl.loss.grpo_objective`.

The prompt iterator yields every prompt batch μ times, tagged ``(index, inner)``; a batch whose
index differs from the cached rollout starts a new cycle. After a resume in mid-cycle the
rollout is redone with the restored params and the cycle continues at the restored ``inner``.

Sharding: rollouts and the log-prob pass run on global arrays, rows sharded over the mesh's
``(data, fsdp)`` axes (rows per process must divide by those shards) with the policy's own
parameter shardings; the reference params are a copy of the initial policy made by
``init_frozen`` with the same shardings. Host work (decoding, rewards) sees only the process's
own rows; groups never straddle processes.

Config (``config.rl``; names shared with ``configs/common.py::rl_config``; every field has the
default of :class:`GRPOConfig`, see ``docs/unigrpo.md`` for the reasons):

* ``task`` 'text' | 'mmu' | 't2i'; ``group_size`` G (16); ``prompts_per_step`` global prompts per
  rollout (8); ``inner_updates`` μ (5).
* objective: ``clip_eps`` ε (0.2), ``kl_beta`` β (0.04), ``kl_reference`` 'ref' | 'old',
  ``kl_reduce`` 'mean' | 'sum', ``adv_eps`` (1e-6).
* masking: ``mask_ratio`` 'paper_even' (t_n evenly spaced from t1 to T) | 'paper_stratified' |
  'random' (public code: U[low, high], Bernoulli); ``num_timesteps`` T (1000);
  ``mask_ratio_low`` / ``mask_ratio_high`` (0.1 / 0.9); ``response_tail`` 'mask' | 'train'.
* group filter: ``drop_degenerate_groups`` (False), ``filter_low`` / ``filter_high`` (0.05 /
  0.95), ``filter_reward`` (reward whose raw value > 0.5 means correct; '' = the first whose
  name contains 'correct').
* text / MMU sampler: ``max_prompt_len`` (prompts are left-padded to it: one compiled shape;
  0 = the longest prompt of the source),
  ``gen_length`` (128), ``block_length`` (64), ``gen_steps`` (128), ``temperature`` (0.8),
  ``remasking`` ('low_confidence'), ``cfg_scale`` (0), ``cache`` ('none' | 'prefix' | 'dual'),
  ``threshold`` (0 = off; e.g. 0.95 = the public rollout's dynamic decoding).
* T2I sampler: ``max_text_len`` S, ``t2i_timesteps`` (15), ``guidance_scale`` (3.5),
  ``t2i_temperature`` (1.0), ``noise_schedule`` ('cosine'); ``image_tokenizer`` (MAGVIT-v2
  directory for decoding).
* rewards: ``reward_correct`` (2.0), ``reward_format`` (0.5), ``reward_clip_scale`` (0.1),
  ``reward_image_reward_scale`` (0.1) weights; ``rewards_factory`` 'module:function' called with
  ``(config, model_cfg)`` returning a list of RewardFn (required for T2I: the scorers).
* prompts: ``prompt_source`` 'jsonl' | 'toy_digits' (default 'toy_digits' when
  ``config.data_source == 'toy'``); ``prompt_file`` (JSONL: ``question``/``prompt``, ``answer``,
  optional ``choices``, ``image_codes`` (MMU), ``label``); ``text_tokenizer`` (default
  ``config.data.text_tokenizer``); ``thinking_prompt`` (prepend the "think" system sentence);
  ``seed``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl import advantages as adv_lib
from mmada_jax.rl import masking as mask_lib
from mmada_jax.rl import rewards as rew_lib
from mmada_jax.rl.loss import LossConfig, grpo_objective, response_logprobs

TASKS = ("text", "mmu", "t2i")
MASK_RATIO = {"paper_even": ("unigrpo", "linspace"), "paper_stratified": ("unigrpo", "stratified"),
              "random": ("random", "linspace")}
BATCH_AXES = ("data", "fsdp")
THINKING_PROMPT = ("You should first think about the reasoning process in the mind and then provide the user "
                   "with the answer. The reasoning process is enclosed within <think> </think> tags, i.e. "
                   "<think> reasoning process here </think> answer here\n")
"""The "thinking mode" system sentence (``app.py``, ``training/data.py``)."""

Record = Mapping[str, Any]
"""A prompt: ``prompt_ids`` (list[int]: the full generation prompt for text/MMU, the caption ids
for T2I), ``prompt`` (str), and optionally ``answer``, ``choices``, ``label``."""


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static settings of the stage (fields documented in the module docstring)."""
  task: str = "text"
  group_size: int = 16
  prompts_per_step: int = 8
  inner_updates: int = 5
  loss: LossConfig = LossConfig()
  masking: mask_lib.MaskingConfig = mask_lib.MaskingConfig()
  response_tail: str = "mask"
  adv_eps: float = 1e-6
  drop_degenerate_groups: bool = False
  filter_low: float = 0.05
  filter_high: float = 0.95
  filter_reward: str = ""
  max_prompt_len: int = 0
  gen_length: int = 128
  block_length: int = 64
  gen_steps: int = 128
  temperature: float = 0.8
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0
  cache: str = "none"
  threshold: float = 0.0
  max_text_len: int = 0
  t2i_timesteps: int = 15
  guidance_scale: float = 3.5
  t2i_temperature: float = 1.0
  noise_schedule: str = "cosine"
  seed: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"rl.task={self.task!r} is not one of {TASKS}")
    for name in ("group_size", "prompts_per_step", "inner_updates", "gen_length", "block_length", "gen_steps",
                 "t2i_timesteps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
    if self.response_tail not in mask_lib.TAILS:
      raise ValueError(f"rl.response_tail={self.response_tail!r} is not one of {mask_lib.TAILS}")
    if self.max_prompt_len < 0:
      raise ValueError(f"rl.max_prompt_len={self.max_prompt_len} must be >= 0 (0 = the longest prompt)")
    if self.task == "t2i" and self.max_text_len < 1:
      raise ValueError("rl.task='t2i' needs rl.max_text_len (the text budget S of the t2i prompt)")

  @classmethod
  def from_config(cls, rl: ConfigDict | Mapping[str, Any] | None) -> "GRPOConfig":
    """From a ``config.rl`` section (absent fields keep their defaults)."""
    rl = dict(rl.to_dict() if isinstance(rl, ConfigDict) else (rl or {}))
    d = cls()
    g = lambda k, default: type(default)(rl.get(k, default))  # noqa: E731
    ratio = str(rl.get("mask_ratio", "paper_even"))
    if ratio not in MASK_RATIO:
      raise ValueError(f"rl.mask_ratio={ratio!r} is not one of {tuple(MASK_RATIO)}")
    method, spacing = MASK_RATIO[ratio]
    masking = mask_lib.MaskingConfig(
        method=method, spacing=spacing, num_timesteps=g("num_timesteps", 1000),
        random_low=g("mask_ratio_low", 0.1), random_high=g("mask_ratio_high", 0.9))
    loss = LossConfig(epsilon=g("clip_eps", d.loss.epsilon), beta=g("kl_beta", d.loss.beta),
                      kl_target=g("kl_reference", d.loss.kl_target), kl_reduce=g("kl_reduce", d.loss.kl_reduce))
    kw = {f.name: g(f.name, getattr(d, f.name)) for f in dataclasses.fields(cls)
          if f.name not in ("loss", "masking", "drop_degenerate_groups")}
    kw["drop_degenerate_groups"] = bool(rl.get("drop_degenerate_groups", False))
    return cls(loss=loss, masking=masking, **kw)

  @property
  def rollouts_per_step(self) -> int:
    return self.group_size * self.prompts_per_step


# ------------------------------------------------------------------ prompt sources

class PromptIterator:
  """Yields ``{"index": b, "inner": n, "records": [...]}`` — prompt batch b, each μ times.

  ``source(batch_index) -> list of global records`` (prompts_per_step of them); this process keeps
  its contiguous slice. Checkpointable: the state is the number of batches yielded.
  """

  def __init__(self, source: Callable[[int], Sequence[Record]], inner_updates: int,
               process_index: int = 0, process_count: int = 1):
    self.source, self.mu = source, int(inner_updates)
    self.pi, self.pc = int(process_index), int(process_count)
    self.calls = 0

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    index, inner = divmod(self.calls, self.mu)
    records = list(self.source(index))
    if len(records) % self.pc:
      raise ValueError(f"{len(records)} prompts per step do not split over {self.pc} processes")
    per = len(records) // self.pc
    self.calls += 1
    return {"index": index, "inner": inner, "records": records[self.pi * per:(self.pi + 1) * per]}

  def get_state(self) -> dict[str, int]:
    return {"calls": self.calls}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.calls = int(state["calls"])


def list_source(records: Sequence[Record], prompts_per_step: int, seed: int = 0,
                shuffle: bool = True) -> Callable[[int], list[Record]]:
  """Batches of ``prompts_per_step`` records over endless epochs (reshuffled per epoch by seed)."""
  records = list(records)
  if not records:
    raise ValueError("the prompt source is empty")
  n = len(records)

  def source(index: int) -> list[Record]:
    out = []
    for k in range(index * prompts_per_step, (index + 1) * prompts_per_step):
      epoch, pos = divmod(k, n)
      order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
      out.append(records[int(order[pos])])
    return out
  return source


def toy_digit_records(specials: SpecialTokens, num_digits: int = 10) -> list[dict[str, Any]]:
  """The toy verifiable task: prompt ``[BOS, d]`` (d = token id 0..num_digits-1), answer d.

  Its reward (:func:`toy_digit_reward`) is the fraction of response tokens, up to the first stop
  token, equal to d: a model must learn to copy the prompt's digit.
  """
  return [{"prompt_ids": [specials.bos, d], "prompt": str(d), "answer": d} for d in range(num_digits)]


def toy_digit_reward(weight: float = 1.0) -> rew_lib.FunctionReward:
  """Raw reward of the toy task: mean of ``token == answer`` over the response before its stop."""
  def fn(inputs: rew_lib.RewardInputs) -> np.ndarray:
    ids = inputs.need("completion_ids", "digit_match")
    ans = inputs.need("references", "digit_match")
    return np.array([float(np.mean(np.asarray(t) == int(a))) if len(t) else 0.0 for t, a in zip(ids, ans)],
                    np.float32)
  return rew_lib.FunctionReward(fn, "digit_match", weight)


def load_jsonl_records(path: str, task: str, tokenizer: Any, specials: SpecialTokens,
                       thinking_prompt: bool = True) -> list[dict[str, Any]]:
  """Prompt records from a JSONL file (fields in the module docstring).

  text / MMU prompts are the chat template with a generation prompt (the "think" sentence
  prepended to the question when ``thinking_prompt``); MMU prepends
  ``[mmu] [soi] image [eoi]`` (``mmu_gen_prompt``) from ``image_codes``. T2I keeps the caption ids.
  """
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
      text = row.get("question", row.get("prompt"))
      if text is None:
        raise ValueError(f"{path}:{line_no}: a record needs 'question' or 'prompt'")
      rec = {"prompt": str(text), "answer": row.get("answer"), "choices": row.get("choices"),
             "label": row.get("label")}
      if task == "t2i":
        rec["prompt_ids"] = list(tokenizer.encode(str(text)))
      else:
        content = (THINKING_PROMPT + str(text)) if thinking_prompt else str(text)
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
        if task == "mmu":
          codes = row.get("image_codes")
          if codes is None:
            raise ValueError(f"{path}:{line_no}: an MMU record needs 'image_codes' (pre-tokenised image)")
          ids = ([specials.mmu, specials.soi] + [int(c) + specials.image_offset for c in codes]
                 + [specials.eoi] + ids)
        rec["prompt_ids"] = ids
      out.append(rec)
  return out


# ------------------------------------------------------------------ device helpers

def _to_global(x: np.ndarray, mesh: jax.sharding.Mesh | None) -> jax.Array:
  """Process-local rows → a global array sharded over (data, fsdp) (or a plain array)."""
  x = np.asarray(x)
  if mesh is None:
    return jnp.asarray(x)
  spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
  return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)


def _to_local(x: jax.Array, mesh: jax.sharding.Mesh | None) -> np.ndarray:
  """A global row-sharded array → this process's rows as numpy."""
  if mesh is None or jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def _global_std(x: np.ndarray) -> float:
  if jax.process_count() == 1:
    return float(np.std(x))
  from jax.experimental import multihost_utils
  return float(np.std(np.asarray(multihost_utils.process_allgather(x, tiled=True))))


def pad_prompts(prompt_ids: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to ``width``: (ids int32 [n, width], attention_mask int32 [n, width])."""
  ids = np.full((len(prompt_ids), width), pad_id, np.int32)
  attn = np.zeros((len(prompt_ids), width), np.int32)
  for i, p in enumerate(prompt_ids):
    p = list(p)
    if len(p) > width:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than rl.max_prompt_len={width}")
    if p:
      ids[i, width - len(p):] = p
      attn[i, width - len(p):] = 1
  return ids, attn


# ------------------------------------------------------------------ jitted pieces

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
  logp, ent = response_logprobs(params, model_cfg, batch["input_ids"], batch["response_start"],
                                batch["targets"], attention_mask=batch["attention_mask"],
                                vocab_range=vocab_range, with_entropy=True)
  loss, metrics = grpo_objective(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                                 batch["loss_mask"], loss_cfg, batch["seq_weight"], ent)
  metrics["loss"] = loss
  metrics["reward_mean"] = jnp.mean(batch["reward"].astype(jnp.float32))
  for k in ("reward_std", "response_length", "mask_ratio"):
    metrics[k] = jnp.mean(batch[k].astype(jnp.float32))
  for k, v in batch.items():
    if k.startswith("reward/"):
      metrics[k] = jnp.mean(v.astype(jnp.float32))
  return loss, metrics


# ------------------------------------------------------------------ the stage

@dataclasses.dataclass
class _Cycle:
  index: int
  batches: list[dict[str, np.ndarray]]


class GRPOStage:
  """UniGRPO as a trainer stage (``stage()`` builds the trainer's :class:`Stage`).

  Args:
    model_cfg: the policy's config. cfg: :class:`GRPOConfig`.
    source: ``batch_index -> list of records`` over all processes (:func:`list_source`).
    rewards: the rewards to combine (:mod:`mmada_jax.rl.rewards`).
    specials: special-token ids (pad, stops, image offset, t2i/mmu layout tokens).
    tokenizer: decodes completions for text rewards (``decode(ids, skip_special_tokens=True)``);
      None = rewards see only ``completion_ids``.
    image_decoder: T2I: ``codes int [B, N] -> uint8 [B, H, W, 3]`` (:func:`magvit_decoder`).
  """

  def __init__(self, model_cfg: MMaDAConfig, cfg: GRPOConfig, source: Callable[[int], Sequence[Record]],
               rewards: Sequence[rew_lib.RewardFn], *, specials: SpecialTokens = SpecialTokens(),
               tokenizer: Any = None, image_decoder: Callable[[np.ndarray], np.ndarray] | None = None):
    if not rewards:
      raise ValueError("the GRPO stage needs at least one reward")
    if cfg.task != "t2i" and cfg.max_prompt_len < 1:
      raise ValueError("text/MMU rollouts need rl.max_prompt_len >= 1 (the compiled prompt width)")
    if cfg.task == "t2i" and image_decoder is None:
      raise ValueError("rl.task='t2i' needs an image decoder (set rl.image_tokenizer)")
    self.model_cfg, self.cfg, self.source = model_cfg, cfg, source
    self.rewards = list(rewards)
    self.specials, self.tokenizer, self.image_decoder = specials, tokenizer, image_decoder
    self.mask_id = int(model_cfg.mask_token_id)
    self.stop_ids = (int(specials.eos), int(specials.eot_id))
    if cfg.task == "t2i":
      off = int(specials.image_offset)
      self.vocab_range: tuple[int, int] | None = (off, off + int(model_cfg.codebook_size))
    else:
      self.vocab_range = None
    self.filter_name = cfg.filter_reward or next((r.name for r in self.rewards if "correct" in r.name), "")
    if cfg.drop_degenerate_groups and self.filter_name not in {r.name for r in self.rewards}:
      raise ValueError("rl.drop_degenerate_groups needs rl.filter_reward naming one of the rewards "
                       f"{[r.name for r in self.rewards]}")
    self._cycle: _Cycle | None = None
    self.last_rollout: dict[str, Any] = {}

  # -- trainer hooks ------------------------------------------------------------------------
  def make_batches(self, process_index: int, process_count: int) -> PromptIterator:
    if self.cfg.prompts_per_step % process_count:
      raise ValueError(f"rl.prompts_per_step={self.cfg.prompts_per_step} is not divisible by the "
                       f"{process_count} processes")
    return PromptIterator(self.source, self.cfg.inner_updates, process_index, process_count)

  def init_frozen(self, params: Any) -> Any:
    """``{"ref": copy of params}`` (same shardings) when the objective reads π_ref, else None."""
    if not self.cfg.loss.needs_ref:
      return None
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return {"ref": jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)}

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any):
    return grpo_loss_fn(params, batch, rng, frozen, model_cfg=self.model_cfg, loss_cfg=self.cfg.loss,
                        vocab_range=self.vocab_range)

  def sequences(self, batch: Mapping[str, Any]) -> tuple[int, int]:
    rows, length = np.shape(batch["input_ids"])[:2]
    return int(rows) * jax.process_count(), int(length)

  def pre_step(self, ctx: Any, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the batch of inner iteration ``host_batch['inner']``, rolling out when needed."""
    mesh = getattr(ctx, "mesh", None)
    frozen = getattr(ctx, "frozen", None)
    return self.batch_for(ctx.state.params, frozen, host_batch, mesh)

  def batch_for(self, params: Any, frozen: Any, host_batch: Mapping[str, Any],
                mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
    """``pre_step`` without a trainer context (own loops, tests)."""
    index, inner = int(host_batch["index"]), int(host_batch["inner"])
    if self._cycle is None or self._cycle.index != index:
      self._cycle = _Cycle(index, self.rollout(params, frozen, host_batch["records"], index, mesh))
    return self._cycle.batches[inner]

  def stage(self, name: str = "grpo"):
    from mmada_jax.train.stages import Stage
    names = ("loss", "policy_loss", "kl", "clip_frac", "entropy", "ratio_mean", "reward_mean", "reward_std",
             "response_length") + tuple(f"reward/{r.name}" for r in self.rewards)
    return Stage(name=name, loss_fn=self.loss_fn, make_batches=self.make_batches, sequences=self.sequences,
                 metric_names=names, pre_step=self.pre_step, init_frozen=self.init_frozen)

  # -- rollout cycle ------------------------------------------------------------------------
  def _keys(self, index: int) -> tuple[jax.Array, jax.Array]:
    k = jax.random.fold_in(jax.random.key(self.cfg.seed), index)
    return tuple(jax.random.split(k))

  def rollout(self, params: Any, frozen: Any, records: Sequence[Record], index: int,
              mesh: jax.sharding.Mesh | None = None) -> list[dict[str, np.ndarray]]:
    """One rollout cycle over this process's ``records``: the μ inner-iteration batches."""
    cfg, g = self.cfg, self.cfg.group_size
    k_roll, k_mask = self._keys(index)
    if cfg.task == "t2i":
      tokens, attn, start, images = self._sample_images(params, records, k_roll, mesh)
    else:
      tokens, attn, start = self._sample_text(params, records, k_roll, mesh)
      images = None
    r = tokens.shape[1] - int(start[0]) if cfg.task != "t2i" else int(self.model_cfg.num_vq_tokens)
    response = tokens[np.arange(tokens.shape[0])[:, None], start[:, None] + np.arange(r)[None, :]]
    stops = () if cfg.task == "t2i" else self.stop_ids
    tail = "train" if cfg.task == "t2i" else cfg.response_tail
    trainable, hidden, length = (np.asarray(a) for a in mask_lib.split_response(response, stops, tail))

    comp_ids = [response[i, :length[i]] for i in range(response.shape[0])]
    completions = None
    if self.tokenizer is not None and cfg.task != "t2i":
      completions = [self.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in comp_ids]

    def per_row(key):
      return [rec.get(key) for rec in records for _ in range(g)]
    labels = per_row("label")
    inputs = rew_lib.RewardInputs(
        prompts=[str(x) if x is not None else "" for x in per_row("prompt")], completions=completions,
        references=per_row("answer"), choices=per_row("choices"), images=images,
        labels=None if any(x is None for x in labels) else np.asarray(labels, np.int64),
        completion_ids=comp_ids)
    total, raw = rew_lib.combine_rewards(self.rewards, inputs)
    advantages = adv_lib.group_advantages(total, g, cfg.adv_eps)
    weight = np.ones_like(total)
    if cfg.drop_degenerate_groups:
      weight = adv_lib.group_keep_mask(raw[self.filter_name], g, cfg.filter_low, cfg.filter_high)

    ref = frozen["ref"] if (cfg.loss.needs_ref and frozen is not None) else params
    if cfg.loss.needs_ref and frozen is None:
      raise ValueError("kl_reference='ref' with kl_beta > 0 needs the frozen reference (init_frozen)")
    out = prepare_updates(
        params, ref, _to_global(tokens, mesh), _to_global(attn, mesh), _to_global(start, mesh),
        _to_global(trainable, mesh), _to_global(hidden, mesh), k_mask, model_cfg=self.model_cfg,
        mu=cfg.inner_updates, masking=cfg.masking, mask_id=self.mask_id, vocab_range=self.vocab_range,
        need_ref=cfg.loss.needs_ref)
    out = {k: _to_local(v.swapaxes(0, 1), mesh).swapaxes(0, 1) for k, v in out.items()}

    std = np.full_like(total, _global_std(total))
    common = {"attention_mask": attn.astype(np.int32), "response_start": start.astype(np.int32),
              "targets": response.astype(np.int32), "advantages": advantages.astype(np.float32),
              "seq_weight": weight.astype(np.float32), "reward": total, "reward_std": std,
              "response_length": length.astype(np.float32)}
    common.update({f"reward/{k}": v for k, v in raw.items()})
    self.last_rollout = {"tokens": tokens, "rewards": total, "raw": raw, "advantages": advantages,
                         "completions": completions, "images": images, "response_length": length}
    return [dict(common, input_ids=out["input_ids"][n].astype(np.int32), loss_mask=out["loss_mask"][n],
                 old_logp=out["old_logp"][n], ref_logp=out["ref_logp"][n], mask_ratio=out["mask_ratio"][n])
            for n in range(cfg.inner_updates)]

  def _sample_text(self, params, records, key, mesh):
    cfg, g = self.cfg, self.cfg.group_size
    ids, attn = pad_prompts([rec["prompt_ids"] for rec in records], cfg.max_prompt_len, self.specials.pad)
    ids, attn = np.repeat(ids, g, axis=0), np.repeat(attn, g, axis=0)
    gids, gattn = _to_global(ids, mesh), _to_global(attn, mesh)
    common = dict(gen_length=cfg.gen_length, block_length=cfg.block_length, steps=cfg.gen_steps,
                  temperature=cfg.temperature, cfg_scale=cfg.cfg_scale, remasking=cfg.remasking,
                  attention_mask=gattn, key=key, mask_id=self.mask_id)
    if cfg.cache == "none" and cfg.threshold <= 0:
      from mmada_jax.sampling.text import generate_text
      out = generate_text(params, self.model_cfg, gids, **common).tokens
    else:
      from mmada_jax.sampling.cache import generate_text_cached
      out = generate_text_cached(params, self.model_cfg, gids, cache=cfg.cache,
                                 threshold=cfg.threshold if cfg.threshold > 0 else None, **common).tokens
    tokens = _to_local(out, mesh).astype(np.int32)
    full_attn = np.concatenate([attn, np.ones((attn.shape[0], cfg.gen_length), np.int32)], axis=1)
    return tokens, full_attn, np.full(tokens.shape[0], cfg.max_prompt_len, np.int32)

  def _sample_images(self, params, records, key, mesh):
    from mmada_jax.sampling.t2i import generate_image_tokens
    cfg, g, sp = self.cfg, self.cfg.group_size, self.specials
    n = int(self.model_cfg.num_vq_tokens)
    text = [rec["prompt_ids"] for rec in records]
    pb = builders.t2i_gen_prompt(text, cfg.max_text_len, num_image_tokens=n, specials=sp)
    un = builders.t2i_uncond_prompt(len(text), cfg.max_text_len, num_image_tokens=n, specials=sp)
    ids, attn = np.repeat(pb.input_ids, g, 0), np.repeat(pb.attention_mask, g, 0)
    uids, uattn = np.repeat(un.input_ids, g, 0), np.repeat(un.attention_mask, g, 0)
    use_cfg = cfg.guidance_scale > 0
    sample = generate_image_tokens(
        params, self.model_cfg, _to_global(ids, mesh), attention_mask=_to_global(attn, mesh),
        uncond_input_ids=_to_global(uids, mesh) if use_cfg else None,
        uncond_attention_mask=_to_global(uattn, mesh) if use_cfg else None, timesteps=cfg.t2i_timesteps,
        guidance_scale=cfg.guidance_scale, temperature=cfg.t2i_temperature, noise_schedule=cfg.noise_schedule,
        image_token_offset=int(sp.image_offset), key=key, mask_id=self.mask_id)
    codes = _to_local(sample.codes, mesh).astype(np.int32)
    length = ids.shape[1]
    start = length - n - 1
    tokens = ids.astype(np.int32).copy()
    tokens[:, start:start + n] = codes + int(sp.image_offset)
    images = np.asarray(self.image_decoder(codes))
    return tokens, attn.astype(np.int32), np.full(tokens.shape[0], start, np.int32), images


def magvit_decoder(tokenizer: Any) -> Callable[[np.ndarray], np.ndarray]:
  """``codes [B, N] -> uint8 [B, H, W, 3]`` through an ``ImageTokenizer`` (``clip((x+1)/2)·255``)."""
  def decode(codes: np.ndarray) -> np.ndarray:
    x = np.asarray(jax.device_get(tokenizer.decode(codes)), np.float32)
    return np.round(np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
  return decode


# ------------------------------------------------------------------ registry

def _load_factory(spec: str) -> Callable[..., Any]:
  module, _, fn = spec.partition(":")
  if not module or not fn:
    raise ValueError(f"rl.rewards_factory={spec!r} must be 'module:function'")
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"rl.rewards_factory={spec!r} cannot be loaded ({e})") from e


def _rewards_from_config(config: ConfigDict, model_cfg: MMaDAConfig, cfg: GRPOConfig, rl: Mapping[str, Any],
                         source: str) -> list[rew_lib.RewardFn]:
  factory = str(rl.get("rewards_factory", "") or "")
  if factory:
    return list(_load_factory(factory)(config, model_cfg))
  if source == "toy_digits":
    return [toy_digit_reward(float(rl.get("reward_correct", 2.0)))]
  if cfg.task == "t2i":
    raise ValueError("rl.task='t2i' needs rl.rewards_factory returning the image scorers "
                     "(ClipScoreReward / ImageRewardReward / ClassifierReward)")
  correct = (rew_lib.AnswerCorrectness if cfg.task == "text" else rew_lib.MMUAnswerCorrectness)(
      weight=float(rl.get("reward_correct", 2.0)))
  return [correct, rew_lib.FormatReward(weight=float(rl.get("reward_format", 0.5)))]


def stage_from_config(config: ConfigDict, model_cfg: MMaDAConfig, name: str = "grpo"):
  """The trainer's stage factory: reads ``config.rl`` (module docstring)."""
  rl = config.get("rl")
  rl = rl.to_dict() if isinstance(rl, ConfigDict) else dict(rl or {})
  cfg = GRPOConfig.from_config(rl)
  source = str(rl.get("prompt_source", "") or ("toy_digits" if config.get("data_source") == "toy" else "jsonl"))
  tokenizer = None
  tok_path = str(rl.get("text_tokenizer", "") or config.get("data", {}).get("text_tokenizer", "") or "")
  if source == "toy_digits":
    from mmada_jax.train.toy_data import TOY_SPECIALS
    specials = TOY_SPECIALS
    records = toy_digit_records(specials, int(rl.get("toy_digits", 10)))
  elif source == "jsonl":
    from mmada_jax.prompting.text_tokenizer import TextTokenizer
    if not tok_path:
      raise ValueError("rl.prompt_source='jsonl' needs rl.text_tokenizer (or data.text_tokenizer)")
    prompt_file = str(rl.get("prompt_file", "") or "")
    if not prompt_file:
      raise ValueError("rl.prompt_source='jsonl' needs rl.prompt_file")
    tokenizer = TextTokenizer.from_file(tok_path)
    specials = SpecialTokens.from_tokenizer(tokenizer)
    records = load_jsonl_records(prompt_file, cfg.task, tokenizer, specials, bool(rl.get("thinking_prompt", True)))
  else:
    raise ValueError(f"rl.prompt_source={source!r} is not one of ('jsonl', 'toy_digits')")
  decoder = None
  if cfg.task == "t2i":
    path = str(rl.get("image_tokenizer", "") or "")
    if not path:
      raise ValueError("rl.task='t2i' needs rl.image_tokenizer (a MAGVIT-v2 directory) to decode images")
    from mmada_jax.image_tokenizer import ImageTokenizer
    decoder = magvit_decoder(ImageTokenizer.from_pretrained(path))
  if cfg.max_prompt_len == 0 and cfg.task != "t2i":
    cfg = dataclasses.replace(cfg, max_prompt_len=max(len(r["prompt_ids"]) for r in records))
  rewards = _rewards_from_config(config, model_cfg, cfg, rl, source)
  src = list_source(records, cfg.prompts_per_step, int(rl.get("seed", config.get("seed", 0))))
  return GRPOStage(model_cfg, cfg, src, rewards, specials=specials, tokenizer=tokenizer,
                   image_decoder=decoder).stage(name)


def default_rl_config() -> ConfigDict:
  """A complete ``config.rl`` section with this stage's defaults (module docstring)."""
  d = GRPOConfig()
  return ConfigDict(dict(
      task=d.task, group_size=d.group_size, prompts_per_step=d.prompts_per_step, inner_updates=d.inner_updates,
      clip_eps=d.loss.epsilon, kl_beta=d.loss.beta, kl_reference=d.loss.kl_target, kl_reduce=d.loss.kl_reduce,
      adv_eps=d.adv_eps, mask_ratio="paper_even", num_timesteps=d.masking.num_timesteps,
      mask_ratio_low=d.masking.random_low, mask_ratio_high=d.masking.random_high, response_tail=d.response_tail,
      drop_degenerate_groups=d.drop_degenerate_groups, filter_low=d.filter_low, filter_high=d.filter_high,
      filter_reward=d.filter_reward, max_prompt_len=d.max_prompt_len, gen_length=d.gen_length,
      block_length=d.block_length, gen_steps=d.gen_steps, temperature=d.temperature, remasking=d.remasking,
      cfg_scale=d.cfg_scale, cache=d.cache, threshold=d.threshold, max_text_len=d.max_text_len,
      t2i_timesteps=d.t2i_timesteps, guidance_scale=d.guidance_scale, t2i_temperature=d.t2i_temperature,
      noise_schedule=d.noise_schedule, reward_correct=2.0, reward_format=0.5, reward_clip_scale=0.1,
      reward_image_reward_scale=0.1, rewards_factory="", prompt_source="", prompt_file="", text_tokenizer="",
      image_tokenizer="", thinking_prompt=True, toy_digits=10, seed=d.seed))


def _register() -> None:
  from mmada_jax.train.stages import register_stage
  register_stage("grpo")(lambda config, model_cfg: stage_from_config(config, model_cfg, "grpo"))
  register_stage("unigrpo")(lambda config, model_cfg: stage_from_config(config, model_cfg, "unigrpo"))


_register()

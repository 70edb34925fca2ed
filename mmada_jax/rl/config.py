"""The UniGRPO settings: :class:`GRPOConfig`, the one definition of the ``config.rl`` section.

Every field of :class:`GRPOConfig` is a key of ``config.rl`` with the same name, type and default
(:mod:`mmada_jax.config_schema`): :func:`default_rl_config` is derived from the dataclass, and
:meth:`GRPOConfig.from_config` reads a section back (absent keys keep their defaults; an unknown
key or a wrongly typed value is an error naming it). The
objective and masking settings are views of the flat fields (:attr:`GRPOConfig.loss`,
:attr:`GRPOConfig.masking`). The reasons behind the defaults are in ``docs/unigrpo.md``.

Unified UniGRPO (several tasks in one stage): ``rl.tasks`` is a list of :class:`TaskConfig`
sections, each a task source with its own kind, prompts, weight, sampler settings and rewards;
:meth:`GRPOConfig.task_list` resolves them into one complete :class:`GRPOConfig` per task (the
shared keys — group size, objective, masking, μ, seed — from ``rl.*``). With ``rl.tasks`` empty the
flat ``rl.task`` / sampler / prompt / reward keys are the one task, named after ``rl.task``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Mapping

from ml_collections import ConfigDict

from mmada_jax.config_schema import parse, to_config_dict
from mmada_jax.rl.loss import LossConfig
from mmada_jax.rl.masking import TAILS, MaskingConfig

TASKS = ("text", "mmu", "t2i")
MASK_RATIO = {"paper_even": ("unigrpo", "linspace"), "paper_stratified": ("unigrpo", "stratified"),
              "random": ("random", "linspace")}
"""``rl.mask_ratio`` -> (``MaskingConfig.method``, ``MaskingConfig.spacing``)."""
PROMPT_SOURCES = ("jsonl", "toy_digits")


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """The ``config.rl`` keys one task of a UniGRPO stage sets for itself (kind, prompts, rewards,
  text / MMU and T2I sampler settings, response tail), defined once: :class:`GRPOConfig` and each
  ``rl.tasks`` entry (:class:`TaskConfig`) inherit them, names, types and defaults alike (their
  meaning: :class:`GRPOConfig`)."""
  task: Literal["text", "mmu", "t2i"] = "text"
  prompt_source: Literal["", "jsonl", "toy_digits"] = ""
  prompt_file: str = ""
  rewards: str = ""
  max_prompt_len: int = 0
  gen_length: int = 128
  block_length: int = 64
  gen_steps: int = 128
  temperature: float = 0.8
  remasking: str = "low_confidence"
  guidance_scale: float = 0.0
  cache: Literal["none", "prefix", "dual"] = "none"
  threshold: float = 0.0
  max_text_len: int = 0
  t2i_steps: int = 15
  t2i_guidance_scale: float = 3.5
  t2i_temperature: float = 1.0
  noise_schedule: str = "cosine"
  response_tail: Literal["mask", "train"] = "mask"
  thinking_prompt: bool = True
  toy_digits: int = 10


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSettings))
"""The :class:`GRPOConfig` keys a :class:`TaskConfig` sets for its task."""


@dataclasses.dataclass(frozen=True)
class TaskConfig(TaskSettings):
  """One task source of ``rl.tasks`` (a unified UniGRPO stage): ``name`` (unique; metrics
  ``<metric>/<name>``), ``weight`` (> 0: the task's share of ``rl.prompts_per_step``, see
  :func:`mmada_jax.rl.prompts.mixture_counts`), and the task's own values of the
  :class:`TaskSettings` keys."""
  name: str = ""
  weight: float = 1.0

  def __post_init__(self):
    if not self.name or "/" in self.name or "," in self.name:
      raise ValueError(f"rl.tasks: name={self.name!r} must be non-empty without '/' or ','")
    if not self.weight > 0:
      raise ValueError(f"rl.tasks[{self.name!r}].weight={self.weight} must be > 0")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(TaskSettings):
  """Static settings of the UniGRPO stage; each field is the ``config.rl`` key of that name.

  * ``task`` 'text' | 'mmu' | 't2i'; ``group_size`` G; ``prompts_per_step`` global prompts per
    rollout; ``inner_updates`` μ (optimizer steps per rollout).
  * objective: ``clip_eps`` ε, ``kl_beta`` β, ``kl_reference`` 'ref' | 'old', ``kl_reduce``
    'mean' | 'sum'; ``adv_eps`` (added to the group std).
  * masking: ``mask_ratio`` 'paper_even' (t_n evenly spaced from t1 to T) | 'paper_stratified' |
    'random' (U[low, high], Bernoulli); ``num_timesteps`` T; ``mask_ratio_low`` /
    ``mask_ratio_high``; ``response_tail`` 'mask' | 'train'.
  * group filter: ``drop_degenerate_groups``, ``filter_low`` / ``filter_high``, ``filter_reward``
    (the reward whose raw value > 0.5 means correct; '' = the first whose name contains 'correct').
  * text / MMU sampler: ``max_prompt_len`` (prompts are left-padded to it: one compiled shape;
    0 = the longest prompt of the source), ``gen_length``, ``block_length``, ``gen_steps``,
    ``temperature``, ``remasking``, ``guidance_scale`` (classifier-free guidance of the text
    sampler; 0 with task 't2i', which does not run it),
    ``cache`` 'none' | 'prefix' | 'dual', ``threshold`` (0 = off; e.g. 0.95 = the public rollout's
    dynamic decoding).
  * T2I sampler: ``max_text_len`` S, ``t2i_steps``, ``t2i_guidance_scale``, ``t2i_temperature``,
    ``noise_schedule``; ``image_tokenizer`` (MAGVIT-v2 directory that decodes the codes).
  * rewards: ``rewards`` ('' = the task's default; else comma-separated entries, each a name of
    :data:`mmada_jax.rl.rewards.REWARDS` or ``module:function`` for user code, see
    :func:`mmada_jax.rl.rewards.resolve_rewards`); ``reward_correct`` / ``reward_format``: the
    weights of the named correctness / format rewards.
  * prompts: ``prompt_source`` 'jsonl' | 'toy_digits' ('' = 'toy_digits' when
    ``config.data_source == 'toy'``, else 'jsonl'); ``prompt_file`` (JSONL, see
    :func:`mmada_jax.rl.prompts.load_jsonl_records`); ``text_tokenizer`` ('' =
    ``config.data.text_tokenizer``); ``thinking_prompt`` (prepend the "think" sentence);
    ``toy_digits`` (digits of the toy task); ``seed`` (rollout keys and prompt order).
  * image scorers (rewards ``clip`` / ``image_reward``): ``clip_model`` (a local Hugging Face
    CLIP directory), ``preference_head`` (the ImageReward-style head's safetensors file, see
    :mod:`mmada_jax.scorers.preference`), ``reward_clip`` / ``reward_image`` (their weights).
  * ``tasks``: the unified stage's task sources (:class:`TaskConfig`); empty = the one task above.
  """
  group_size: int = 16
  prompts_per_step: int = 8
  inner_updates: int = 5
  clip_eps: float = 0.2
  kl_beta: float = 0.04
  kl_reference: Literal["ref", "old"] = "ref"
  kl_reduce: Literal["mean", "sum"] = "mean"
  adv_eps: float = 1e-6
  mask_ratio: Literal["paper_even", "paper_stratified", "random"] = "paper_even"
  num_timesteps: int = 1000
  mask_ratio_low: float = 0.1
  mask_ratio_high: float = 0.9
  drop_degenerate_groups: bool = False
  filter_low: float = 0.05
  filter_high: float = 0.95
  filter_reward: str = ""
  reward_correct: float = 2.0
  reward_format: float = 0.5
  text_tokenizer: str = ""
  image_tokenizer: str = ""
  seed: int = 0
  clip_model: str = ""
  preference_head: str = ""
  reward_clip: float = 0.1
  reward_image: float = 0.1
  tasks: tuple[TaskConfig, ...] = ()
  RENAMED_KEYS: ClassVar[dict[str, str]] = {"cfg_scale": "guidance_scale", "t2i_timesteps": "t2i_steps"}
  """Sampler keys named as in :class:`mmada_jax.api.GenerationConfig`; the t2i sampler's guidance,
  once ``guidance_scale``, is ``t2i_guidance_scale`` (``guidance_scale`` is now the text
  sampler's, hence the 't2i' check in ``__post_init__``)."""

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"rl.task={self.task!r} is not one of {TASKS}")
    for name in ("group_size", "prompts_per_step", "inner_updates", "gen_length", "block_length", "gen_steps",
                 "t2i_steps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
    if self.response_tail not in TAILS:
      raise ValueError(f"rl.response_tail={self.response_tail!r} is not one of {TAILS}")
    if self.mask_ratio not in MASK_RATIO:
      raise ValueError(f"rl.mask_ratio={self.mask_ratio!r} is not one of {tuple(MASK_RATIO)}")
    if self.max_prompt_len < 0:
      raise ValueError(f"rl.max_prompt_len={self.max_prompt_len} must be >= 0 (0 = the longest prompt)")
    if self.task == "t2i" and self.max_text_len < 1:
      raise ValueError("rl.task='t2i' needs rl.max_text_len (the text budget S of the t2i prompt)")
    if self.task == "t2i" and self.guidance_scale:
      raise ValueError(f"rl.guidance_scale={self.guidance_scale} is the text sampler's guidance (formerly "
                       "rl.cfg_scale), which rl.task='t2i' does not run; the t2i sampler's guidance is "
                       "rl.t2i_guidance_scale (formerly rl.guidance_scale)")
    if self.prompt_source not in ("",) + PROMPT_SOURCES:
      raise ValueError(f"rl.prompt_source={self.prompt_source!r} is not one of {PROMPT_SOURCES} (or '')")
    try:
      self.loss, self.masking  # noqa: B018 - validates the derived settings
    except ValueError as e:
      raise ValueError(f"config.rl: {e}") from e
    if self.tasks:
      names = [t.name for t in self.tasks]
      if len(set(names)) != len(names):
        raise ValueError(f"rl.tasks: task names must be unique, got {names}")
      self.task_list()  # noqa: B018 - validates every task's settings

  def task_list(self) -> list[tuple[str, float, "GRPOConfig"]]:
    """(name, weight, the task's complete settings) per task: ``rl.tasks`` resolved (each task's
    :data:`TASK_FIELDS` over the shared keys; its ``tasks`` empty), or the one flat task
    ``(rl.task, 1.0, self)``. A task whose settings are invalid is an error naming it."""
    if not self.tasks:
      return [(self.task, 1.0, self)]
    out = []
    for item in self.tasks:
      t: TaskConfig = item
      values = {name: getattr(t, name) for name in TASK_FIELDS}
      try:
        cfg = dataclasses.replace(self, tasks=(), **values)
      except ValueError as e:
        raise ValueError(f"rl.tasks[{t.name!r}]: {e}") from e
      out.append((t.name, float(t.weight), cfg))
    return out

  @property
  def loss(self) -> LossConfig:
    """The objective's settings (ε, β, KL target and reduction)."""
    return LossConfig(epsilon=self.clip_eps, beta=self.kl_beta, kl_target=self.kl_reference,
                      kl_reduce=self.kl_reduce)

  @property
  def masking(self) -> MaskingConfig:
    """The structured mask-ratio schedule's settings."""
    method, spacing = MASK_RATIO[self.mask_ratio]
    return MaskingConfig(method=method, spacing=spacing, num_timesteps=self.num_timesteps,
                         random_low=self.mask_ratio_low, random_high=self.mask_ratio_high)

  @property
  def rollouts_per_step(self) -> int:
    """Global rows of one inner step: G × prompts_per_step."""
    return self.group_size * self.prompts_per_step

  @classmethod
  def from_config(cls, rl: ConfigDict | Mapping[str, Any] | None) -> "GRPOConfig":
    """From a ``config.rl`` section: absent keys keep their defaults; an unknown key or a wrongly
    typed value is a ``ConfigError`` (a ValueError) naming it."""
    return parse(cls, {} if rl is None else rl, "config.rl")


def default_rl_config() -> ConfigDict:
  """The complete ``config.rl`` section with :class:`GRPOConfig`'s defaults."""
  return to_config_dict(GRPOConfig)

"""Host-side rewards for UniGRPO (spec §8.2): batched, lists / numpy in, float32 numpy out.

A reward is any object with ``name: str``, ``weight: float`` and
``__call__(inputs: RewardInputs) -> float32 [B]`` (:class:`RewardFn`). Its *raw* value is
returned; :func:`combine_rewards` forms ``Σ weight · raw`` and keeps every raw array for metrics.

Built in (raw values in [0, 1]; paper weights as defaults):

* :class:`AnswerCorrectness` (``correctness``, 2.0): 1 when the final answer of the completion
  equals the reference (:func:`mmada_jax.rl.answers.extract_answer` / ``answers_match``).
* :class:`FormatReward` (``format``, 0.5): 1 for ``<think> reasoning </think> answer`` with a
  non-empty reasoning and a non-empty answer (:func:`mmada_jax.rl.answers.format_ok`).
* :class:`MMUAnswerCorrectness` (``mmu_correctness``, 2.0): multiple-choice letters or short
  answers (:func:`mmada_jax.rl.answers.mmu_answer_correct`).
* :class:`ClipScoreReward` and :class:`ImageRewardReward` (0.1 each): host adapters around a
  user-supplied ``scorer(images uint8 [B, H, W, 3], prompts list[str]) -> [B]``.
* :class:`DeviceImageTextReward`: an image–text scorer run on the devices, on the rollout's
  batch-sharded images (no host copy of the images); the registered ``clip`` (0.1, the JAX CLIP
  score of ``rl.clip_model``) and ``image_reward`` (0.1, the ImageReward-style preference head
  ``rl.preference_head`` over that CLIP, :mod:`mmada_jax.scorers.preference`) are two.
* :class:`ClassifierReward` (``classifier``, 1.0): ``classifier(images) -> class probabilities
  [B, C]``; reward = probability of the prompted class ``inputs.labels[b]``.
* :class:`FunctionReward`: wraps any ``fn(inputs) -> [B]``; :func:`toy_digit_reward`
  (``digit_match``) is one, the reward of the copy-the-digit toy task.

A reward with ``on_device = True`` returns a global jax.Array [B_global] (rows sharded by the
batch rule); :func:`combine_rewards` brings its scores (B floats, never the images) to this
process's rows with ``to_local``. Every other reward runs on the host.

Choosing rewards from a config (``rl.rewards``, :func:`resolve_rewards`): comma-separated entries,
each a name of :data:`REWARDS` (``correctness``, ``format``, ``mmu_correctness``,
``digit_match``, ``clip``, ``image_reward``, and any added with :func:`register_reward`) or ``module:function`` naming user
code, called as ``function(config, model_cfg)`` and returning a list of rewards (the way to plug
in image scorers such as CLIP or ImageReward, which no config value can hold).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mmada_jax.rl.answers import answers_match, extract_answer, format_ok, mmu_answer_correct


@dataclasses.dataclass
class RewardInputs:
  """One batch of rollouts to score; every given field has B entries (rows are rollouts).

  prompts: the prompt / caption strings. completions: decoded responses (text, MMU).
  references: ground-truth answers. choices: per row the option texts of a multiple-choice item
  (letters A, B, … in order) or None. images: uint8 [B, H, W, 3] generated images (T2I).
  labels: int [B] prompted class ids (classifier reward). completion_ids: per row the response
  token ids up to the first stop token (token-level rewards). extra: anything else, per row.
  device_images: the same images as a global jax.Array [B_global, H, W, 3] on the devices (rows
  sharded by the batch rule; on-device rewards); place: ``numpy [B, ...] (this process's rows) ->
  global jax.Array`` laid out as ``device_images``. Neither counts in ``len``.
  """
  prompts: Sequence[str] | None = None
  completions: Sequence[str] | None = None
  references: Sequence[Any] | None = None
  choices: Sequence[Sequence[str] | None] | None = None
  images: np.ndarray | None = None
  labels: np.ndarray | None = None
  completion_ids: Sequence[np.ndarray] | None = None
  extra: Mapping[str, Sequence[Any]] | None = None
  device_images: Any = None
  place: Callable[[np.ndarray], Any] | None = None

  def __len__(self) -> int:
    sizes = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is None or f.name in ("extra", "device_images", "place"):
        continue
      sizes[f.name] = len(v)
    for k, v in (self.extra or {}).items():
      sizes[f"extra[{k!r}]"] = len(v)
    if not sizes:
      raise ValueError("RewardInputs is empty")
    if len(set(sizes.values())) != 1:
      raise ValueError(f"RewardInputs fields disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))

  def need(self, field: str, who: str) -> Any:
    v = getattr(self, field)
    if v is None:
      raise ValueError(f"reward {who!r} needs RewardInputs.{field}, which is not set")
    return v


@runtime_checkable
class RewardFn(Protocol):
  """A batched reward: raw float32 [B] scores; ``weight`` scales it in the total."""
  name: str
  weight: float

  def __call__(self, inputs: RewardInputs) -> np.ndarray: ...


def _as_scores(x: Any, b: int, who: str) -> np.ndarray:
  out = np.asarray(x, dtype=np.float32).reshape(-1)
  if out.shape[0] != b:
    raise ValueError(f"reward {who!r} returned {out.shape[0]} scores for a batch of {b}")
  if not np.all(np.isfinite(out)):
    raise ValueError(f"reward {who!r} returned non-finite scores: {out[~np.isfinite(out)][:4]}")
  return out


def combine_rewards(fns: Sequence[RewardFn], inputs: RewardInputs,
                    to_local: Callable[[Any], np.ndarray] | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(total float32 [B] = Σ weight · raw, {name: raw float32 [B]}) over the rewards ``fns``;
  ``to_local``: global jax.Array → this process's rows, for the ``on_device`` rewards (default
  ``np.asarray``, one process)."""
  if not fns:
    raise ValueError("combine_rewards needs at least one reward")
  names = [f.name for f in fns]
  if len(set(names)) != len(names):
    raise ValueError(f"reward names must be unique, got {names}")
  b = len(inputs)
  total = np.zeros(b, np.float32)
  raw: dict[str, np.ndarray] = {}
  for f in fns:
    out = f(inputs)
    if getattr(f, "on_device", False):
      out = (to_local or np.asarray)(out)
    raw[f.name] = _as_scores(out, b, f.name)
    total += np.float32(f.weight) * raw[f.name]
  return total, raw


# ------------------------------------------------------------------ reward classes

@dataclasses.dataclass
class AnswerCorrectness:
  """Raw 1.0 when the completion's final answer matches ``references[b]`` (math / GSM8K style)."""
  weight: float = 2.0
  name: str = "correctness"
  rel_tol: float = 1e-4

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    comps = inputs.need("completions", self.name)
    refs = inputs.need("references", self.name)
    return np.array([float(answers_match(extract_answer(c), r, self.rel_tol)) for c, r in zip(comps, refs)],
                    np.float32)


@dataclasses.dataclass
class FormatReward:
  """Raw 1.0 when the completion follows ``<think> … </think> answer`` (:func:`format_ok`)."""
  weight: float = 0.5
  name: str = "format"

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    return np.array([float(format_ok(c)) for c in inputs.need("completions", self.name)], np.float32)


@dataclasses.dataclass
class MMUAnswerCorrectness:
  """Raw 1.0 when an MMU answer is right (:func:`mmu_answer_correct`; ``choices`` optional)."""
  weight: float = 2.0
  name: str = "mmu_correctness"

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    comps = inputs.need("completions", self.name)
    refs = inputs.need("references", self.name)
    choices = inputs.choices if inputs.choices is not None else [None] * len(comps)
    return np.array([float(mmu_answer_correct(c, r, ch)) for c, r, ch in zip(comps, refs, choices)],
                    np.float32)


def _check_images(images: Any, who: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"reward {who!r} needs images uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
  return images


@dataclasses.dataclass
class ImageTextScorerReward:
  """Adapter for an image–text scorer ``scorer(images uint8 [B,H,W,3], prompts) -> float [B]``."""
  scorer: Callable[[np.ndarray, list[str]], Any]
  weight: float = 0.1
  name: str = "image_text"

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    images = _check_images(inputs.need("images", self.name), self.name)
    prompts = list(inputs.need("prompts", self.name))
    return _as_scores(self.scorer(images, prompts), images.shape[0], self.name)


@dataclasses.dataclass
class ClipScoreReward(ImageTextScorerReward):
  """CLIP image–text score (the paper's 0.1 · CLIP); the scorer's scale is kept as is."""
  name: str = "clip"


@dataclasses.dataclass
class ImageRewardReward(ImageTextScorerReward):
  """ImageReward human-preference score (the paper's 0.1 · ImageReward)."""
  name: str = "image_reward"


@dataclasses.dataclass
class DeviceImageTextReward:
  """An image–text scorer on the devices: ``scorer.score_device(images [B, H, W, 3], text_embeds
  [B, P]) -> [B]`` on the rollout's global ``device_images``, with the prompts' embeddings from
  ``encode_texts(list[str]) -> numpy [n, P]`` (each distinct prompt encoded once, cached) placed
  like the images. Returns the global scores (``on_device``)."""
  scorer: Any
  encode_texts: Callable[[list[str]], np.ndarray]
  weight: float = 0.1
  name: str = "clip"
  on_device: bool = True
  _cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

  def __call__(self, inputs: RewardInputs) -> Any:
    images = inputs.need("device_images", self.name)
    place = inputs.need("place", self.name)
    prompts = [str(p) for p in inputs.need("prompts", self.name)]
    new = sorted({p for p in prompts if p not in self._cache})
    if new:
      self._cache.update(zip(new, np.asarray(self.encode_texts(new), np.float32)))
    emb = np.stack([self._cache[p] for p in prompts])
    return self.scorer.score_device(images, place(emb))


_SCORERS: dict[tuple[str, str], Any] = {}


def _clip_model(path: str) -> Any:
  """The JAX CLIP of ``rl.clip_model`` (loaded once per process)."""
  if not path:
    raise ValueError("the 'clip' / 'image_reward' rewards need rl.clip_model (a local Hugging Face CLIP directory)")
  key = ("clip", path)
  if key not in _SCORERS:
    from mmada_jax.scorers.clip import CLIP
    _SCORERS[key] = CLIP.from_pretrained(path)
  return _SCORERS[key]


def clip_reward(rl: Any) -> DeviceImageTextReward:
  """``clip``: the CLIP score of ``rl.clip_model`` on the devices, weight ``rl.reward_clip``."""
  model = _clip_model(str(rl.clip_model))
  return DeviceImageTextReward(model, model.text_embeds, weight=float(rl.reward_clip), name="clip")


def image_reward(rl: Any) -> DeviceImageTextReward:
  """``image_reward``: the ImageReward-style head ``rl.preference_head`` over ``rl.clip_model``'s
  embeddings, on the devices, weight ``rl.reward_image``."""
  if not rl.preference_head:
    raise ValueError("the 'image_reward' reward needs rl.preference_head (the head's safetensors file, "
                     "mmada_jax.scorers.preference)")
  model = _clip_model(str(rl.clip_model))
  key = ("head", str(rl.preference_head))
  if key not in _SCORERS:
    from mmada_jax.scorers.preference import PreferenceScorer
    _SCORERS[key] = PreferenceScorer.from_files(model, str(rl.preference_head))
  return DeviceImageTextReward(_SCORERS[key], model.text_embeds, weight=float(rl.reward_image), name="image_reward")


@dataclasses.dataclass
class ClassifierReward:
  """Probability of the prompted class: ``classifier(images uint8 [B,H,W,3]) -> [B, C]``.

  ``from_logits=True`` applies a softmax to the classifier's output first.
  """
  classifier: Callable[[np.ndarray], Any]
  weight: float = 1.0
  name: str = "classifier"
  from_logits: bool = False

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    images = _check_images(inputs.need("images", self.name), self.name)
    labels = np.asarray(inputs.need("labels", self.name)).astype(np.int64).reshape(-1)
    out = np.asarray(self.classifier(images), np.float64)
    b = images.shape[0]
    if out.ndim != 2 or out.shape[0] != b:
      raise ValueError(f"reward {self.name!r}: classifier returned shape {out.shape}, expected [{b}, C]")
    if labels.shape[0] != b or labels.min(initial=0) < 0 or labels.max(initial=0) >= out.shape[1]:
      raise ValueError(f"reward {self.name!r}: labels must be {b} class ids in [0, {out.shape[1]})")
    if self.from_logits:
      out = np.exp(out - out.max(axis=1, keepdims=True))
      out /= out.sum(axis=1, keepdims=True)
    return out[np.arange(b), labels].astype(np.float32)


@dataclasses.dataclass
class FunctionReward:
  """Any ``fn(inputs) -> float [B]`` as a named, weighted reward."""
  fn: Callable[[RewardInputs], Any]
  name: str
  weight: float = 1.0

  def __call__(self, inputs: RewardInputs) -> np.ndarray:
    return _as_scores(self.fn(inputs), len(inputs), self.name)


def default_rewards(task: str) -> list[RewardFn]:
  """The paper's rule-based rewards for 'text' (correctness 2.0 + format 0.5) and 'mmu'
  (MMU correctness 2.0 + format 0.5). T2I rewards need user scorers (no default)."""
  if task == "text":
    return [AnswerCorrectness(), FormatReward()]
  if task == "mmu":
    return [MMUAnswerCorrectness(), FormatReward()]
  raise ValueError(f"no default rewards for task {task!r}: pass scorers (ClipScoreReward, "
                   "ImageRewardReward, ClassifierReward) for 't2i'")


def toy_digit_reward(weight: float = 1.0) -> FunctionReward:
  """``digit_match``, the reward of the toy task (:func:`mmada_jax.rl.prompts.toy_digit_records`):
  mean of ``token == answer`` over the response before its stop."""
  def fn(inputs: RewardInputs) -> np.ndarray:
    ids = inputs.need("completion_ids", "digit_match")
    ans = inputs.need("references", "digit_match")
    return np.array([float(np.mean(np.asarray(t) == int(a))) if len(t) else 0.0 for t, a in zip(ids, ans)],
                    np.float32)
  return FunctionReward(fn, "digit_match", weight)


# ------------------------------------------------------------------ choosing rewards by name

RewardFactory = Callable[[Any], RewardFn]
"""``factory(rl) -> reward``: ``rl`` is the stage's settings (:class:`mmada_jax.rl.config.GRPOConfig`:
``reward_correct``, ``reward_format``, …)."""

REWARDS: dict[str, RewardFactory] = {
    "correctness": lambda rl: AnswerCorrectness(weight=float(rl.reward_correct)),
    "format": lambda rl: FormatReward(weight=float(rl.reward_format)),
    "mmu_correctness": lambda rl: MMUAnswerCorrectness(weight=float(rl.reward_correct)),
    "digit_match": lambda rl: toy_digit_reward(float(rl.reward_correct)),
    "clip": clip_reward,
    "image_reward": image_reward,
}
"""The rewards a config can name in ``rl.rewards``."""


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
  """Decorator: makes ``factory(rl) -> reward`` available as ``rl.rewards`` entry ``name``."""
  if ":" in name or "," in name or not name.strip():
    raise ValueError(f"reward name {name!r} must be non-empty without ':' or ','")

  def deco(factory: RewardFactory) -> RewardFactory:
    REWARDS[name] = factory
    return factory
  return deco


def load_user_function(spec: str, what: str) -> Callable[..., Any]:
  """The callable named by ``'module:function'`` (user code), with a clear error if it is not one."""
  module, sep, fn = spec.partition(":")
  if not sep or not module.strip() or not fn.strip():
    raise ValueError(f"{what}={spec!r} must be 'module:function'")
  try:
    out = getattr(importlib.import_module(module.strip()), fn.strip())
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{what}={spec!r} cannot be loaded ({e})") from e
  if not callable(out):
    raise ValueError(f"{what}={spec!r} is not callable")
  return out


def default_reward_spec(task: str, prompt_source: str = "jsonl", rl: Any = None) -> str:
  """The ``rl.rewards`` used when it is '': the toy task's ``digit_match``; text
  ``correctness,format``; MMU ``mmu_correctness,format``; T2I ``clip`` (and ``image_reward``
  with ``rl.preference_head``) when ``rl.clip_model`` is set, else none (user scorers)."""
  if prompt_source == "toy_digits":
    return "digit_match"
  if task == "text":
    return "correctness,format"
  if task == "mmu":
    return "mmu_correctness,format"
  if task == "t2i" and rl is not None and rl.clip_model:
    return "clip,image_reward" if rl.preference_head else "clip"
  raise ValueError(f"rl.task={task!r} has no default rewards: set rl.clip_model (the 'clip' reward on the "
                   "devices), or rl.rewards, e.g. to 'module:function' returning image scorers "
                   "(ClipScoreReward / ImageRewardReward / ClassifierReward)")


def resolve_rewards(spec: str, rl: Any, *factory_args: Any) -> list[RewardFn]:
  """The rewards of ``rl.rewards``: comma-separated entries, each a :data:`REWARDS` name (built
  with ``rl``) or ``module:function`` (user code, called with ``factory_args`` — the trainer passes
  ``(config, model_cfg)`` — returning a list of rewards)."""
  out: list[RewardFn] = []
  for entry in [e.strip() for e in str(spec).split(",") if e.strip()]:
    if ":" in entry:
      made = load_user_function(entry, "rl.rewards entry")(*factory_args)
      if not isinstance(made, (list, tuple)):
        raise ValueError(f"rl.rewards entry {entry!r} returned {type(made).__name__}, not a list of rewards")
      out.extend(made)
    elif entry in REWARDS:
      out.append(REWARDS[entry](rl))
    else:
      raise ValueError(f"rl.rewards entry {entry!r} is neither a registered reward {sorted(REWARDS)} nor "
                       "'module:function' (user code returning a list of rewards)")
  for r in out:
    if not isinstance(r, RewardFn):
      raise ValueError(f"rl.rewards={spec!r}: {r!r} is not a reward (needs name, weight and __call__)")
  if not out:
    raise ValueError(f"rl.rewards={spec!r} names no reward")
  return out

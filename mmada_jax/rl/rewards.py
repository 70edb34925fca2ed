"""Host-side rewards for UniGRPO (spec §8.2): batched, lists / numpy in, float32 numpy out.

A reward is any object with ``name: str``, ``weight: float`` and
``__call__(inputs: RewardInputs) -> float32 [B]`` (:class:`RewardFn`). Its *raw* value is
returned; :func:`combine_rewards` forms ``Σ weight · raw`` and keeps every raw array for metrics.

Built in (raw values in [0, 1]; paper weights as defaults):

* :class:`AnswerCorrectness` (``correctness``, 2.0): 1 when the final answer of the completion
  equals the reference (:func:`extract_answer`, :func:`answers_match`).
* :class:`FormatReward` (``format``, 0.5): 1 for ``<think> reasoning </think> answer`` with a
  non-empty reasoning and a non-empty answer (nothing but whitespace before ``<think>``, exactly
  one of each tag).
* :class:`MMUAnswerCorrectness` (``mmu_correctness``, 2.0): multiple-choice letters or short
  answers (:func:`mmu_answer_correct`).
* :class:`ClipScoreReward` (``clip``, 0.1) and :class:`ImageRewardReward` (``image_reward``, 0.1):
  adapters around a user-supplied ``scorer(images uint8 [B, H, W, 3], prompts list[str]) -> [B]``.
* :class:`ClassifierReward` (``classifier``, 1.0): ``classifier(images) -> class probabilities
  [B, C]``; reward = probability of the prompted class ``inputs.labels[b]``.
* :class:`FunctionReward`: wraps any ``fn(inputs) -> [B]`` (e.g. token-level toy rewards).

Answer matching needs no computer-algebra package: numbers (integers, decimals, scientific
notation, ``a/b``, ``\\frac{a}{b}``, mixed ``1\\frac{1}{2}``, thousands separators, ``%``/``°``
stripped) are compared as exact fractions or within a relative tolerance of 1e-4; tuples are
compared element-wise; anything else is compared as a normalised string (``$``, ``\\left``,
``\\right``, ``\\text{}``, spacing commands, ``\\dfrac``/``\\tfrac``, braces, whitespace and case
removed, ``x = …`` reduced to its right-hand side).
"""
from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass
class RewardInputs:
  """One batch of rollouts to score; every given field has B entries (rows are rollouts).

  prompts: the prompt / caption strings. completions: decoded responses (text, MMU).
  references: ground-truth answers. choices: per row the option texts of a multiple-choice item
  (letters A, B, … in order) or None. images: uint8 [B, H, W, 3] generated images (T2I).
  labels: int [B] prompted class ids (classifier reward). completion_ids: per row the response
  token ids up to the first stop token (token-level rewards). extra: anything else, per row.
  """
  prompts: Sequence[str] | None = None
  completions: Sequence[str] | None = None
  references: Sequence[Any] | None = None
  choices: Sequence[Sequence[str] | None] | None = None
  images: np.ndarray | None = None
  labels: np.ndarray | None = None
  completion_ids: Sequence[np.ndarray] | None = None
  extra: Mapping[str, Sequence[Any]] | None = None

  def __len__(self) -> int:
    sizes = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is None or f.name == "extra":
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


def combine_rewards(fns: Sequence[RewardFn], inputs: RewardInputs
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(total float32 [B] = Σ weight · raw, {name: raw float32 [B]}) over the rewards ``fns``."""
  if not fns:
    raise ValueError("combine_rewards needs at least one reward")
  names = [f.name for f in fns]
  if len(set(names)) != len(names):
    raise ValueError(f"reward names must be unique, got {names}")
  b = len(inputs)
  total = np.zeros(b, np.float32)
  raw: dict[str, np.ndarray] = {}
  for f in fns:
    raw[f.name] = _as_scores(f(inputs), b, f.name)
    total += np.float32(f.weight) * raw[f.name]
  return total, raw


# ------------------------------------------------------------------ answer extraction

def answer_region(text: str) -> str:
  """The text after the last ``</think>`` when that is non-empty, else the whole text."""
  if THINK_CLOSE in text:
    after = text.rsplit(THINK_CLOSE, 1)[1]
    if after.strip():
      return after
  return text


def last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{…}`` / ``\\fbox{…}`` (balanced braces; ``\\boxed 5`` too)."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
  for start in reversed(starts):
    i = start
    while i < len(text) and text[i] == " ":
      i += 1
    if i < len(text) and text[i] == "{":
      depth, j = 0, i
      while j < len(text):
        if text[j] == "{":
          depth += 1
        elif text[j] == "}":
          depth -= 1
          if depth == 0:
            return text[i + 1:j]
        j += 1
      continue
    m = re.match(r"[^\s$]+", text[i:])
    if m and i > start:
      return m.group(0)
  return None


_NUMBER_RE = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|[+-]?\.\d+"
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
  """The final answer of a completion, or None.

  Searched in the answer region (after ``</think>``): the last ``\\boxed{}``; the text after the
  last ``####`` (first line); the text after the last "answer is" / "answer:" (first line,
  trailing period dropped); the last number. A ``\\boxed{}`` inside the reasoning is the final
  fallback.
  """
  if not text:
    return None
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  if "####" in region:
    tail = region.rsplit("####", 1)[1].strip().splitlines()
    if tail and tail[0].strip():
      return tail[0].strip()
  matches = list(_ANSWER_IS.finditer(region))
  if matches:
    cand = matches[-1].group(1).strip().splitlines()[0].strip()
    cand = re.sub(r"[.\s]+$", "", cand)
    if cand:
      return cand
  nums = re.findall(_NUMBER_RE, region)
  if nums:
    return nums[-1]
  boxed = last_boxed(text)
  return boxed.strip() if boxed else None


# ------------------------------------------------------------------ normalisation and comparison

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
  """A canonical string for comparison (see the module docstring); '' for None."""
  if s is None:
    return ""
  s = str(s).strip()
  for _ in range(2):
    s = _TEXT_CMD.sub(r"\1", s)
  for tok in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "$"):
    s = s.replace(tok, "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
  s = s.replace("\\circ", "").replace("°", "").replace("\\%", "").replace("%", "")
  s = re.sub(r"\s+", "", s)
  s = s.rstrip(".")
  m = re.fullmatch(r"[A-Za-z]\w*=([^=]+)", s)
  if m:
    s = m.group(1)
  while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
    s = s[1:-1]
  return s


def _balanced(s: str) -> bool:
  depth = 0
  for ch in s:
    depth += ch == "{"
    depth -= ch == "}"
    if depth < 0:
      return False
  return depth == 0


_FRAC = r"\\frac(?:\{([^{}]+)\}|(\d))(?:\{([^{}]+)\}|(\d))"


def parse_number(s: str) -> Fraction | None:
  """The exact value of a normalised numeric answer, or None (not a plain number)."""
  if not s:
    return None
  s = s.strip()
  if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", s):
    return Fraction(s)
  m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+))/([+-]?(?:\d+\.?\d*|\.\d+))", s)
  if m:
    den = Fraction(m.group(2))
    return Fraction(m.group(1)) / den if den != 0 else None
  m = re.fullmatch(r"([+-]?)(\d*)" + _FRAC, s)
  if m:
    num = parse_number(m.group(3) or m.group(4))
    den = parse_number(m.group(5) or m.group(6))
    if num is None or den is None or den == 0:
      return None
    value = (Fraction(int(m.group(2))) if m.group(2) else Fraction(0)) + num / den
    return -value if m.group(1) == "-" else value
  return None


def numbers_close(a: Fraction, b: Fraction, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
  """Exact equality, or ``math.isclose`` of the floats with the given tolerances."""
  return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


def _first_number(s: str) -> Fraction | None:
  m = re.search(r"[+-]?\d*" + _FRAC, s) or re.search(_NUMBER_RE, s)
  return parse_number(m.group(0)) if m else None


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
  """('()' / '[]' / '', top-level comma-separated items) for a tuple-like answer, else None."""
  brackets = ""
  if len(s) >= 2 and s[0] + s[-1] in ("()", "[]", "(]", "[)"):
    brackets, s = s[0] + s[-1], s[1:-1]
  items, depth, cur = [], 0, ""
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
    else:
      cur += ch
  items.append(cur)
  return (brackets, items) if len(items) > 1 else None


def _canon(s: str) -> str:
  return s.replace("{", "").replace("}", "").lower()


def answers_match(pred: str | None, ref: Any, rel_tol: float = 1e-4) -> bool:
  """Whether a predicted final answer equals the reference (numbers, tuples, or strings)."""
  if pred is None or ref is None:
    return False
  p, r = normalize_answer(pred), normalize_answer(str(ref))
  if not p or not r:
    return False
  if p == r:
    return True
  rn = parse_number(r)
  if rn is not None:
    pn = parse_number(p)
    if pn is None:
      pn = _first_number(p)
    return pn is not None and numbers_close(pn, rn, rel_tol)
  rt, pt = _split_tuple(r), _split_tuple(p)
  if rt is not None and pt is not None:
    return rt[0] == pt[0] and len(rt[1]) == len(pt[1]) and all(
        answers_match(a, b, rel_tol) for a, b in zip(pt[1], rt[1]))
  return _canon(p) == _canon(r)


# ------------------------------------------------------------------ multiple choice / short answers

_CHOICE_KEY = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[:\-]?\s*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z]))")


def _letter(s: str) -> str | None:
  """The letter of 'B', '(B)', 'B.', 'B)', 'B. text', '(b)'; None otherwise."""
  s = s.strip()
  m = re.fullmatch(r"\(\s*([A-Za-z])\s*\)[.:]?(?:\s.*)?", s, re.DOTALL)
  if m:
    return m.group(1).upper()
  m = re.fullmatch(r"([A-Z])(?:[.):](?:\s.*)?)?", s, re.DOTALL)
  return m.group(1) if m else None


def extract_choice(text: str) -> str | None:
  """The chosen option letter of a completion (upper case), or None.

  In the answer region: the last ``\\boxed{}`` holding a letter; the last "answer/option/choice
  is X" / "(x)"; a region that starts with a letter ('B', '(B)', 'B. …'); the last '(X)'.
  """
  if not text:
    return None
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None:
    letter = _letter(normalize_answer(boxed)) or _letter(boxed)
    if letter:
      return letter
  matches = list(_CHOICE_KEY.finditer(region))
  if matches:
    m = matches[-1]
    return (m.group(1) or m.group(2)).upper()
  letter = _letter(region.strip().splitlines()[0] if region.strip() else "")
  if letter:
    return letter
  parens = re.findall(r"\(([A-Z])\)", region)
  return parens[-1] if parens else None


_ARTICLES = {"a", "an", "the"}


def normalize_short_answer(s: str) -> str:
  """VQA-style: lower case, punctuation removed (decimal points kept), articles dropped."""
  s = str(s).lower().strip()
  s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
  s = re.sub(r"[^\w\s.]", " ", s)
  return " ".join(w for w in s.split() if w not in _ARTICLES)


def _short_answer(text: str) -> str:
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  matches = list(_ANSWER_IS.finditer(region))
  if matches:
    return re.sub(r"[.\s]+$", "", matches[-1].group(1).strip().splitlines()[0])
  lines = region.strip().splitlines()
  return lines[0].strip() if lines else ""


def mmu_answer_correct(completion: str, reference: Any, choices: Sequence[str] | None = None) -> bool:
  """Multiple choice when ``choices`` is given or the reference is a single letter ('B', '(B)');
  otherwise a short answer (numeric/symbolic match, yes/no on the first word, or equal
  normalised text). With ``choices``, an answer quoting an option's text counts as that letter.
  """
  if completion is None or reference is None:
    return False
  ref = str(reference).strip()
  ref_letter = _letter(ref) if (choices or re.fullmatch(r"\(?[A-Z]\)?\.?", ref)) else None
  if ref_letter is not None:
    got = extract_choice(completion)
    if got is None and choices:
      said = normalize_short_answer(_short_answer(completion))
      for i, c in enumerate(choices):
        if said and said == normalize_short_answer(c):
          got = chr(ord("A") + i)
          break
    return got == ref_letter
  said = _short_answer(completion)
  if answers_match(said, ref):
    return True
  ns, nr = normalize_short_answer(said), normalize_short_answer(ref)
  if nr in ("yes", "no"):
    return ns.split()[:1] == [nr]
  return bool(nr) and ns == nr


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


_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def format_ok(text: str) -> bool:
  """``<think> non-empty </think> non-empty answer``, one tag of each, nothing before ``<think>``."""
  if not text or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
    return False
  m = _FORMAT.fullmatch(text)
  return bool(m and m.group(1).strip() and m.group(2).strip())


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

"""Benchmark scorers: reference parsing, answer extraction and per-task metrics.

* GSM8K: the reference is the text after ``####`` (thousands separators dropped); a completion's
  answer is its last ``\\boxed{}``, ``####`` line, "answer is …" or last number
  (:func:`mmada_jax.rl.answers.extract_answer`), compared numerically.
* MATH: the reference is the last ``\\boxed{}`` of the solution; answers are compared by
  :func:`mmada_jax.rl.answers.answers_match` (normalised strings, numbers, then symbolic).
* Multiple choice (MMLU, ARC, MMMU, MMBench): the reference is a letter or a 0-based index; the
  completion's letter comes from :func:`mmada_jax.rl.answers.extract_choice` (or an option's text).
* VQA (VQAv2, GQA): the VQAv2 evaluation's normalisation (:func:`normalize_vqa`) and its accuracy
  (:func:`vqa_accuracy`: min(#matching other answers / 3, 1) averaged over the 10 leave-one-out
  subsets of the human answers).
* POPE: yes/no answers (:func:`yes_no`) and accuracy / precision / recall / F1 with "yes" positive.
* TruthfulQA MC2: :func:`truthfulqa_mc2` (the true answers' share of the probability mass).

:func:`mean_and_stderr` gives a metric's mean and its standard error over examples.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from mmada_jax.rl import answers

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ------------------------------------------------------------------ GSM8K / MATH

def gsm8k_reference(answer: str) -> str:
  """The final answer of a GSM8K ``answer`` field (``… #### 1,234`` -> ``"1234"``)."""
  if "####" not in answer:
    raise ValueError(f"GSM8K answer has no '#### N' final answer: {answer[-80:]!r}")
  return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_score(completion: str, reference: str) -> float:
  """1.0 when the completion's final answer equals the reference number (``reference`` as given by
  :func:`gsm8k_reference`), else 0.0."""
  got = answers.extract_answer(completion)
  return float(got is not None and answers.answers_match(got.replace(",", ""), reference, symbolic=False))


def math_reference(solution: str) -> str:
  """The final answer of a MATH ``solution`` field: its last ``\\boxed{}``."""
  boxed = answers.last_boxed(solution)
  if boxed is None or not boxed.strip():
    raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[-80:]!r}")
  return boxed.strip()


def math_score(completion: str, reference: str) -> float:
  """1.0 when the completion's final answer is equivalent to ``reference``, else 0.0."""
  return float(answers.answers_match(answers.extract_answer(completion), reference))


# ------------------------------------------------------------------ multiple choice

def choice_letter(reference: Any, num_choices: int | None = None) -> str:
  """A multiple-choice reference as its letter: ``"B"``, ``"(b)"`` or the 0-based index 1 -> ``"B"``."""
  if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
    i = int(reference)
  elif isinstance(reference, str) and re.fullmatch(r"\s*\(?\s*[A-Za-z]\s*\)?\s*", reference):
    i = LETTERS.index(re.sub(r"[\s()]", "", reference).upper())
  elif isinstance(reference, str) and reference.strip().isdigit():
    i = int(reference.strip())
  else:
    raise ValueError(f"multiple-choice answer {reference!r} is neither a letter nor an index")
  if i < 0 or (num_choices is not None and i >= num_choices) or i >= len(LETTERS):
    raise ValueError(f"multiple-choice answer {reference!r} is outside the {num_choices} choices")
  return LETTERS[i]


def choice_score(completion: str, reference: str, choices: Sequence[str] | None = None) -> float:
  """1.0 when the completion picks the reference letter (or quotes that option's text)."""
  return float(answers.mmu_answer_correct(completion, reference, choices))


# ------------------------------------------------------------------ VQA

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa(answer: str) -> str:
  """The VQAv2 evaluation's answer normalisation: newlines/tabs to spaces, lower case, punctuation
  removed (kept inside numbers such as ``1,000`` / ``2.5``), number words to digits, articles
  dropped, missing apostrophes of contractions restored."""
  text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD_STRIP.sub("", out)
  words = []
  for w in out.split():
    w = _NUMBER_WORDS.get(w, w)
    if w not in _ARTICLES:
      words.append(_CONTRACTIONS.get(w, w))
  return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
  """VQAv2 accuracy of one prediction against the human answers (10 in VQAv2): for each answer
  left out, min(#other answers equal to the prediction / 3, 1); averaged. Answers are compared
  after :func:`normalize_vqa`; one reference (GQA) gives exact match."""
  if not references:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = normalize_vqa(prediction)
  refs = [normalize_vqa(r) for r in references]
  if len(refs) == 1:
    return float(pred == refs[0])
  accs = []
  for i in range(len(refs)):
    matches = sum(r == pred for j, r in enumerate(refs) if j != i)
    accs.append(min(1.0, matches / 3.0))
  return float(np.mean(accs))


def short_answer(completion: str) -> str:
  """The short answer of a completion: after ``</think>``, the first non-empty line, trailing
  period dropped."""
  region = answers.answer_region(completion).strip()
  line = region.splitlines()[0].strip() if region else ""
  return re.sub(r"\.$", "", line)


# ------------------------------------------------------------------ POPE

def yes_no(completion: str) -> str:
  """``"no"`` when the answer's words contain "no" or "not", else ``"yes"`` (POPE's convention:
  anything that does not deny the object counts as yes)."""
  words = normalize_vqa(short_answer(completion) or completion).replace("n't", " not").split()
  return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1 and yes_ratio of yes/no predictions against yes/no labels
  ("yes" is the positive class)."""
  if len(predictions) != len(labels) or not labels:
    raise ValueError(f"pope_metrics: {len(predictions)} predictions for {len(labels)} labels")
  bad = [x for x in list(predictions) + list(labels) if x not in ("yes", "no")]
  if bad:
    raise ValueError(f"pope_metrics: {bad[0]!r} is not 'yes' or 'no'")
  p = np.array([x == "yes" for x in predictions])
  y = np.array([x == "yes" for x in labels])
  tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": float((p == y).mean()), "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": float(p.mean())}


# ------------------------------------------------------------------ TruthfulQA

def truthfulqa_mc2(log_likelihoods: Sequence[float], labels: Sequence[int]) -> float:
  """TruthfulQA MC2: the probability mass of the true answers (label 1) over all answers,
  ``Σ_true exp(ll) / Σ_all exp(ll)`` (computed stably in log space)."""
  ll = np.asarray(log_likelihoods, np.float64)
  y = np.asarray(labels)
  if ll.shape != y.shape or ll.size == 0 or not set(y.tolist()) <= {0, 1} or not y.any():
    raise ValueError(f"truthfulqa_mc2: {ll.size} log-likelihoods for labels {list(y)} (need one 0/1 each, a 1)")
  p = np.exp(ll - ll.max())
  return float(p[y == 1].sum() / p.sum())


# ------------------------------------------------------------------ aggregation

def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean with ddof=1; 0 for one value)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("mean_and_stderr of no values")
  return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0)

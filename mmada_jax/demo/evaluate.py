"""Scoring helpers for the demo's three evaluations, and an image grid for looking at samples.

* t2i: generated digits are classified by the demo :class:`~mmada_jax.demo.classifier.DigitClassifier`;
  accuracy = share classified as the prompted digit.
* MMU: completions are checked with :func:`mmada_jax.rl.answers.mmu_answer_correct` (the RL reward).
* arithmetic: :func:`mmada_jax.demo.arithmetic.score` (the RL correctness and format rewards).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmada_jax.demo import arithmetic
from mmada_jax.demo.classifier import DigitClassifier
from mmada_jax.rl import answers as answer_lib


def t2i_scores(classifier: DigitClassifier, images: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
  """images uint8 [n, H, W, 3] generated for digits ``labels`` -> ``accuracy``, ``mean_label_prob``
  (mean classifier probability of the prompted digit) and ``per_digit`` accuracy (list of 10, NaN
  for digits without images)."""
  labels = np.asarray(labels, np.int64)
  p = classifier.predict_proba(images)
  hit = np.argmax(p, axis=-1) == labels
  per = [float(hit[labels == d].mean()) if np.any(labels == d) else float("nan") for d in range(10)]
  return {"accuracy": float(hit.mean()), "mean_label_prob": float(p[np.arange(len(labels)), labels].mean()),
          "per_digit": per}


def mmu_scores(completions: Sequence[str], answers: Sequence[Any]) -> dict[str, float]:
  """``accuracy`` of MMU completions against reference answers (strings or ints)."""
  if len(completions) != len(answers):
    raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
  hits = [answer_lib.mmu_answer_correct(c, str(a)) for c, a in zip(completions, answers)]
  return {"accuracy": float(np.mean(hits)) if hits else 0.0}


def arithmetic_scores(completions: Sequence[str], answers: Sequence[Any]) -> dict[str, float]:
  """``accuracy`` and ``format`` of arithmetic completions (see :func:`arithmetic.score`)."""
  return arithmetic.score(completions, answers)


def image_grid(images: np.ndarray, cols: int = 10, scale: int = 2, pad: int = 1) -> np.ndarray:
  """images uint8 [n, H, W, 3] -> one uint8 grid image [rows·(H·scale+pad)+pad, cols·(W·scale+pad)+pad, 3]
  (nearest-neighbour ×``scale``, grey separators)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  big = images.repeat(scale, axis=1).repeat(scale, axis=2)
  rows = max(1, -(-n // cols))
  hh, ww = h * scale + pad, w * scale + pad
  out = np.full((rows * hh + pad, cols * ww + pad, c), 128, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    out[pad + r * hh:pad + r * hh + h * scale, pad + k * ww:pad + k * ww + w * scale] = big[i]
  return out


def save_grid(path: str, images: np.ndarray, cols: int = 10, scale: int = 2) -> str:
  """Writes :func:`image_grid` as a PNG; returns ``path``."""
  from PIL import Image
  Image.fromarray(image_grid(images, cols, scale)).save(path)
  return path

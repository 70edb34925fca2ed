"""Handwritten digits for the demo: scikit-learn's bundled 8×8 digits, upscaled, with captions.

``load_digits()`` ships inside scikit-learn (1797 grey images, values 0..16, ink high), so nothing
is downloaded. Images are upscaled bicubically to ``resolution``² (ink bright on black) and
replicated to 3 channels. The train/test split is a seeded, label-stratified permutation.
Also here: captions (``caption``), seeded affine jitter (``jitter``) and MMU turns (``mmu_messages``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {w}",
    "a picture of the digit {d}",
    "handwritten {w}",
    "an image of the number {d}",
    "the digit {w}, written by hand",
)
"""``{d}`` = the digit character, ``{w}`` = its English word."""


@dataclasses.dataclass(frozen=True)
class DigitSplit:
  """One split: ``images`` uint8 [n, R, R, 3] (0..255), ``labels`` int64 [n] in 0..9 and
  ``index`` int64 [n] (row of the image in ``sklearn.datasets.load_digits()``)."""
  images: np.ndarray
  labels: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def as_float(self) -> np.ndarray:
    """images as float32 [n, R, R, 3] in [-1, 1] (the image tokenizer's input range)."""
    return to_float(self.images)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images (0..255) -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] (any shape; values clipped) -> uint8 0..255."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upscale(raw: np.ndarray, resolution: int) -> np.ndarray:
  """raw digits [n, 8, 8] with values 0..16 -> uint8 [n, R, R, 3], bicubic (PIL, clamped to 0..255)."""
  grey = np.clip(np.round(np.asarray(raw, np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  out = np.empty((grey.shape[0], resolution, resolution), np.uint8)
  for i, g in enumerate(grey):
    out[i] = np.asarray(Image.fromarray(g, mode="L").resize((resolution, resolution), Image.BICUBIC))
  return np.repeat(out[..., None], 3, axis=-1)


def load_raw() -> tuple[np.ndarray, np.ndarray]:
  """(images float64 [1797, 8, 8] in 0..16, labels int64 [1797]) from scikit-learn's bundled copy."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images.astype(np.float64), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stratified split: per class, a ``test_fraction`` share (rounded) goes to test.
  Returns (train, test) row indices, each sorted ascending."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    rows = rows[rng.permutation(len(rows))]
    k = int(round(len(rows) * test_fraction))
    test.append(rows[:k])
    train.append(rows[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digit_splits(resolution: int = 32, test_fraction: float = 0.2,
                      seed: int = 0) -> tuple[DigitSplit, DigitSplit]:
  """(train, test) splits of the upscaled digits (about 1438 / 359 images for the defaults)."""
  raw, labels = load_raw()
  images = upscale(raw, resolution)
  tr, te = split_indices(labels, test_fraction, seed)
  return (DigitSplit(images[tr], labels[tr], tr), DigitSplit(images[te], labels[te], te))


def jitter(images: np.ndarray, copies: int, seed: int, max_rotation: float = 10.0, max_shift: float = 0.06,
           scale_range: tuple[float, float] = (0.9, 1.1)) -> tuple[np.ndarray, np.ndarray]:
  """Random affine copies of images uint8 [n, R, R, 3]: rotation in ±``max_rotation`` degrees, scale
  in ``scale_range``, shift in ±``max_shift``·R pixels per axis, about the centre (bicubic, black fill).

  Returns (uint8 [n·copies, R, R, 3], source row int64 [n·copies]); copy k of image i is row k·n + i.
  """
  images = np.asarray(images)
  n, r = images.shape[0], images.shape[1]
  rng = np.random.default_rng(seed)
  out = np.empty((n * copies,) + images.shape[1:], np.uint8)
  src = np.tile(np.arange(n, dtype=np.int64), copies)
  centre = r / 2.0
  for j, i in enumerate(src):
    theta = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    s = rng.uniform(*scale_range)
    tx, ty = rng.uniform(-max_shift, max_shift, 2) * r
    # PIL maps each output pixel to an input pixel: in = M⁻¹ (out − centre − t) + centre, M = s·Rot(θ).
    a, b = np.cos(theta) / s, np.sin(theta) / s
    d, e = -np.sin(theta) / s, np.cos(theta) / s
    ox, oy = centre + tx, centre + ty
    coeffs = (a, b, centre - a * ox - b * oy, d, e, centre - d * ox - e * oy)
    grey = Image.fromarray(images[i, :, :, 0], mode="L")
    moved = np.asarray(grey.transform((r, r), Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=0))
    out[j] = moved[..., None]
  return out, src


def caption(label: int, template: int) -> str:
  """Caption of digit ``label`` with template number ``template`` (taken modulo the count)."""
  t = CAPTION_TEMPLATES[int(template) % len(CAPTION_TEMPLATES)]
  return t.format(d=str(int(label)), w=DIGIT_WORDS[int(label)])


def random_captions(labels: np.ndarray, seed: int) -> list[str]:
  """One caption per label, template drawn uniformly with ``seed``."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(CAPTION_TEMPLATES), len(labels))
  return [caption(int(l), int(t)) for l, t in zip(labels, picks)]


def label_of_caption(text: str) -> int | None:
  """The digit a caption names (digit character or English word), or None if none / several."""
  found = {int(ch) for ch in text if ch.isdigit()}
  words = text.lower().replace(",", " ").split()
  found |= {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}
  return found.pop() if len(found) == 1 else None


MMU_QUESTIONS = ("What digit is shown?", "Which number is in the image?", "What number is written here?")
"""Image-understanding questions; the first one is the evaluation question."""
MMU_COT_SUFFIX = " Think first."
"""Appended to the question of CoT turns: plain and CoT answers to one prompt would compete for the
first answer token, which a small model resolves badly (MMU accuracy falls during SFT)."""


def mmu_answer(label: int, cot: bool = False) -> str:
  """The answer to an MMU question about digit ``label``: ``"3"``, or with ``cot``
  ``"<think> a handwritten three </think> 3"``."""
  d = int(label)
  return f"<think> a handwritten {DIGIT_WORDS[d]} </think> {d}" if cot else str(d)


def mmu_question(question: int = 0, cot: bool = False) -> str:
  """Question number ``question`` (modulo the count), with :data:`MMU_COT_SUFFIX` when ``cot``."""
  return MMU_QUESTIONS[int(question) % len(MMU_QUESTIONS)] + (MMU_COT_SUFFIX if cot else "")


def mmu_messages(label: int, question: int = 0, cot: bool = False) -> list[dict[str, str]]:
  """One MMU conversation about digit ``label``: :func:`mmu_question` -> :func:`mmu_answer`."""
  return [{"role": "user", "content": mmu_question(question, cot)},
          {"role": "assistant", "content": mmu_answer(label, cot)}]

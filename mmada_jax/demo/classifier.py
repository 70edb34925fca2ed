"""A small digit classifier for judging generated digits (scikit-learn, CPU, about a second to train).

Any image size works: images are converted to grey, box-averaged to 8×8 (the digits' native
resolution), scaled to [0, 1] and fed to a multinomial logistic regression or a small MLP.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
from PIL import Image

FEATURE_SIDE = 8


def features(images: np.ndarray) -> np.ndarray:
  """images uint8 [n, H, W] or [n, H, W, C] (0..255) -> float32 [n, 64] grey 8×8 box means in [0, 1]."""
  x = np.asarray(images)
  if x.ndim == 4:
    x = x.astype(np.float32).mean(axis=-1)
  elif x.ndim != 3:
    raise ValueError(f"images must be [n, H, W] or [n, H, W, C], got shape {x.shape}")
  x = x.astype(np.float32)
  n, h, w = x.shape
  s = FEATURE_SIDE
  if h % s == 0 and w % s == 0:
    small = x.reshape(n, s, h // s, s, w // s).mean(axis=(2, 4))
  else:
    small = np.stack([np.asarray(Image.fromarray(im, mode="F").resize((s, s), Image.BOX)) for im in x])
  return (small.reshape(n, s * s) / 255.0).astype(np.float32)


@dataclasses.dataclass
class DigitClassifier:
  """A fitted scikit-learn model over :func:`features`; ``predict_proba`` -> float32 [n, 10]."""
  model: Any

  def predict_proba(self, images: np.ndarray) -> np.ndarray:
    """images uint8 [n, H, W] or [n, H, W, C] -> class probabilities float32 [n, 10]."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
      p = self.model.predict_proba(features(images)).astype(np.float32)
    out = np.zeros((p.shape[0], 10), np.float32)
    out[:, self.model.classes_.astype(np.int64)] = p
    return out

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Same as :meth:`predict_proba` (the ``ClassifierReward`` calling convention)."""
    return self.predict_proba(images)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """images -> predicted digit int64 [n]."""
    return np.argmax(self.predict_proba(images), axis=-1).astype(np.int64)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` classified as ``labels`` (int [n])."""
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      pickle.dump(self.model, f)

  @classmethod
  def load(cls, path: str) -> "DigitClassifier":
    with open(path, "rb") as f:
      return cls(pickle.load(f))


def train_classifier(images: np.ndarray, labels: np.ndarray, kind: str = "mlp", seed: int = 0) -> DigitClassifier:
  """Fits on images uint8 [n, H, W(, C)] with labels int [n] in 0..9.

  ``kind``: ``logreg`` (multinomial logistic regression, C = 1) or ``mlp`` (one hidden layer of 128
  ReLU units, L2 1e-3, Adam; deterministic for a fixed ``seed``). Fits with one BLAS thread.
  """
  from threadpoolctl import threadpool_limits
  x, y = features(images), np.asarray(labels, np.int64)
  if kind == "logreg":
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(C=1.0, max_iter=2000)
  elif kind == "mlp":
    from sklearn.neural_network import MLPClassifier
    model = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=400, random_state=seed)
  else:
    raise ValueError(f"kind must be 'logreg' or 'mlp', got {kind!r}")
  with threadpool_limits(1):  # small matrices: multi-threaded BLAS only adds contention (10x slower)
    model.fit(x, y)
  return DigitClassifier(model)

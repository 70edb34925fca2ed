"""The demo's three evaluations through the evaluation harness (:mod:`mmada_jax.eval`), and an
image grid for looking at samples.

:func:`write_eval_data` writes the demo's evaluation sets as benchmark files in ``WORKDIR/eval``:

* ``arithmetic.jsonl``: GSM8K's fields (``question``, ``answer`` ending in ``#### N``);
* ``mmu.jsonl``: VQA fields (``image``: a PNG under ``mmu_images/``, ``question``, ``answer``);
* ``t2i_prompts.jsonl``: ``prompt`` and the prompted digit ``label``.

:func:`run_eval` runs a preset of ``configs/eval.py`` (``demo_arithmetic``, ``demo_mmu``,
``demo_t2i``) on one of them into ``WORKDIR/eval/<name>/`` (``results.json``, ``samples.jsonl``).
Text-to-image images are scored by :class:`DigitScorer`, the demo classifier as the harness's
image–text scorer (1 when an image is classified as its prompt's digit).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from mmada_jax.demo.classifier import DigitClassifier

EVAL_DIR = "eval"
FILES = {"arithmetic": "arithmetic.jsonl", "mmu": "mmu.jsonl", "t2i": "t2i_prompts.jsonl"}


class DigitScorer:
  """:class:`~mmada_jax.eval.clip.ImageTextScorer` of generated digits: 1.0 when the classifier's
  digit is the prompt's (``labels``: prompt -> digit), else 0.0; its mean is the accuracy."""
  name = "classifier_accuracy"

  def __init__(self, classifier: DigitClassifier, labels: Mapping[str, int]):
    self.classifier, self.labels = classifier, dict(labels)

  def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    unknown = [t for t in texts if t not in self.labels]
    if unknown:
      raise ValueError(f"DigitScorer: no digit known for the prompt {unknown[0]!r}")
    want = np.array([int(self.labels[t]) for t in texts], np.int64)
    return (self.classifier.predict(images) == want).astype(np.float32)


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def write_eval_data(workdir: str, paths: Mapping[str, str], n_text: int | None = None,
                    n_mmu: int | None = None) -> dict[str, str]:
  """Writes the evaluation files from the demo data ``paths`` (first ``n_text`` arithmetic
  problems, ``n_mmu`` test digits; None: all); returns {arithmetic, mmu, t2i: path}."""
  from PIL import Image
  from mmada_jax.demo.data import read_jsonl
  out = os.path.join(workdir, EVAL_DIR)
  img_dir = os.path.join(out, "mmu_images")
  shutil.rmtree(img_dir, ignore_errors=True)
  os.makedirs(img_dir)
  arith = read_jsonl(paths["eval_arith"])[:n_text]
  files = {"arithmetic": _write_jsonl(os.path.join(out, FILES["arithmetic"]),
                                      [{"question": r["question"], "answer": f"#### {r['answer']}"} for r in arith])}
  test = np.load(paths["test_images"])
  mmu = read_jsonl(paths["eval_mmu"])[:n_mmu]
  rows = []
  for i, rec in enumerate(mmu):
    if int(test["labels"][i]) != int(rec["label"]):
      raise ValueError(f"{paths['test_images']}: image {i} is not the MMU record's digit")
    name = f"{i:05d}.png"
    Image.fromarray(np.asarray(test["images"][i], np.uint8)).save(os.path.join(img_dir, name))
    rows.append({"image": f"mmu_images/{name}", "question": rec["question"], "answer": rec["answer"]})
  files["mmu"] = _write_jsonl(os.path.join(out, FILES["mmu"]), rows)
  files["t2i"] = _write_jsonl(os.path.join(out, FILES["t2i"]),
                              [{"prompt": r["prompt"], "label": int(r["label"])} for r in read_jsonl(paths["eval_t2i"])])
  return files


def run_eval(preset: str, workdir: str, name: str, loaded: Any, *, data: str, model: str, text_tokenizer: str,
             image_tokenizer: str = "", **settings: Any) -> dict[str, Any]:
  """Runs the ``configs/eval.py`` preset on ``data`` with the already loaded model (a
  :class:`mmada_jax.eval.runner.Loaded`) into a fresh ``WORKDIR/eval/<name>``; ``model`` /
  ``text_tokenizer`` / ``image_tokenizer``: the paths recorded in the results; ``settings``:
  other config keys. Returns the harness's results dict."""
  from mmada_jax.eval import runner
  from mmada_jax.train.config_files import load_config_file, packaged_config_dir
  cfg = load_config_file(f"{os.path.join(packaged_config_dir(), 'eval.py')}:{preset}")
  cfg.update(dict(data=data, model=model, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer, **settings))
  out = os.path.join(workdir, EVAL_DIR, name)
  shutil.rmtree(out, ignore_errors=True)      # the demo re-evaluates its (possibly retrained) model
  return runner.run(cfg, out, loaded=loaded)


def t2i_images(result_dir: str) -> np.ndarray:
  """The first image of every prompt of a text-to-image run, uint8 [n, H, W, 3]."""
  from PIL import Image
  with open(os.path.join(result_dir, "samples.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return np.stack([np.asarray(Image.open(os.path.join(result_dir, r["images"][0])).convert("RGB")) for r in rows])


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

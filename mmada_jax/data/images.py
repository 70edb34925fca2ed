"""Image preprocessing of the original (``training/utils.py::image_transform``, ``parquet/my_dataset.py``).

Modes (all bicubic, output float32 [R, R, 3] in [-1, 1] = (x/255 - 0.5) / 0.5):
* ``clip``: resize the short side to R (long side ``int(R * long / short)``, as torchvision's
  ``Resize(R)``), then center-crop R×R (offsets ``round((size - R) / 2)``, as ``CenterCrop``).
* ``squash``: resize straight to R×R (ai2d / clevr / docvqa / geo, LLaVA at eval).
* ``pad_white``: paste centred on a white square of side max(H, W) (offsets ``(side - size) // 2``,
  LLaVA's ``expand2square``), then resize to R×R (Geo170K).
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES = ("clip", "squash", "pad_white")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(source: Any, base_dir: str = "") -> Image.Image:
  """A path (relative to ``base_dir``), raw encoded bytes, a ``{"bytes"|"path"}`` dict (the
  Hugging Face image struct) or a PIL image -> RGB PIL image."""
  if isinstance(source, Image.Image):
    img = source
  elif isinstance(source, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(bytes(source)))
  elif isinstance(source, dict):
    if source.get("bytes"):
      return load_image(source["bytes"], base_dir)
    if source.get("path"):
      return load_image(source["path"], base_dir)
    raise ValueError(f"image dict has neither 'bytes' nor 'path': keys {sorted(source)}")
  elif isinstance(source, (str, os.PathLike)):
    path = os.path.join(base_dir, os.fspath(source))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image file not found: {path!r}")
    img = Image.open(path)
  else:
    raise ValueError(f"cannot load an image from {type(source).__name__}")
  img.load()
  if img.mode != "RGB":
    img = img.convert("RGB")  # as the original: alpha is dropped, not composited
  return img


def _resize_short_side(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), Image.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def _pad_to_square(img: Image.Image, color=(255, 255, 255)) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new("RGB", (side, side), color)
  out.paste(img, ((side - w) // 2, (side - h) // 2))
  return out


def resize_image(img: Image.Image, resolution: int, mode: str = "clip") -> Image.Image:
  """RGB PIL image -> R×R RGB PIL image with the given mode (see module docstring)."""
  if mode == "clip":
    return _center_crop(_resize_short_side(img, resolution), resolution)
  if mode == "squash":
    return img if img.size == (resolution, resolution) else img.resize((resolution, resolution), Image.BICUBIC)
  if mode == "pad_white":
    sq = _pad_to_square(img)
    return sq if sq.size == (resolution, resolution) else sq.resize((resolution, resolution), Image.BICUBIC)
  raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def preprocess_image(source: Any, resolution: int, mode: str = "clip", base_dir: str = "") -> np.ndarray:
  """Loads and preprocesses one image -> float32 [R, R, 3] in [-1, 1]."""
  img = resize_image(load_image(source, base_dir), resolution, mode)
  x = np.asarray(img, dtype=np.float32) / 255.0
  return (x - 0.5) / 0.5

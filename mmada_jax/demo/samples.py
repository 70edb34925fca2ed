"""``samples.png``: generated digits, one row per prompted digit with its legend, and one image's
denoising steps as a labelled strip beneath the grid."""
from __future__ import annotations

from typing import Sequence

import numpy as np

GREEN, RED, GREY, WHITE, INK = (40, 160, 60), (200, 40, 40), (128, 128, 128), (255, 255, 255), (20, 20, 20)


def trajectory_frames(trajectory: np.ndarray, final_codes: np.ndarray, image_tokenizer, image_hw) -> np.ndarray:
  """Per sampler step, the image decoded from the codes known so far (unknown code patches grey).

  trajectory: int [T, N] known codes per step (-1 = masked); final_codes: int [N].
  Returns uint8 [T + 1, H, W, 3] (the last frame is the finished image).
  """
  n = final_codes.shape[-1]
  g = int(round(np.sqrt(n)))
  h, w = image_hw
  ph, pw = h // g, w // g
  filled = np.where(trajectory < 0, final_codes[None], trajectory)
  stack = np.concatenate([filled, final_codes[None]], axis=0)
  imgs = np.asarray(image_tokenizer.decode(stack))
  imgs = (np.clip((imgs + 1.0) / 2.0, 0.0, 1.0) * 255).astype(np.uint8)
  for t in range(trajectory.shape[0]):
    cover = np.kron((trajectory[t] < 0).reshape(g, g), np.ones((ph, pw), bool))
    imgs[t][cover] = 128
  return imgs


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except TypeError:          # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def _tile(img: np.ndarray, px: int, border: tuple[int, int, int] | None, pad: int = 3) -> np.ndarray:
  """uint8 [H, W, 3] -> [px + 2·pad, px + 2·pad, 3]: nearest-neighbour upscaled, in a coloured frame."""
  from PIL import Image
  big = np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize((px, px), Image.NEAREST))
  out = np.full((px + 2 * pad, px + 2 * pad, 3), border or WHITE, np.uint8)
  out[pad:pad + px, pad:pad + px] = big
  return out


def save_samples_png(path: str, images: np.ndarray, labels: np.ndarray, trajectory: np.ndarray | None,
                     codes: np.ndarray, image_tokenizer, index: int = 0, per_row: int = 10, digit_px: int = 64,
                     predicted: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                     title: str = "") -> str:
  """Writes the sample sheet; returns ``path``.

  Rows = prompted digit 0..9 (up to ``per_row`` images each, ``digit_px`` pixels square, ≥ 48),
  each with a legend (the digit and, with ``predicted`` [n], how many images the classifier reads
  as that digit; frames green = read as prompted, red = not). Beneath: the denoising steps of image
  ``index`` (``trajectory`` int [T, n, N] known codes per step, ``codes`` int [n, N] final codes),
  each frame labelled with its step, the prompt (``prompts[index]``) as its legend.
  images: uint8 [n, H, W, 3]; labels: int [n] (the prompted digit).
  """
  from PIL import Image, ImageDraw
  if digit_px < 48:
    raise ValueError(f"digit_px={digit_px}: samples are drawn at least 48 pixels high")
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f"images [n, H, W, 3] and labels [n] expected, got {images.shape} and {labels.shape}")
  pred = None if predicted is None else np.asarray(predicted)
  font, small = _font(20), _font(15)
  pad, gap, legend_w, row_h = 3, 4, 190, digit_px + 6 + 4
  tile = digit_px + 2 * pad
  digits = sorted(set(labels.tolist()))
  width = legend_w + per_row * (tile + gap) + gap
  head = 40 if title else 8
  strip_h = 0
  frames = None
  if trajectory is not None:
    frames = trajectory_frames(np.asarray(trajectory)[:, index], np.asarray(codes)[index], image_tokenizer,
                               images.shape[1:3])
    strip_h = 36 + tile + 26
    width = max(width, legend_w + len(frames) * (tile + gap) + gap)
  height = head + len(digits) * row_h + strip_h + 8
  sheet = Image.new("RGB", (width, height), WHITE)
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((8, 8), title, fill=INK, font=font)
  for r, d in enumerate(digits):
    y = head + r * row_h
    rows = np.flatnonzero(labels == d)[:per_row]
    legend = f"prompt: digit {d}"
    draw.text((8, y + 8), legend, fill=INK, font=font)
    if pred is not None:
      ok = int(np.sum(pred[rows] == d))
      draw.text((8, y + 36), f"classified {d}: {ok}/{len(rows)}", fill=GREEN if ok == len(rows) else RED, font=small)
    for k, i in enumerate(rows):
      border = None if pred is None else (GREEN if pred[i] == d else RED)
      sheet.paste(Image.fromarray(_tile(images[i], digit_px, border, pad)), (legend_w + gap + k * (tile + gap), y))
  if frames is not None:
    y = head + len(digits) * row_h + 10
    what = f"denoising \"{prompts[index]}\"" if prompts is not None else "denoising"
    draw.text((8, y), what, fill=INK, font=font)
    draw.text((8, y + 28), "grey = still masked", fill=GREY, font=small)
    y += 30
    for t, f in enumerate(frames):
      x = legend_w + gap + t * (tile + gap)
      sheet.paste(Image.fromarray(_tile(f, digit_px, None, pad)), (x, y))
      name = "final" if t == len(frames) - 1 else f"step {t + 1}"
      draw.text((x + 4, y + tile + 2), name, fill=INK, font=small)
  sheet.save(path)
  return path

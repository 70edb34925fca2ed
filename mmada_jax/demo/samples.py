"""``samples.png``: generated digits, one row per prompted digit, and one image's denoising steps."""
from __future__ import annotations

import numpy as np

from mmada_jax.demo.evaluate import image_grid


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


def save_samples_png(path: str, images: np.ndarray, labels: np.ndarray, trajectory: np.ndarray | None,
                     codes: np.ndarray, image_tokenizer, index: int = 0, per_row: int = 10, scale: int = 3) -> str:
  """Writes the digit grid (rows = prompted digit 0..9, up to ``per_row`` images each) with the
  denoising steps of image ``index`` as a column to its right; returns ``path``."""
  from PIL import Image
  labels = np.asarray(labels)
  h, w = images.shape[1:3]
  rows = []
  for d in sorted(set(labels.tolist())):
    sel = images[labels == d][:per_row]
    if len(sel) < per_row:
      sel = np.concatenate([sel, np.full((per_row - len(sel), h, w, 3), 255, np.uint8)])
    rows.append(sel)
  grid = image_grid(np.concatenate(rows), cols=per_row, scale=scale)
  if trajectory is not None:
    frames = trajectory_frames(np.asarray(trajectory)[:, index], np.asarray(codes)[index], image_tokenizer, (h, w))
    strip = image_grid(frames, cols=1, scale=scale)
    height = max(grid.shape[0], strip.shape[0])
    pad = lambda a: np.concatenate([a, np.full((height - a.shape[0], a.shape[1], 3), 255, np.uint8)])  # noqa: E731
    grid = np.concatenate([pad(grid), np.full((height, 2 * scale, 3), 255, np.uint8), pad(strip)], axis=1)
  Image.fromarray(grid).save(path)
  return path

"""An ImageReward-style preference score: a learned MLP head over CLIP image and text embeddings.

ImageReward scores an image–prompt pair with a small MLP on top of a vision–language encoder,
trained on human preference pairs. Here the encoder is the JAX CLIP (:mod:`mmada_jax.scorers.clip`)
and the head reads, per pair, the features ``f = [e_img, e_txt, e_img ⊙ e_txt]`` (float32
[B, 3·projection_dim], both embeddings L2-normalised)::

    h_0 = f;   h_{k+1} = gelu(h_k W_k + b_k)  (hidden layers);   s = h_K W_K + b_K   (one output)
    score = (s − mean) / std

The head lives in one local safetensors file (:func:`save_preference_head` writes it):
``layers.{k}.weight`` float32 [in, out], ``layers.{k}.bias`` [out] for k = 0..K (the last layer
has out = 1), optional scalars ``mean`` / ``std`` (the score normalisation ImageReward applies;
default 0 / 1). How it is trained (e.g. a Bradley–Terry loss on preferred / rejected pairs of
CLIP embeddings) is outside this module: any head of this layout loads.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.scorers.clip import CLIP


def features(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """float32 [B, 3P] ``[e_img, e_txt, e_img ⊙ e_txt]`` of embeddings [B, P]."""
  i, t = image_embeds.astype(jnp.float32), text_embeds.astype(jnp.float32)
  return jnp.concatenate([i, t, i * t], axis=-1)


def head_apply(layers: Sequence[tuple[jax.Array, jax.Array]], mean: jax.Array, std: jax.Array,
               feats: jax.Array) -> jax.Array:
  """float32 [B] normalised head score of features [B, 3P] (module docstring)."""
  h = feats
  for k, (w, b) in enumerate(layers):
    h = h @ w + b
    if k < len(layers) - 1:
      h = jax.nn.gelu(h)
  return (h[..., 0] - mean) / std


def save_preference_head(path: str | os.PathLike, layers: Sequence[tuple[Any, Any]], mean: float = 0.0,
                         std: float = 1.0) -> None:
  """Writes a head (``layers`` = [(weight [in, out], bias [out]), ...], last out = 1) to ``path``."""
  from safetensors.numpy import save_file
  out = {"mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32)}
  for k, (w, b) in enumerate(layers):
    out[f"layers.{k}.weight"], out[f"layers.{k}.bias"] = np.asarray(w, np.float32), np.asarray(b, np.float32)
  save_file(out, os.fspath(path))


class PreferenceScorer:
  """CLIP + preference head: ``score`` (host, numpy) and ``score_device`` (batch-sharded arrays).

  Args: clip: the :class:`~mmada_jax.scorers.clip.CLIP` whose embeddings the head reads;
  layers / mean / std: the head (module docstring), checked against the CLIP's projection size.
  """

  name = "image_reward"

  def __init__(self, clip: CLIP, layers: Sequence[tuple[Any, Any]], mean: float = 0.0, std: float = 1.0):
    if not layers:
      raise ValueError("preference head: no layers")
    dim = 3 * int(clip.config.get("projection_dim", 512))
    prev = dim
    for k, (w, b) in enumerate(layers):
      w, b = np.asarray(w), np.asarray(b)
      if w.ndim != 2 or w.shape[0] != prev or b.shape != (w.shape[1],):
        raise ValueError(f"preference head: layers.{k} has weight {w.shape} / bias {b.shape}; expected "
                         f"weight [{prev}, out] and bias [out] (features are 3 × projection_dim = {dim})")
      prev = w.shape[1]
    if prev != 1:
      raise ValueError(f"preference head: the last layer has {prev} outputs, expected 1")
    if not float(std) > 0:
      raise ValueError(f"preference head: std={std} must be > 0")
    self.clip = clip
    self.layers = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)) for w, b in layers]
    self.mean, self.std = jnp.float32(mean), jnp.float32(std)

    def device_fn(vision, head, mean, std, images, text_emb):
      return head_apply(head, mean, std, features(clip.image_embeds_device_fn(vision, images), text_emb))

    self._device_fn = jax.jit(device_fn)

  @classmethod
  def from_files(cls, clip: CLIP | str | os.PathLike, head_file: str | os.PathLike) -> "PreferenceScorer":
    """A scorer from a CLIP (or its local Hugging Face directory) and a head file."""
    head_file = os.fspath(head_file)
    if not os.path.exists(head_file):
      raise FileNotFoundError(f"preference head: {head_file} does not exist (a safetensors file is expected)")
    from safetensors.numpy import load_file
    w = load_file(head_file)
    layers, k = [], 0
    while f"layers.{k}.weight" in w:
      if f"layers.{k}.bias" not in w:
        raise ValueError(f"preference head: {head_file} has layers.{k}.weight but no layers.{k}.bias")
      layers.append((w[f"layers.{k}.weight"], w[f"layers.{k}.bias"]))
      k += 1
    if not layers:
      raise ValueError(f"preference head: {head_file} has no 'layers.0.weight' (keys {sorted(w)[:6]})")
    model = clip if isinstance(clip, CLIP) else CLIP.from_pretrained(clip)
    return cls(model, layers, float(w.get("mean", 0.0)), float(w.get("std", 1.0)))

  def score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
    """float32 [B] scores of uint8 images [B, H, W, 3] against their texts (host in and out)."""
    if len(images) != len(texts):
      raise ValueError(f"preference head: {len(images)} images for {len(texts)} texts")
    feats = features(jnp.asarray(self.clip.image_embeds(images)), jnp.asarray(self.clip.text_embeds(texts)))
    return np.asarray(head_apply(self.layers, self.mean, self.std, feats))

  def score_device(self, images: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """float32 [B] scores of images [B, H, W, 3] in [0, 255] against text embeddings [B, P], on
    the devices (batch-sharded in, batch-sharded out)."""
    if images.shape[0] != text_embeds.shape[0]:
      raise ValueError(f"preference head: {images.shape[0]} images for {text_embeds.shape[0]} text embeddings")
    return self._device_fn(self.clip.vision_params, self.layers, self.mean, self.std, images, text_embeds)

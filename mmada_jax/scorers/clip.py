"""CLIP (vision + text transformer) in JAX, loaded from a local Hugging Face CLIP directory, and the
CLIP score of image–text pairs.

The directory holds ``config.json`` (``text_config``, ``vision_config``, ``projection_dim``),
``model.safetensors`` (the Hugging Face parameter names: ``text_model.*``, ``vision_model.*``,
``text_projection.weight``, ``visual_projection.weight``) and ``tokenizer.json`` (a ``tokenizers``
file whose post-processor adds the start/end tokens). Nothing is downloaded; no torch.

Images: resized (shorter side to ``image_size``, bicubic), center-cropped to ``image_size``²,
scaled to [0, 1] and normalised with CLIP's mean/std. Texts: tokenized, cut to the text model's
``max_position_embeddings`` (keeping the end token last). The text embedding is the final-layer
state at the end token (the first ``eos_token_id``; the highest id when ``eos_token_id`` is 2, as
old configs do), the image embedding the post-layernormed class token; both projected and
L2-normalised.

CLIP score = ``weight · max(cos(image, text), 0)`` per pair, ``weight`` 100 by default (the common
definition; 2.5 gives the CLIPScore paper's scale).

On the devices (UniGRPO's CLIP reward, batch-sharded arrays in, batch-sharded scores out):
:meth:`CLIP.image_embeds_device` (uint8 or float [B, H, W, 3] in [0, 255] → [B, projection_dim];
the resize is ``jax.image.resize`` bicubic with antialiasing, within ~1e-2 of PIL's bicubic per
pixel) and :meth:`CLIP.score_device`. Nothing leaves the devices but what the caller fetches.
"""
from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ImageTextScorer(Protocol):
  """A per-pair image–text score: ``score(images uint8 [B, H, W, 3], texts [B]) -> float [B]``."""
  name: str

  def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray: ...


def preprocess(images: Any, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] (or a list of such arrays / PIL images) → float32 [B, size, size, 3]:
  bicubic resize of the shorter side to ``size``, center crop, CLIP mean/std normalisation."""
  from PIL import Image
  out = []
  for im in images:
    im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    out.append((np.asarray(im, np.float32) / 255.0 - MEAN) / STD)
  if not out:
    raise ValueError("preprocess: no images")
  return np.stack(out)


def preprocess_device(images: jax.Array, size: int) -> jax.Array:
  """Traceable :func:`preprocess`: uint8 / float [B, H, W, 3] in [0, 255] → float32 [B, size,
  size, 3] (bicubic resize of the shorter side with antialiasing, center crop, mean/std)."""
  b, h, w, c = images.shape
  if c != 3:
    raise ValueError(f"CLIP: images must be [B, H, W, 3], got {images.shape}")
  s = size / min(w, h)
  nw, nh = max(size, round(w * s)), max(size, round(h * s))
  x = images.astype(jnp.float32) / 255.0
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True)
  left, top = (nw - size) // 2, (nh - size) // 2
  x = jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)
  return (x - MEAN) / STD


def _act(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=name != "gelu")
  raise ValueError(f"CLIP: unsupported hidden_act {name!r}")


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["weight"] + p["bias"]


def _lin(x, p):
  y = x @ p["weight"].T
  return y + p["bias"] if "bias" in p else y


def _encoder(x, layers, heads: int, eps: float, act, causal: bool):
  """x float [B, L, D] through the pre-LN transformer layers."""
  b, length, d = x.shape
  hd = d // heads
  mask = jnp.tril(jnp.ones((length, length), bool)) if causal else None
  for lp in layers:
    h = _ln(x, lp["layer_norm1"], eps)
    a = lp["self_attn"]
    q, k, v = (_lin(h, a[n]).reshape(b, length, heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    if mask is not None:
      w = jnp.where(mask, w, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w, -1), v).reshape(b, length, d)
    x = x + _lin(o, a["out_proj"])
    h = _ln(x, lp["layer_norm2"], eps)
    x = x + _lin(act(_lin(h, lp["mlp"]["fc1"])), lp["mlp"]["fc2"])
  return x


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, arr in flat.items():
    node = out
    parts = name.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(arr, jnp.float32)
  return out


class CLIP:
  """A CLIP model; ``image_embeds`` / ``text_embeds`` give L2-normalised float32 [B, projection_dim]."""

  name = "clip_score"

  def __init__(self, params: dict[str, Any], config: dict[str, Any], tokenizer: Any = None, weight: float = 100.0):
    self.config, self.tokenizer, self.weight = config, tokenizer, float(weight)
    tc, vc = config["text_config"], config["vision_config"]
    self.image_size = int(vc.get("image_size", 224))
    self.max_len = int(tc.get("max_position_embeddings", 77))
    self.eos_id = int(tc.get("eos_token_id", 2))
    try:
      layers = lambda m, n: [m["encoder"]["layers"][str(i)] for i in range(n)]  # noqa: E731
      self._text = dict(emb=params["text_model"]["embeddings"], final=params["text_model"]["final_layer_norm"],
                        layers=layers(params["text_model"], int(tc["num_hidden_layers"])),
                        proj=params["text_projection"]["weight"])
      vm = params["vision_model"]
      self._vision = dict(emb=vm["embeddings"], pre=vm["pre_layrnorm"], post=vm["post_layernorm"],
                          layers=layers(vm, int(vc["num_hidden_layers"])), proj=params["visual_projection"]["weight"])
    except KeyError as e:
      raise ValueError(f"CLIP: parameter {e} missing (Hugging Face CLIP names expected)") from None
    t_act, v_act = _act(tc.get("hidden_act", "quick_gelu")), _act(vc.get("hidden_act", "quick_gelu"))
    t_heads, v_heads = int(tc["num_attention_heads"]), int(vc["num_attention_heads"])
    t_eps, v_eps = float(tc.get("layer_norm_eps", 1e-5)), float(vc.get("layer_norm_eps", 1e-5))
    patch = int(vc["patch_size"])

    def text_fn(p, ids, pool):
      x = p["emb"]["token_embedding"]["weight"][ids] + p["emb"]["position_embedding"]["weight"][None, :ids.shape[1]]
      x = _ln(_encoder(x, p["layers"], t_heads, t_eps, t_act, causal=True), p["final"], t_eps)
      pooled = x[jnp.arange(ids.shape[0]), pool]
      e = pooled @ p["proj"].T
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def image_fn(p, pix):
      b, h, w, _ = pix.shape
      kern = p["emb"]["patch_embedding"]["weight"]                                   # [D, 3, p, p]
      x = jax.lax.conv_general_dilated(pix, jnp.transpose(kern, (2, 3, 1, 0)), (patch, patch), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = x.reshape(b, -1, x.shape[-1])
      cls = jnp.broadcast_to(p["emb"]["class_embedding"][None, None], (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], 1) + p["emb"]["position_embedding"]["weight"][None]
      x = _encoder(_ln(x, p["pre"], v_eps), p["layers"], v_heads, v_eps, v_act, causal=False)
      e = _ln(x[:, 0], p["post"], v_eps) @ p["proj"].T
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    self._text_fn, self._image_fn = jax.jit(text_fn), jax.jit(image_fn)
    size = self.image_size

    def device_image_fn(p, images):
      return image_fn(p, preprocess_device(images, size))

    def device_score_fn(p, images, text_emb, weight):
      cos = jnp.sum(image_fn(p, preprocess_device(images, size)) * text_emb, axis=-1)
      return weight * jnp.maximum(cos, 0.0)

    self.image_embeds_device_fn = device_image_fn
    """Traceable ``(vision_params, images [B, H, W, 3]) -> [B, projection_dim]`` (for use inside
    other jitted programs, with :attr:`vision_params`)."""
    self._device_image_fn, self._device_score_fn = jax.jit(device_image_fn), jax.jit(device_score_fn)

  @property
  def vision_params(self) -> dict[str, Any]:
    """The vision tower's parameters (the first argument of :attr:`image_embeds_device_fn`)."""
    return self._vision

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, weight: float = 100.0) -> "CLIP":
    """Loads ``config.json``, ``model.safetensors`` and ``tokenizer.json`` (if present) of ``path``."""
    path = os.fspath(path)
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (cfg_file, weights):
      if not os.path.exists(f):
        raise FileNotFoundError(f"CLIP: {f} does not exist (a local Hugging Face CLIP directory is expected)")
    with open(cfg_file, encoding="utf-8") as f:
      config = json.load(f)
    for k in ("text_config", "vision_config"):
      if k not in config:
        raise ValueError(f"CLIP: {cfg_file} has no {k!r}")
    from safetensors.numpy import load_file
    tok = None
    tok_file = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok_file):
      from tokenizers import Tokenizer
      tok = Tokenizer.from_file(tok_file)
    return cls(_nest(load_file(weights)), config, tok, weight)

  # ------------------------------------------------------------------ embeddings
  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text (start/end tokens from the tokenizer's post-processor), cut to the context."""
    if self.tokenizer is None:
      raise ValueError("CLIP: no tokenizer.json in the model directory; pass token ids to text_embeds_from_ids")
    out = []
    for t in texts:
      ids = list(self.tokenizer.encode(t).ids)
      if len(ids) > self.max_len:
        ids = ids[:self.max_len - 1] + [ids[-1]]
      out.append(ids)
    return out

  def text_embeds_from_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 [B, projection_dim] from token-id lists (right-padded; the causal mask keeps padding
    after the end token out of the pooled state)."""
    if not ids or any(len(x) == 0 for x in ids):
      raise ValueError("CLIP: empty token ids")
    n = max(len(x) for x in ids)
    if n > self.max_len:
      raise ValueError(f"CLIP: {n} tokens exceed the text context {self.max_len}")
    arr = np.zeros((len(ids), n), np.int32)
    pool = np.zeros(len(ids), np.int32)
    for i, x in enumerate(ids):
      arr[i, :len(x)] = x
      if self.eos_id == 2:
        pool[i] = int(np.argmax(np.asarray(x)))
      else:
        hits = [j for j, t in enumerate(x) if t == self.eos_id]
        pool[i] = hits[0] if hits else len(x) - 1
    return np.asarray(self._text_fn(self._text, jnp.asarray(arr), jnp.asarray(pool)))

  def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
    return self.text_embeds_from_ids(self.tokenize(texts))

  def image_embeds(self, images: Any) -> np.ndarray:
    """float32 [B, projection_dim] from uint8 images [B, H, W, 3] (any size; preprocessed here)."""
    return np.asarray(self._image_fn(self._vision, jnp.asarray(preprocess(images, self.image_size))))

  def cosine(self, images: Any, texts: Sequence[str]) -> np.ndarray:
    """float32 [B] cosine of each image with its text."""
    if len(images) != len(texts):
      raise ValueError(f"CLIP: {len(images)} images for {len(texts)} texts")
    return np.sum(self.image_embeds(images) * self.text_embeds(texts), axis=-1)

  def score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
    """float32 [B] CLIP score ``weight · max(cos, 0)``."""
    return self.weight * np.maximum(self.cosine(images, texts), 0.0)

  # ------------------------------------------------------------------ on the devices
  def image_embeds_device(self, images: jax.Array) -> jax.Array:
    """float32 [B, projection_dim] of images uint8 / float [B, H, W, 3] in [0, 255], computed
    where ``images`` lives (a batch-sharded global array stays sharded)."""
    return self._device_image_fn(self._vision, images)

  def score_device(self, images: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """float32 [B] ``weight · max(cos, 0)`` of images [B, H, W, 3] (in [0, 255]) against
    L2-normalised text embeddings [B, projection_dim] (:meth:`text_embeds`), on the devices."""
    if images.shape[0] != text_embeds.shape[0]:
      raise ValueError(f"CLIP: {images.shape[0]} images for {text_embeds.shape[0]} text embeddings")
    return self._device_score_fn(self._vision, images, text_embeds, jnp.float32(self.weight))

"""The demo's two tokenizers, built locally: a tiny byte-level BPE and a tiny MAGVIT-v2 trained on digits.

MAGVIT training objective (per batch of images x in [-1, 1], NHWC)::

  loss = mean((x̂ − x)²) + l1_weight · mean(|x̂ − x|) + quantizer_loss + entropy_loss

(the two LFQ terms as weighted by ``MagvitConfig``), optimised with Adam under a linear warm-up and
cosine decay; no GAN or perceptual loss (8×8-native digits do not need them).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmada_jax.api.image_tokenizer import ImageTokenizer
from mmada_jax.image_tokenizer import MagvitConfig, MagvitModel, VQGANConfig
from mmada_jax.image_tokenizer.modules import init_params
from mmada_jax.prompting import TextTokenizer, train_tiny_tokenizer


def demo_magvit_config(codebook_bits: int = 8, resolution: int = 16) -> MagvitConfig:
  """A ~0.6M-parameter MAGVIT-v2: ch 32, levels ×(1, 1, 2) with (0, 1, 1) ResnetBlocks, no level
  attention (the mid blocks keep theirs), f = 4, so a 16×16 image gives a 4×4 grid = 16 codes in
  [0, 2**codebook_bits)."""
  vq = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=(0, 1, 1), attn_resolutions=(),
                   resolution=resolution, z_channels=codebook_bits)
  return MagvitConfig(encoder=vq, decoder=vq, codebook_dim=codebook_bits)


@dataclasses.dataclass(frozen=True)
class MagvitTrainConfig:
  """Optimisation settings of :func:`train_magvit` (lr in Adam units, steps = optimizer steps)."""
  steps: int = 400
  batch_size: int = 64
  lr: float = 3e-3
  warmup_steps: int = 20
  l1_weight: float = 0.0
  seed: int = 0


def _loss_fn(model: MagvitModel, l1_weight: float):
  def loss(params, x):
    out = model.apply({"params": params}, x, train=True)
    err = out["reconstruction"] - x
    mse = jnp.mean(err ** 2)
    total = mse + out["quantizer_loss"] + out["entropy_loss"]
    if l1_weight:
      total = total + l1_weight * jnp.mean(jnp.abs(err))
    return total, {"loss": total, "mse": mse, "quantizer_loss": out["quantizer_loss"],
                   "entropy_loss": out["entropy_loss"]}
  return loss


def make_train_step(config: MagvitConfig, tx: optax.GradientTransformation,
                    l1_weight: float = 0.0) -> Callable:
  """Jitted ``step(params, opt_state, x float32 [B, R, R, 3]) -> (params, opt_state, metrics)``
  (metrics: scalar ``loss``, ``mse``, ``quantizer_loss``, ``entropy_loss``)."""
  model = MagvitModel(config, precision=jax.lax.Precision.DEFAULT)
  grad_fn = jax.value_and_grad(_loss_fn(model, l1_weight), has_aux=True)

  @jax.jit
  def step(params, opt_state, x):
    (_, metrics), grads = grad_fn(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def make_optimizer(train: MagvitTrainConfig) -> optax.GradientTransformation:
  """Adam with a linear warm-up to ``train.lr`` and a cosine decay to 5% of it at ``train.steps``."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, train.lr, max(1, train.warmup_steps),
                                                max(train.steps, train.warmup_steps + 1), end_value=train.lr * 0.05)
  return optax.adam(schedule)


@functools.lru_cache(maxsize=8)
def _cached_step(config: MagvitConfig, train: MagvitTrainConfig) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, jitted step) shared by runs that differ only in the seed (one compilation)."""
  tx = make_optimizer(train)
  return tx, make_train_step(config, tx, train.l1_weight)


def train_magvit(images: np.ndarray, config: MagvitConfig, train: MagvitTrainConfig = MagvitTrainConfig(),
                 log: Callable[[str], None] | None = None, log_every: int = 100) -> tuple[ImageTokenizer, dict[str, Any]]:
  """Trains ``config`` from scratch on images float32 [n, R, R, 3] in [-1, 1].

  Batches are drawn with replacement by ``np.random.default_rng(train.seed)``; params start from
  ``init_params(config, PRNGKey(train.seed))``. Returns the tokenizer and stats: ``losses`` (per-step
  total loss, list of float), ``first_loss`` / ``final_loss`` (means of the first / last 10 steps),
  ``final_mse``, ``seconds`` (wall, including compilation), ``num_params``.
  """
  t0 = time.perf_counter()
  x_all = np.asarray(images, np.float32)
  tx, step = _cached_step(config, dataclasses.replace(train, seed=0))
  params = init_params(config, jax.random.PRNGKey(train.seed))
  opt_state = tx.init(params)
  rng = np.random.default_rng(train.seed)
  losses, mses = [], []
  for i in range(train.steps):
    batch = x_all[rng.integers(0, len(x_all), train.batch_size)]
    params, opt_state, m = step(params, opt_state, batch)
    losses.append(m["loss"])
    mses.append(m["mse"])
    if log is not None and (i % log_every == 0 or i == train.steps - 1):
      log(f"magvit step {i}: loss {float(m['loss']):.4f} mse {float(m['mse']):.4f} "
          f"({time.perf_counter() - t0:.1f}s)")
  losses = [float(v) for v in jax.device_get(losses)]
  mses = [float(v) for v in jax.device_get(mses)]
  tok = ImageTokenizer(config, params)
  stats = {"losses": losses, "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:])),
           "final_mse": float(np.mean(mses[-10:])), "seconds": time.perf_counter() - t0,
           "num_params": tok.num_params}
  return tok, stats


def encode_images(tokenizer: ImageTokenizer, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """images uint8 or float [n, R, R, 3] -> codes int32 [n, h·w]; the last batch is padded so there is
  one compiled shape."""
  images = np.asarray(images)
  out = []
  for lo in range(0, len(images), batch_size):
    x = images[lo:lo + batch_size]
    n = len(x)
    if n < batch_size and len(images) > batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(tokenizer.encode(x))[:n])
  return np.concatenate(out).astype(np.int32)


def decode_codes(tokenizer: ImageTokenizer, codes: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """codes int [n, h·w] (square grid) -> images float32 [n, R, R, 3] (unclamped)."""
  codes = np.asarray(codes)
  out = []
  for lo in range(0, len(codes), batch_size):
    c = codes[lo:lo + batch_size]
    n = len(c)
    if n < batch_size and len(codes) > batch_size:
      c = np.concatenate([c, np.zeros((batch_size - n,) + c.shape[1:], c.dtype)])
    out.append(np.asarray(tokenizer.decode(c))[:n])
  return np.concatenate(out)


def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
  """``used`` (distinct codes), ``fraction`` (used / codebook_size) and ``perplexity`` (exp of the
  entropy of the code histogram, in codes) of codes int [...]."""
  counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size).astype(np.float64)
  p = counts / counts.sum()
  nz = p[p > 0]
  return {"used": int((counts > 0).sum()), "fraction": float((counts > 0).sum() / codebook_size),
          "perplexity": float(math.exp(-(nz * np.log(nz)).sum()))}


def build_text_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                         extra_tokens: Sequence[str] = ()) -> TextTokenizer:
  """A byte-level BPE over ``texts`` holding every MMaDA special token (ids 0…16) plus
  ``extra_tokens``; image code c becomes token ``c + len(tokenizer)``."""
  from mmada_jax.prompting.special_tokens import TOKEN_STRINGS
  specials = list(TOKEN_STRINGS.values()) + [t for t in extra_tokens if t not in TOKEN_STRINGS.values()]
  return train_tiny_tokenizer(texts, vocab_size=vocab_size, special_tokens=specials)

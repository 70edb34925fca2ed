"""MaskGIT text-to-image decoding (MMaDA ``t2i_generate``), one compiled ``lax.fori_loop``.

Sequence layout (``L = S + N + 3``): ``[text prefix (S+1) | soi | N image slots | eoi]``; the image
slots are ``input_ids[:, L-N-1 : L-1]`` and hold ``code + image_token_offset`` or MASK.

Step k = 0..T-1 (r = (k+1)/T):
  1. logits over the codebook columns only, at the image slots; with CFG the conditional and
     unconditional rows run in one batch and ``logits = (1+w) cond - w uncond``;
  2. ``p = softmax(logits)`` (float32, codebook only); sample a code per slot (known slots keep theirs);
  3. ``conf = log(max(p[code], 1e-20)) + tau_k * g`` (g Gumbel; known slots use p = float32 max);
  4. ``mask_len = max(1, min(#unknown - 1, floor(N * gamma(r))))``; every slot whose score is
     strictly below the ``mask_len``-th smallest score (0-based sorted index ``mask_len``) is
     re-masked, the others get their sampled code.

Original quirks kept by default, for parity:
  * ``compound_temperature=True``: ``tau`` is updated in place, ``tau_k = tau0 * prod_{j<=k}(1 - r_j)``
    (MaskGIT uses ``tau0 * (1 - r_k)``: pass False).
  * ``floor(N * gamma(r))`` is evaluated in float32 (cos(pi/2) < 0 there, so the last step still
    re-masks one token: ``input_ids`` keeps one MASK, the returned codes are complete).
  * The unconditional row is ``[uncond_ids[:, :R1] ; input_ids[:, R1:]]``. The original uses
    ``R1 = resolution + 1`` (512 + 1), correct only for S = 512; here ``uncond_prefix_len``
    defaults to S + 1 (the text prefix), and the parity path passes the original's value.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model import MMaDAConfig, transformer
from mmada_jax.prompting.special_tokens import LLADA_TOKENIZER_LEN
from mmada_jax.sampling import schedules
from mmada_jax.sampling.arguments import prng_key, renamed_kwargs

IMAGE_TOKEN_OFFSET = LLADA_TOKENIZER_LEN    # len(LLaDA tokenizer): image token = code + offset
_F32_MAX = float(np.finfo(np.float32).max)


class T2ISample(NamedTuple):
  """codes int32 [B, N] (last step's samples, complete); input_ids int32 [B, L] (final model
  input: image slots = code + offset, or MASK where the last step re-masked); trajectory int32
  [T, B or 2B, L] (model input of every forward) or None."""
  codes: jax.Array
  input_ids: jax.Array
  trajectory: jax.Array | None


def gumbel_from_uniform(u: jax.Array) -> jax.Array:
  """The original's ``-log(-log(u))`` with both logs clamped at 1e-20 (finite for u in [0, 1])."""
  inner = -jnp.log(jnp.maximum(u, 1e-20))
  return -jnp.log(jnp.maximum(inner, 1e-20))


@functools.partial(jax.jit, static_argnames=(
    "cfg", "num_vq_tokens", "codebook_size", "image_token_offset", "prefix_len", "use_cfg",
    "mask_id", "record"))
def _t2i_core(params, ids, attn, uncond_ids, uncond_attn, guidance, temps, mask_lens, key,
              multinomial_tape, gumbel_tape, *, cfg: MMaDAConfig, num_vq_tokens: int,
              codebook_size: int, image_token_offset: int, prefix_len: int, use_cfg: bool,
              mask_id: int, record: bool):
  b, total = ids.shape
  n, off = num_vq_tokens, image_token_offset
  lo, hi = total - n - 1, total - 1
  steps = temps.shape[0]
  cur = ids[:, lo:hi]
  cur = jnp.where(cur == mask_id, mask_id, cur - off)
  rows = 2 * b if use_cfg else b
  traj = jnp.zeros((steps if record else 0, rows, total), jnp.int32)
  if use_cfg:
    both_attn = None if attn is None else jnp.concatenate([attn, uncond_attn], axis=0)
    prefix = uncond_ids[:, :prefix_len]

  def body(k, carry):
    ids, cur, sampled, traj = carry
    if use_cfg:
      un = jnp.concatenate([prefix, ids[:, prefix_len:]], axis=1)
      inp = jnp.concatenate([ids, un], axis=0)
      hidden = transformer.forward(params, cfg, inp, attention_mask=both_attn, return_hidden=True)
      lg = transformer.project_logits(params, cfg, hidden[:, lo:hi], off, off + codebook_size)
      cond, unc = jnp.split(lg, 2, axis=0)
      logits = guidance[0] * cond - guidance[1] * unc
    else:
      inp = ids
      hidden = transformer.forward(params, cfg, inp, attention_mask=attn, return_hidden=True)
      logits = transformer.project_logits(params, cfg, hidden[:, lo:hi], off, off + codebook_size)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if multinomial_tape is not None:
      draw = multinomial_tape[k].reshape(b, n)
      g = gumbel_tape[k]
    else:
      km, kg = jax.random.split(jax.random.fold_in(key, k))
      draw = jax.random.categorical(km, logits, axis=-1).astype(jnp.int32)
      g = gumbel_from_uniform(jax.random.uniform(kg, (b, n), jnp.float32))
    unknown = cur == mask_id
    sampled = jnp.where(unknown, draw, cur)
    sel = jnp.take_along_axis(probs, jnp.clip(sampled, 0, codebook_size - 1)[..., None], axis=-1)[..., 0]
    sel = jnp.where(unknown, sel, _F32_MAX)
    mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1).astype(jnp.int32) - 1, mask_lens[k]))
    conf = jnp.log(jnp.maximum(sel, 1e-20)) + temps[k] * g
    cut = jnp.take_along_axis(jnp.sort(conf, axis=-1), mask_len[:, None], axis=-1)
    masking = conf < cut
    cur = jnp.where(masking, mask_id, sampled)
    ids = ids.at[:, lo:hi].set(jnp.where(masking, mask_id, sampled + off))
    if record:
      traj = jax.lax.dynamic_update_index_in_dim(traj, inp, k, 0)
    return ids, cur, sampled, traj

  sampled0 = jnp.zeros((b, n), jnp.int32)
  ids, _, sampled, traj = jax.lax.fori_loop(0, steps, body, (ids, cur, sampled0, traj))
  return sampled, ids, traj


_T2I_TAPES_GONE = ("recorded noise is replayed only by the parity harness (mmada_jax.parity.replay); "
                   "pass seed= for fresh noise")


def generate_image_tokens(
    params: Any, cfg: MMaDAConfig, input_ids: Any, *, attention_mask: Any = None,
    uncond_input_ids: Any = None, uncond_attention_mask: Any = None, steps: int = 15,
    guidance_scale: float = 0.0, temperature: float = 1.0,
    noise_schedule: str | Callable[[np.ndarray], np.ndarray] = "cosine",
    num_vq_tokens: int | None = None, codebook_size: int | None = None,
    image_token_offset: int = IMAGE_TOKEN_OFFSET, uncond_prefix_len: int | None = None,
    compound_temperature: bool = True, seed: int | jax.Array = 0, mask_id: int | None = None,
    return_trajectory: bool = False, **deprecated: Any) -> T2ISample:
  """MaskGIT-decodes the N image slots of ``input_ids`` (int [B, L], slots MASK or known image ids).

  Args:
    attention_mask, uncond_attention_mask: int [B, L], 1 = token, 0 = ``[iPAD]`` (hard padding
      mask, the original's boolean outer-product bias); None = no mask.
    uncond_input_ids: int [B, L] ``t2i_gen_prompt('')`` rows; required when guidance_scale > 0.
    steps: T decoding steps. guidance_scale: w. temperature: tau0 of the re-masking Gumbel noise.
    noise_schedule: 'cosine', 'linear', 'pow<p>', 'sigmoid' or a float32 numpy callable gamma(r).
    num_vq_tokens: N (default ``cfg.num_vq_tokens``); codebook_size (default ``cfg.codebook_size``).
    uncond_prefix_len: R1, tokens taken from the unconditional row (default S + 1 = L - N - 2;
      the original uses resolution + 1); clipped to L.
    compound_temperature: the original's compounding temperature (default True, see module doc).
    seed: int or jax PRNG key (per step fold_in(key, k): categorical sample, uniform for the
      Gumbel noise).
    return_trajectory: also return the model input of every forward.
    deprecated: ``timesteps=`` (now ``steps``), ``key=`` (now ``seed``), with a DeprecationWarning.
  """
  if deprecated:
    new = renamed_kwargs("generate_image_tokens", deprecated, {"timesteps": "steps", "key": "seed"},
                         removed={"multinomial_tape": _T2I_TAPES_GONE, "gumbel_tape": _T2I_TAPES_GONE},
                         current={"steps": (steps, 15), "seed": (seed, 0)})
    steps, seed = new.get("steps", steps), new.get("seed", seed)
  return _generate_image_tokens(
      params, cfg, input_ids, attention_mask=attention_mask, uncond_input_ids=uncond_input_ids,
      uncond_attention_mask=uncond_attention_mask, steps=steps, guidance_scale=guidance_scale,
      temperature=temperature, noise_schedule=noise_schedule, num_vq_tokens=num_vq_tokens,
      codebook_size=codebook_size, image_token_offset=image_token_offset,
      uncond_prefix_len=uncond_prefix_len, compound_temperature=compound_temperature,
      key=prng_key(seed), mask_id=mask_id, return_trajectory=return_trajectory)


def _generate_image_tokens(
    params: Any, cfg: MMaDAConfig, input_ids: Any, *, attention_mask: Any = None,
    uncond_input_ids: Any = None, uncond_attention_mask: Any = None, steps: int = 15,
    guidance_scale: float = 0.0, temperature: float = 1.0,
    noise_schedule: str | Callable[[np.ndarray], np.ndarray] = "cosine",
    num_vq_tokens: int | None = None, codebook_size: int | None = None,
    image_token_offset: int = IMAGE_TOKEN_OFFSET, uncond_prefix_len: int | None = None,
    compound_temperature: bool = True, key: jax.Array | None = None, multinomial_tape: Any = None,
    gumbel_tape: Any = None, mask_id: int | None = None, return_trajectory: bool = False) -> T2ISample:
  """:func:`generate_image_tokens` with a PRNG ``key`` or recorded noise (the parity replay's entry).

  multinomial_tape: int [T, B*N] or [T, B, N] replayed sampled codes; gumbel_tape: float32
  [T, B, N] replayed Gumbel noise. Give both (they replace the key) or neither.
  """
  mask_id = cfg.mask_token_id if mask_id is None else int(mask_id)
  n = int(cfg.num_vq_tokens if num_vq_tokens is None else num_vq_tokens)
  cb = int(cfg.codebook_size if codebook_size is None else codebook_size)
  if np.ndim(input_ids) != 2:
    raise ValueError(f"input_ids must be int [batch, length], got shape {np.shape(input_ids)}")
  b, total = np.shape(input_ids)
  if total < n + 2:
    raise ValueError(f"input_ids length {total} cannot hold soi + {n} image slots + eoi")
  if total > cfg.max_sequence_length:
    raise ValueError(f"input length {total} exceeds the model's max_sequence_length {cfg.max_sequence_length}")
  if image_token_offset < 0 or image_token_offset + cb > cfg.vocab_size:
    raise ValueError(f"image columns [{image_token_offset}, {image_token_offset + cb}) fall outside "
                     f"the vocabulary of {cfg.vocab_size}")
  if int(steps) <= 0:
    raise ValueError(f"steps must be positive, got {steps}")
  if temperature < 0 or guidance_scale < 0:
    raise ValueError(f"temperature ({temperature}) and guidance_scale ({guidance_scale}) must be >= 0")
  use_cfg = guidance_scale > 0
  if use_cfg and uncond_input_ids is None:
    raise ValueError("guidance_scale > 0 needs uncond_input_ids (the empty-caption prompt)")
  if use_cfg and tuple(np.shape(uncond_input_ids)) != (b, total):
    raise ValueError(f"uncond_input_ids must have shape {(b, total)}, got {tuple(np.shape(uncond_input_ids))}")
  for name, m in (("attention_mask", attention_mask), ("uncond_attention_mask", uncond_attention_mask)):
    if m is not None and tuple(np.shape(m)) != (b, total):
      raise ValueError(f"{name} must have shape {(b, total)}, got {tuple(np.shape(m))}")
  if (multinomial_tape is None) != (gumbel_tape is None):
    raise ValueError("give both multinomial_tape and gumbel_tape, or neither (then a key)")
  if multinomial_tape is None and key is None:
    raise ValueError("generate_image_tokens needs a PRNG key or the multinomial/gumbel tapes")
  if multinomial_tape is not None:
    if np.size(multinomial_tape) != steps * b * n or np.shape(multinomial_tape)[0] != steps:
      raise ValueError(f"multinomial_tape must be [T, B*N] = {(steps, b * n)}, got {np.shape(multinomial_tape)}")
    if tuple(np.shape(gumbel_tape)) != (steps, b, n):
      raise ValueError(f"gumbel_tape must be [T, B, N] = {(steps, b, n)}, got {np.shape(gumbel_tape)}")
    multinomial_tape = jnp.asarray(multinomial_tape).astype(jnp.int32).reshape(steps, b * n)
    gumbel_tape = jnp.asarray(gumbel_tape, jnp.float32)
  prefix = total - n - 2 if uncond_prefix_len is None else int(uncond_prefix_len)
  if prefix < 0:
    raise ValueError(f"uncond_prefix_len must be >= 0, got {prefix}")
  prefix = min(prefix, total)

  attn = None if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
  uncond_ids = uncond_attn = None
  if use_cfg:
    uncond_ids = jnp.asarray(uncond_input_ids).astype(jnp.int32)
    if attn is not None or uncond_attention_mask is not None:
      ones = jnp.ones((b, total), jnp.int32)
      attn = ones if attn is None else attn
      uncond_attn = ones if uncond_attention_mask is None else jnp.asarray(uncond_attention_mask).astype(jnp.int32)
  temps = jnp.asarray(schedules.temperature_table(temperature, steps, compound_temperature))
  mask_lens = jnp.asarray(schedules.mask_len_table(noise_schedule, steps, n))
  # (1 + w, w) formed in float64 as the original's Python scalars, then float32.
  weights = jnp.asarray([1.0 + float(guidance_scale), float(guidance_scale)], jnp.float32)
  codes, ids, traj = _t2i_core(
      params, jnp.asarray(input_ids).astype(jnp.int32), attn, uncond_ids, uncond_attn,
      weights, temps, mask_lens, None if multinomial_tape is not None else key, multinomial_tape,
      gumbel_tape, cfg=cfg, num_vq_tokens=n, codebook_size=cb,
      image_token_offset=int(image_token_offset), prefix_len=prefix, use_cfg=use_cfg, mask_id=mask_id,
      record=return_trajectory)
  return T2ISample(codes, ids, traj if return_trajectory else None)

"""Vectorised (numpy) sequence builders for MMaDA's layouts (``UniversalPrompting`` in the original).

Notation: S = text budget (``max_seq_length``), N = image tokens, L = S + N + 3 for every
training row. Every builder takes ragged text ids (a sequence of int sequences, or a 2-D array
whose rows are all full), prepends BOS to a row that does not start with it (an empty row
becomes ``[BOS]``), and returns a :class:`PromptBatch` of int32 arrays:

* ``input_ids`` [B, L]
* ``attention_mask`` [B, L]: 1 = real token. Only t2i (and the generation prompts) have zeros;
  lm/lm_chat/mmu rows are all ones, as in the original (which attends over EOS padding).
* ``prompt_mask`` [B, L]: 1 = prompt, never noised (layout-specific, see each builder).
* ``labels`` [B, L]: target ids, ``IGNORE_ID`` (-100) where ignored.

Too-long input is truncated exactly as the original does (per builder below); ``strict=True``
raises a ValueError naming the layout, the offending rows, their lengths and the budget instead.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax.numpy as jnp
import numpy as np

from mmada_jax.prompting.special_tokens import IGNORE_ID, SpecialTokens

TextIds = Union[Sequence[Sequence[int]], np.ndarray]
"""Ragged token ids: B rows of ints (a list of lists, or a [B, T] array)."""

_DEFAULT = SpecialTokens()


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Arrays of one layout, all [B, L] int32 (see the module docstring)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  prompt_mask: np.ndarray
  labels: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


# ragged helpers ---------------------------------------------------------------------------

def _pad_ragged(rows: TextIds, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged ids -> ([B, W] int64 right-padded with ``fill``, lengths [B] int64), W >= 1."""
  if isinstance(rows, np.ndarray) and rows.ndim == 2:
    arr = rows.astype(np.int64)
    return (arr if arr.shape[1] else np.full((arr.shape[0], 1), fill, np.int64)), np.full(arr.shape[0], arr.shape[1])
  rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
  lens = np.array([len(r) for r in rows], dtype=np.int64)
  out = np.full((len(rows), max(1, int(lens.max(initial=0)))), fill, np.int64)
  if len(rows):
    out[np.arange(out.shape[1])[None, :] < lens[:, None]] = np.concatenate(rows + [np.zeros(0, np.int64)])
  return out, lens


def _col(token: int, b: int) -> tuple[np.ndarray, np.ndarray]:
  """One token per row as a ragged part."""
  return np.full((b, 1), token, np.int64), np.ones(b, np.int64)


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]], fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise concatenation of ragged parts [(arr [B, W_i], lens [B])] -> (arr, lens)."""
  b = parts[0][0].shape[0]
  lens = np.zeros(b, np.int64)
  for _, n in parts:
    lens = lens + n
  out = np.full((b, max(1, int(lens.max(initial=0)))), fill, np.int64)
  off = np.zeros(b, np.int64)
  for arr, n in parts:
    rows, cols = np.nonzero(np.arange(arr.shape[1])[None, :] < n[:, None])
    out[rows, off[rows] + cols] = arr[rows, cols]
    off = off + n
  return out, lens


def _with_bos(text_ids: TextIds, bos: int, drop: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Prepends BOS where a row is empty or does not start with BOS; ``drop`` rows become [BOS]."""
  arr, lens = _pad_ragged(text_ids)
  if drop is not None:
    lens = np.where(drop, 0, lens)
  need = (lens == 0) | (arr[:, 0] != bos)
  return _concat([(np.full((arr.shape[0], 1), bos, np.int64), need.astype(np.int64)), (arr, lens)])


def _fit(arr: np.ndarray, lens: np.ndarray, width: int, pad: int, left: bool, end: int | None,
         strict: bool, layout: str) -> np.ndarray:
  """Pads rows to ``width`` (left or right with ``pad``) or cuts them to ``width`` with the last
  kept position replaced by ``end`` (None: plain cut). Returns [B, width] int64."""
  trunc = lens > width
  if strict and trunc.any():
    rows = np.nonzero(trunc)[0]
    raise ValueError(f"{layout}: rows {rows.tolist()} have {lens[rows].tolist()} tokens, more than the "
                     f"budget of {width} (strict=True; the original would truncate)")
  pos = np.arange(width)[None, :]
  start = np.where(trunc, 0, width - lens if left else 0)[:, None]
  src = pos - start
  valid = (src >= 0) & (src < lens[:, None])
  out = np.where(valid, np.take_along_axis(arr, np.clip(src, 0, arr.shape[1] - 1), axis=1), pad)
  if end is not None:
    out[trunc, width - 1] = end
  return out


def _last_pos(arr: np.ndarray, token: int) -> np.ndarray:
  """Index of the last ``token`` in each row of [B, W], -1 when absent."""
  hit = arr == token
  last = arr.shape[1] - 1 - np.argmax(hit[:, ::-1], axis=1)
  return np.where(hit.any(axis=1), last, -1)


def _batch(ids, attention_mask, prompt_mask, labels) -> PromptBatch:
  i32 = lambda x: np.ascontiguousarray(x, dtype=np.int32)  # noqa: E731
  return PromptBatch(i32(ids), i32(attention_mask), i32(prompt_mask), i32(labels))


def _image_array(image_ids, b: int | None = None) -> np.ndarray:
  arr = np.asarray(image_ids, dtype=np.int64)
  if arr.ndim != 2 or (b is not None and arr.shape[0] != b):
    raise ValueError(f"image ids must be [B, N]{'' if b is None else f' with B={b}'}, got shape {arr.shape}")
  return arr


# conditioning dropout -----------------------------------------------------------------------

def draw_cond_dropout(rng: np.random.Generator, batch_size: int, prob: float = 0.1) -> np.ndarray:
  """CFG conditioning dropout: bool [B], True = replace the caption by the empty one."""
  return rng.random(batch_size) < prob


# t2i ----------------------------------------------------------------------------------------

def _t2i(text_ids, image_ids, image_labels, max_text_len, sp, drop, strict, layout, generation):
  img = _image_array(image_ids)
  b, n = img.shape
  text, tlen = _with_bos(text_ids, sp.bos, drop)
  if text.shape[0] != b:
    raise ValueError(f"{layout}: {text.shape[0]} captions for {b} images")
  core, clen = _concat([_col(sp.t2i, b), (text, tlen), _col(sp.eos, b)])
  width = max_text_len + 1
  head = _fit(core, clen, width, sp.ipad, left=True, end=sp.eos, strict=strict, layout=layout)
  ids = np.concatenate([head, np.full((b, 1), sp.soi), img, np.full((b, 1), sp.eoi)], axis=1)
  n_pad = width - np.minimum(clen, width)
  attn = np.arange(ids.shape[1])[None, :] >= n_pad[:, None]
  prompt = np.ones_like(ids)
  prompt[:, width + 1:width + 1 + n] = 0
  if generation:
    return _batch(ids, attn, prompt, np.full_like(ids, IGNORE_ID))
  lab = np.full_like(img, IGNORE_ID) if image_labels is None else np.asarray(image_labels, dtype=np.int64)
  if lab.shape != img.shape:
    raise ValueError(f"{layout}: image labels {lab.shape} do not match image ids {img.shape}")
  labels = np.concatenate([head, np.full((b, 1), sp.soi), lab, np.full((b, 1), sp.eoi)], axis=1)
  labels = np.where(labels == sp.ipad, IGNORE_ID, labels)
  return _batch(ids, attn, prompt, labels)


def t2i_prompt(text_ids: TextIds, image_ids, max_text_len: int, *, image_labels=None,
               specials: SpecialTokens = _DEFAULT, cond_dropout: np.ndarray | None = None,
               rng: np.random.Generator | None = None, cond_dropout_prob: float = 0.1,
               strict: bool = False) -> PromptBatch:
  """Training t2i rows: ``[iPAD]*k [t2i] BOS text EOS [soi] image(N) [eoi]``, L = S + N + 3.

  Args:
    text_ids: B captions (ids). image_ids: [B, N] input image ids (codes + offset, or MASK).
    max_text_len: S; the ``[t2i] BOS text EOS`` core is left-padded with ``[iPAD]`` to S + 1.
    image_labels: [B, N] labels of the image slots (true id where masked, -100 elsewhere, as
      from ``mask_image_tokens``); None = every image slot -100.
    cond_dropout: bool [B], True = caption replaced by the empty ``[t2i] BOS EOS`` (CFG). When
      None and ``rng`` is given, drawn as ``rng.random(B) < cond_dropout_prob``; else no dropout.
    strict: raise instead of truncating.
  Truncation (original): a core longer than S + 1 becomes ``core[:S] + [EOS]``.
  Returns: attention_mask 0 on ``[iPAD]``; prompt_mask 1 except on the N image slots; labels =
  text part with ``[iPAD]`` -> -100, ``<|soi|>``/``<|eoi|>`` ids, ``image_labels``.
  """
  b = _image_array(image_ids).shape[0]
  if cond_dropout is None and rng is not None:
    cond_dropout = draw_cond_dropout(rng, b, cond_dropout_prob)
  drop = None if cond_dropout is None else np.asarray(cond_dropout, dtype=bool).reshape(b)
  return _t2i(text_ids, image_ids, image_labels, max_text_len, specials, drop, strict, "t2i_prompt", False)


def t2i_gen_prompt(text_ids: TextIds, max_text_len: int, *, image_ids=None, num_image_tokens: int | None = None,
                   specials: SpecialTokens = _DEFAULT, strict: bool = False) -> PromptBatch:
  """Inference t2i rows, the t2i layout with every image slot MASK (or ``image_ids`` [B, N]).

  ``num_image_tokens`` is N when ``image_ids`` is None. Truncation as :func:`t2i_prompt`.
  Labels are all -100.
  """
  b = len(text_ids)
  if image_ids is None:
    if num_image_tokens is None:
      raise ValueError("t2i_gen_prompt: give image_ids or num_image_tokens")
    image_ids = np.full((b, num_image_tokens), specials.mask, np.int64)
  return _t2i(text_ids, image_ids, None, max_text_len, specials, None, strict, "t2i_gen_prompt", True)


def t2i_uncond_prompt(batch_size: int, max_text_len: int, *, image_ids=None, num_image_tokens: int | None = None,
                      specials: SpecialTokens = _DEFAULT) -> PromptBatch:
  """Unconditional CFG rows, ``t2i_gen_prompt('')``: ``[iPAD]*(S-2) [t2i] BOS EOS [soi] image [eoi]``."""
  return t2i_gen_prompt([[]] * batch_size, max_text_len, image_ids=image_ids,
                        num_image_tokens=num_image_tokens, specials=specials)


# mmu / r2i ----------------------------------------------------------------------------------

def _text_block(text_ids, width, sp, strict, layout):
  """BOS text EOS, right-padded with EOS to ``width`` or cut to ``text[:width-1] + [EOS]``."""
  text, tlen = _with_bos(text_ids, sp.bos)
  core, clen = _concat([(text, tlen), _col(sp.eos, text.shape[0])])
  return _fit(core, clen, width, sp.pad, left=False, end=sp.eos, strict=strict, layout=layout)


def mmu_prompt(image_ids, text_ids: TextIds, max_text_len: int, *, specials: SpecialTokens = _DEFAULT,
               strict: bool = False) -> PromptBatch:
  """Training mmu rows: ``[mmu] [soi] image(N) [eoi] BOS text EOS EOS…`` (text part exactly S).

  Truncation (original): ``BOS text EOS`` longer than S becomes ``text[:S-1] + [EOS]``.
  Returns: attention_mask all ones (full attention, EOS padding included, as trained);
  prompt_mask 1 through the last ``<|end_header_id|>`` of the text (only the N + 3 image
  positions when there is none); labels -100 on the N + 3 image positions, the ids after.
  """
  img = _image_array(image_ids)
  b, n = img.shape
  text = _text_block(text_ids, max_text_len, specials, strict, "mmu_prompt")
  if text.shape[0] != b:
    raise ValueError(f"mmu_prompt: {text.shape[0]} texts for {b} images")
  head = np.concatenate([np.full((b, 1), specials.mmu), np.full((b, 1), specials.soi), img,
                         np.full((b, 1), specials.eoi)], axis=1)
  ids = np.concatenate([head, text], axis=1)
  prompt_len = n + 3 + _last_pos(text, specials.end_header) + 1
  prompt = np.arange(ids.shape[1])[None, :] < prompt_len[:, None]
  labels = np.concatenate([np.full_like(head, IGNORE_ID), text], axis=1)
  labels = np.where(labels == specials.ipad, IGNORE_ID, labels)
  return _batch(ids, np.ones_like(ids), prompt, labels)


def r2i_prompt(image_ids, text_ids: TextIds, max_text_len: int, *, specials: SpecialTokens = _DEFAULT,
               strict: bool = False) -> PromptBatch:
  """r2i rows (defined but unused by the released scripts): ``[r2i] text(S) [soi] image [eoi]``.

  The text part is built and truncated as in :func:`mmu_prompt`. prompt_mask = task token, text
  up to the last ``<|end_header_id|>`` (the whole text when there is none), soi and eoi.
  Labels = the ids themselves (the original returns the sequence as labels); attention all ones.
  """
  img = _image_array(image_ids)
  b, n = img.shape
  s = max_text_len
  text = _text_block(text_ids, s, specials, strict, "r2i_prompt")
  ids = np.concatenate([np.full((b, 1), specials.r2i), text, np.full((b, 1), specials.soi), img,
                        np.full((b, 1), specials.eoi)], axis=1)
  last = _last_pos(text, specials.end_header)
  text_end = np.where(last >= 0, last + 2, s + 1)
  pos = np.arange(ids.shape[1])[None, :]
  prompt = (pos < text_end[:, None]) | (pos == s + 1) | (pos == s + 2 + n)
  return _batch(ids, np.ones_like(ids), prompt, ids)


# lm / lm_chat -------------------------------------------------------------------------------

def _lm(text_ids, max_seq_len, sp, strict, layout):
  text, tlen = _with_bos(text_ids, sp.bos)
  core, clen = _concat([(text, tlen), _col(sp.eos, text.shape[0])])
  return _fit(core, clen, max_seq_len, sp.pad, left=False, end=None, strict=strict, layout=layout)


def lm_prompt(text_ids: TextIds, max_seq_len: int, *, specials: SpecialTokens = _DEFAULT,
              strict: bool = False) -> PromptBatch:
  """Pre-training text rows: ``BOS text EOS`` right-padded with EOS to L = ``max_seq_len``.

  Truncation (original): longer rows are cut to their first L tokens, no EOS appended.
  Returns: attention_mask all ones (original quirk: computed after padding); prompt_mask all
  zeros (every position may be noised); labels = ids.
  """
  ids = _lm(text_ids, max_seq_len, specials, strict, "lm_prompt")
  return _batch(ids, np.ones_like(ids), np.zeros_like(ids), ids)


def lm_chat_prompt(text_ids: TextIds, max_seq_len: int, *, specials: SpecialTokens = _DEFAULT,
                   strict: bool = False) -> PromptBatch:
  """Chat/SFT text rows: ids, padding, truncation and labels as :func:`lm_prompt`.

  prompt_mask is 1 through the last ``<|end_header_id|>`` (so every earlier turn is prompt), all
  zeros when the (possibly truncated) row has none.
  """
  ids = _lm(text_ids, max_seq_len, specials, strict, "lm_chat_prompt")
  prompt = np.arange(ids.shape[1])[None, :] <= _last_pos(ids, specials.end_header)[:, None]
  return _batch(ids, np.ones_like(ids), prompt, ids)


# generation prompts -------------------------------------------------------------------------

def _left_pad(arr: np.ndarray, lens: np.ndarray, pad: int) -> PromptBatch:
  width = int(lens.max(initial=0))
  ids = _fit(arr, lens, width, pad, left=True, end=None, strict=True, layout="left_pad")
  attn = np.arange(width)[None, :] >= (width - lens)[:, None]
  return _batch(ids, attn, attn, np.full_like(ids, IGNORE_ID))


def text_gen_prompt(chat_ids: TextIds, *, specials: SpecialTokens = _DEFAULT) -> PromptBatch:
  """Text-generation prompts (e.g. ``apply_chat_template`` ids, which begin with BOS) taken as
  given, left-padded with EOS to the longest row. attention_mask = prompt_mask = 0 on padding;
  labels -100."""
  arr, lens = _pad_ragged(chat_ids)
  return _left_pad(arr, lens, specials.pad)


def mmu_gen_prompt(image_ids, chat_ids: TextIds, *, specials: SpecialTokens = _DEFAULT) -> PromptBatch:
  """Inference MMU prompts: ``[mmu] [soi] image(N) [eoi] + chat ids`` (the chat template's ids,
  which begin with BOS; nothing is added), left-padded with EOS to the longest row.
  attention_mask = prompt_mask = 0 on padding; labels -100."""
  img = _image_array(image_ids)
  b = img.shape[0]
  chat, clen = _pad_ragged(chat_ids)
  if chat.shape[0] != b:
    raise ValueError(f"mmu_gen_prompt: {chat.shape[0]} chats for {b} images")
  arr, lens = _concat([_col(specials.mmu, b), _col(specials.soi, b), (img, np.full(b, img.shape[1])),
                       _col(specials.eoi, b), (chat, clen)])
  return _left_pad(arr, lens, specials.pad)


# attention biases (jnp) ---------------------------------------------------------------------

def padding_attention_bias(attention_mask) -> jnp.ndarray:
  """Key+query padding mask, the samplers' ``m[:, :, None] & m[:, None, :]``: bool [B, 1, L, L]
  (True = attend), from attention_mask [B, L] (1 = real token)."""
  m = jnp.asarray(attention_mask).astype(bool)
  return (m[:, :, None] & m[:, None, :])[:, None]


def training_attention_bias(attention_masks, n_t2i: int, mode: str = "hard") -> jnp.ndarray:
  """Attention bias of a mixed training batch whose first ``n_t2i`` rows are t2i.

  Args:
    attention_masks: [B, L] 0/1; only the t2i rows are read (lm/mmu rows attend everywhere, as
      in the original, including their EOS padding).
    mode:
      * ``"hard"`` (recommended): bool [B, 1, L, L], True = attend; t2i rows get the key+query
        padding mask ``m m^T``, other rows all True.
      * ``"original_additive"``: float32 [B, 1, L, L] reproducing the original ``forward_process``
        (quirk): ``ones`` with the t2i rows overwritten by the 0/1 outer product, meant to be
        ADDED to the attention scores (+1 on real keys, +0 on ``[iPAD]`` keys; not a mask).
  """
  m = jnp.asarray(attention_masks)
  b, length = m.shape
  is_t2i = (jnp.arange(b) < n_t2i)[:, None, None, None]
  outer = padding_attention_bias(m)
  if mode == "hard":
    return jnp.where(is_t2i, outer, True)
  if mode == "original_additive":
    return jnp.where(is_t2i, outer.astype(jnp.float32), jnp.ones((b, 1, length, length), jnp.float32))
  raise ValueError(f"unknown attention bias mode {mode!r}; expected 'hard' or 'original_additive'")

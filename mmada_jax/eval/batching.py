"""Batch-size-invariant text sampling: prompts are batched only with prompts of the same length.

The transformer takes absolute RoPE positions ``0..L-1`` over the whole row, padding included (as
the original does), and the CFG sampler drops the padding mask. A left-padded prompt therefore
sees other positions (and, with CFG, pad tokens) depending on the longest prompt of its batch, so
its output would depend on its batch neighbours. The evaluation harness never pads: it groups the
prompts by token length and samples each group in chunks of at most ``batch_size`` rows, so every
prompt is sampled exactly as it would be alone. With ``temperature=0`` (the evaluation default)
and low-confidence remasking the sampler is deterministic, so outputs do not depend on the batch
size; with sampling noise (temperature > 0 or random remasking) a row's noise depends on its chunk.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmada_jax.prompting.special_tokens import SpecialTokens


def equal_length_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices grouped by equal length (in first-seen order), each group cut into chunks of at most
  ``batch_size``; every index appears once."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    groups.setdefault(int(n), []).append(i)
  return [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def prompt_ids(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
  """Token ids of one text-generation prompt: the chat template, or BOS + the raw text."""
  if chat:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
  sp = SpecialTokens.from_tokenizer(tokenizer)
  return [sp.bos] + [i for i in tokenizer.encode(text, add_special_tokens=False) if i != sp.bos]


def generate_unpadded(model: Any, ids: Sequence[Sequence[int]], *, batch_size: int,
                      **sampler_kwargs: Any) -> list[np.ndarray]:
  """Generated ids int32 [G] per prompt of ``ids`` (token-id lists), sampled in equal-length
  chunks of at most ``batch_size`` rows (no padding); ``sampler_kwargs`` as
  ``MMaDA.generate_from_ids``."""
  if not ids:
    return []
  out: list[np.ndarray | None] = [None] * len(ids)
  for chunk in equal_length_chunks([len(x) for x in ids], batch_size):
    batch = np.asarray([list(ids[i]) for i in chunk], np.int32)
    gen = model.generate_from_ids(batch, **sampler_kwargs)
    for row, i in enumerate(chunk):
      out[i] = np.asarray(gen.tokens[row])
  return out  # type: ignore[return-value]


def decode(model: Any, tokenizer: Any, tokens: Sequence[np.ndarray]) -> list[str]:
  """Generated ids → text, cut at EOS / <|eot_id|>, MASK tokens dropped (as ``generate_text``)."""
  if not tokens:
    return []
  sp = SpecialTokens.from_tokenizer(tokenizer)
  return model._decode(tokenizer, np.stack(tokens), sp)

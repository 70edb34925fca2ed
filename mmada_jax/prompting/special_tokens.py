"""Special-token ids of MMaDA and where they come from.

The released model reuses ids that already exist in the LLaDA tokenizer (the original's
``use_reserved_token=True``): the multimodal tokens (``<|soi|>`` … ``<|r2i|>``) are hard-coded
reserved ids, BOS/EOS are the tokenizer's, the chat header tokens are looked up by name, and
the mask token is 126336. Image code ``c`` is the token ``c + len(tokenizer)`` (126349 for
LLaDA), so the image offset is always read from the tokenizer.

Lookup rule of :meth:`SpecialTokens.from_tokenizer` (per token):
1. the tokenizer's own BOS/EOS ids for ``bos``/``eos``;
2. otherwise the token's string (``TOKEN_STRINGS``) in the tokenizer's vocabulary: this is how
   a locally trained tiny tokenizer, which holds every MMaDA token, is read;
3. otherwise the reserved LLaDA id (``LLADA_RESERVED_IDS``), but only in reserved mode:
   ``use_reserved_token=True``, or ``None`` (auto) with a tokenizer that looks like LLaDA's
   (``len() == 126349`` and BOS 126080). Any other tokenizer missing a token is an error,
   because a default id would silently point at an unrelated token of a foreign vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

IGNORE_ID = -100
"""Label value excluded from every loss (PyTorch ``ignore_index``)."""

LLADA_TOKENIZER_LEN = 126349
"""``len(tokenizer)`` of the real LLaDA/MMaDA tokenizer: the image-token offset there."""

TOKEN_STRINGS: dict[str, str] = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "soi": "<|soi|>",
    "eoi": "<|eoi|>",
    "sov": "<|sov|>",
    "eov": "<|eov|>",
    "t2i": "<|t2i|>",
    "mmu": "<|mmu|>",
    "t2v": "<|t2v|>",
    "v2v": "<|v2v|>",
    "lvg": "<|lvg|>",
    "ipad": "[iPAD]",
    "r2i": "<|r2i|>",
    "mask": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot_id": "<|eot_id|>",
}
"""Field name -> token string, as written in MMaDA's code and chat template."""

LLADA_RESERVED_IDS: dict[str, int] = {
    "bos": 126080,
    "eos": 126081,
    "soi": 126084,
    "eoi": 126085,
    "sov": 126086,
    "eov": 126087,
    "t2i": 126088,
    "mmu": 126089,
    "t2v": 126090,
    "v2v": 126091,
    "lvg": 126092,
    "ipad": 126093,
    "r2i": 126094,
    "mask": 126336,
    "start_header": 126346,
    "end_header": 126347,
    "eot_id": 126348,
}
"""Field name -> id in the LLaDA vocabulary (``training/prompting_utils.py``, samplers): the one
table of these ids; :class:`SpecialTokens`' defaults and the model config's token ids
(:class:`mmada_jax.model.config.MMaDAConfig`) are read from it."""


class TokenizerLike(Protocol):
  """What :meth:`SpecialTokens.from_tokenizer` needs from a tokenizer."""

  bos_token_id: int | None
  eos_token_id: int | None

  def token_to_id(self, token: str) -> int | None: ...

  def __len__(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Special-token ids (int) and the image offset. Defaults are the real MMaDA values
  (:data:`LLADA_RESERVED_IDS`, :data:`LLADA_TOKENIZER_LEN`).

  ``pad`` is the text padding id (EOS in every layout of the original); ``ipad`` is the t2i left
  padding. ``image_offset`` is added to an image code (0 … codebook_size-1) to get its token id.
  """

  bos: int = LLADA_RESERVED_IDS["bos"]
  eos: int = LLADA_RESERVED_IDS["eos"]
  soi: int = LLADA_RESERVED_IDS["soi"]
  eoi: int = LLADA_RESERVED_IDS["eoi"]
  sov: int = LLADA_RESERVED_IDS["sov"]
  eov: int = LLADA_RESERVED_IDS["eov"]
  t2i: int = LLADA_RESERVED_IDS["t2i"]
  mmu: int = LLADA_RESERVED_IDS["mmu"]
  t2v: int = LLADA_RESERVED_IDS["t2v"]
  v2v: int = LLADA_RESERVED_IDS["v2v"]
  lvg: int = LLADA_RESERVED_IDS["lvg"]
  ipad: int = LLADA_RESERVED_IDS["ipad"]
  r2i: int = LLADA_RESERVED_IDS["r2i"]
  mask: int = LLADA_RESERVED_IDS["mask"]
  start_header: int = LLADA_RESERVED_IDS["start_header"]
  end_header: int = LLADA_RESERVED_IDS["end_header"]
  eot_id: int = LLADA_RESERVED_IDS["eot_id"]
  pad: int = LLADA_RESERVED_IDS["eos"]
  image_offset: int = LLADA_TOKENIZER_LEN

  @classmethod
  def from_tokenizer(cls, tokenizer: TokenizerLike, use_reserved_token: bool | None = None) -> "SpecialTokens":
    """Reads the ids from ``tokenizer`` (see the module docstring for the rule).

    Args:
      tokenizer: anything with ``bos_token_id``, ``eos_token_id``, ``token_to_id`` and ``len``.
      use_reserved_token: True = fall back to the LLaDA reserved ids for tokens missing from the
        vocabulary; False = never; None = only for a LLaDA-like tokenizer.
    Raises:
      ValueError: a token is missing and no fallback applies, or an id collides with the image
        id range ``[len(tokenizer), …)``.
    """
    n = len(tokenizer)
    if use_reserved_token is None:
      use_reserved_token = n == LLADA_TOKENIZER_LEN and tokenizer.bos_token_id == LLADA_RESERVED_IDS["bos"]
    ids: dict[str, int] = {}
    missing = []
    for name, text in TOKEN_STRINGS.items():
      tid = getattr(tokenizer, f"{name}_token_id", None) if name in ("bos", "eos") else None
      if tid is None:
        tid = tokenizer.token_to_id(text)
      if tid is None and use_reserved_token:
        tid = LLADA_RESERVED_IDS[name]
      if tid is None:
        missing.append(text)
      else:
        ids[name] = int(tid)
    if missing:
      raise ValueError(
          f"tokenizer (len {n}) lacks the MMaDA special tokens {missing}; add them to the tokenizer "
          "(see train_tiny_tokenizer) or pass use_reserved_token=True for a LLaDA-id vocabulary")
    bad = {k: v for k, v in ids.items() if not 0 <= v < n}
    if bad:
      raise ValueError(f"special-token ids {bad} fall outside the text vocabulary [0, {n}) and would "
                       "collide with image tokens")
    return cls(**ids, pad=ids["eos"], image_offset=n)

  def image_token_ids(self, codes):
    """Image codes (ints, any array shape) -> token ids: ``codes + image_offset``."""
    return codes + self.image_offset

  def as_dict(self) -> dict[str, int]:
    """All fields as a plain dict."""
    return dataclasses.asdict(self)

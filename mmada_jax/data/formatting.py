"""Record -> token ids (per row, picklable) and rows -> training layouts (per batch, via the builders).

Row functions take ``(stream_index, (record_index, record))``: ``stream_index`` counts records of
this host's repeated stream (its epoch is ``stream_index // epoch_len``) and ``record_index`` is
the record's index in its source. Per-row randomness (t2i caption dropout and first-sentence
choice, the lm character window, the mmu caption instruction) comes from
``np.random.default_rng([seed, task, source, epoch, record_index])``: deterministic, independent of
the host count, and different in every epoch.

Chat / conversation records (lm_chat and mmu) are turned into text ids by the first that applies:
* ``messages``: ``[{"role", "content"}, ...]`` -> the LLaDA chat template without generation prompt;
* ``conversations``: LLaVA style ``[{"from": "human"|"gpt", "value"}, ...]`` -> the same, with the
  ``<image>`` placeholder removed;
* ``content``: an already chat-formatted string, tokenised as is (no special tokens added);
* the text field: as ``content`` for lm_chat; for mmu a caption, wrapped in the original's
  captioning prompt ``<|start_header_id|>user<|end_header_id|>\\n{instruction}<eot_id>
  <|start_header_id|>assistant<|end_header_id|>\\n{caption}`` (literal ``<eot_id>``: QUIRK).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import TOKEN_STRINGS, SpecialTokens

TASK_IDS = {"t2i": 1, "lm": 2, "mmu": 3}
DEFAULT_CAPTION_PROMPTS = (
    "Describe this image.",
    "Describe the image in detail.",
    "What is shown in this image?",
    "Write a caption for this image.",
    "Give a short description of the picture.",
    "Summarize the visual content of the image.",
    "Provide a detailed description of the given image.",
    "What do you see in this picture?",
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s")


def row_rng(seed: int, task: str, source: int, epoch: int, record_index: int) -> np.random.Generator:
  """The generator of one record in one epoch (see the module docstring)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, TASK_IDS[task], source, epoch, record_index])


def _image_ids(record: dict[str, Any], n: int, sp: SpecialTokens, where: str) -> np.ndarray:
  if "codes" not in record:
    raise ValueError(f"{where}: record has no image 'codes' (keys {sorted(record)}); t2i and mmu need "
                     "pre-tokenised images (token shards or the tfds builder)")
  codes = np.asarray(record["codes"]).astype(np.int32).reshape(-1)
  if codes.size != n:
    raise ValueError(f"{where}: {codes.size} image tokens, but data.num_image_tokens is {n} "
                     "(tokenise at the matching resolution or fix the config)")
  return codes + np.int32(sp.image_offset)


def _conversation_messages(conv: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
  out = []
  for turn in conv:
    role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
    if role is None:
      raise ValueError(f"unknown conversation role in {turn!r}")
    value = str(turn.get("value", turn.get("content", "")))
    value = value.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
    out.append({"role": role, "content": value})
  return out


@dataclasses.dataclass
class RowFormatter:
  """Record -> per-row arrays for one source of one flow (picklable for grain workers).

  ``kind``: ``t2i`` | ``lm`` | ``lm_chat`` | ``mmu``. ``epoch_len``: records per epoch of this
  host's stream. ``max_ids`` bounds the kept text ids (longer text is cut by the builders anyway).
  """

  kind: str
  tokenizer: Any
  specials: SpecialTokens
  seed: int
  source_index: int
  epoch_len: int
  max_text_len: int
  num_image_tokens: int
  text_field: str = "text"
  cond_dropout_prob: float = 0.1
  first_sentence_prob: float = 0.0
  strip_newlines: bool = False
  max_chars: int = 0
  max_tokens: int = 0
  caption_prompts: Sequence[str] = DEFAULT_CAPTION_PROMPTS
  literal_eot: bool = True
  name: str = ""

  @property
  def task(self) -> str:
    return "lm" if self.kind in ("lm", "lm_chat") else self.kind

  @property
  def seq_len(self) -> int:
    return self.max_text_len + self.num_image_tokens + 3

  def _text(self, record: dict[str, Any]) -> str:
    v = record.get(self.text_field)
    if v is None and self.text_field == "text":
      v = record.get("caption")
    return "" if v is None else str(v)

  def _chat_ids(self, record: dict[str, Any]) -> list[int] | None:
    """Chat ids from messages / conversations / content; None when the record has none."""
    if record.get("messages"):
      return list(self.tokenizer.apply_chat_template(record["messages"], add_generation_prompt=False))
    if record.get("conversations"):
      msgs = _conversation_messages(record["conversations"])
      return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=False))
    if record.get("content"):
      return self.tokenizer.encode(str(record["content"]), add_special_tokens=False)
    return None

  def _caption_prompt_ids(self, caption: str, rng: np.random.Generator) -> list[int]:
    instruction = self.caption_prompts[int(rng.integers(len(self.caption_prompts)))]
    eot = "<eot_id>" if self.literal_eot else TOKEN_STRINGS["eot_id"]
    sh, eh = TOKEN_STRINGS["start_header"], TOKEN_STRINGS["end_header"]
    return self.tokenizer.encode(f"{sh}user{eh}\n{instruction}{eot}{sh}assistant{eh}\n{caption}")

  def __call__(self, stream_index: int, item: tuple[int, dict[str, Any]]) -> dict[str, Any] | None:
    record_index, record = item
    epoch = stream_index // self.epoch_len
    rng = row_rng(self.seed, self.task, self.source_index, epoch, record_index)
    where = f"{self.name or self.kind} record {record_index}"
    if self.kind == "t2i":
      drop = bool(rng.random() < self.cond_dropout_prob)
      caption = self._text(record)
      if self.first_sentence_prob > 0 and rng.random() < self.first_sentence_prob:
        caption = _FIRST_SENTENCE.split(caption.strip(), maxsplit=1)[0]
      ids = self.tokenizer.encode(caption)[:self.max_text_len + 1]
      return {"text_ids": np.asarray(ids, np.int32), "record_index": record_index,
              "image_ids": _image_ids(record, self.num_image_tokens, self.specials, where), "drop": drop}
    if self.kind == "lm":
      text = self._text(record)
      if self.strip_newlines:
        text = text.replace("\n", "")
      if self.max_chars and len(text) > self.max_chars:
        start = int(rng.integers(0, len(text) - self.max_chars + 1))
        text = text[start:start + self.max_chars]
      ids = self.tokenizer.encode(text)
    elif self.kind == "lm_chat":
      ids = self._chat_ids(record)
      if ids is None:
        ids = self.tokenizer.encode(self._text(record), add_special_tokens=False)
    elif self.kind == "mmu":
      ids = self._chat_ids(record)
      if ids is None:
        ids = self._caption_prompt_ids(self._text(record), rng)
      return {"text_ids": np.asarray(ids[:self.max_text_len + 1], np.int32), "record_index": record_index,
              "image_ids": _image_ids(record, self.num_image_tokens, self.specials, where)}
    else:
      raise ValueError(f"unknown kind {self.kind!r}")
    if self.kind == "lm_chat" and self.max_tokens and len(ids) >= self.max_tokens:
      return None  # the original ChatDataset keeps only rows shorter than max_length
    return {"text_ids": np.asarray(ids[:self.seq_len + 1], np.int32), "record_index": record_index}


@dataclasses.dataclass
class BatchBuilder:
  """Per-row arrays -> one flow's batch (int32 [B, L] each), via :mod:`mmada_jax.prompting.builders`.

  * t2i: ``input_ids`` (image tokens visible, offset by the text vocabulary), ``attention_mask``.
  * lm / lm_chat: ``input_ids``, ``prompt_mask`` (all 0 for lm; 1 through the last end-header).
  * mmu: ``input_ids``, ``prompt_mask``.
  With ``emit_index`` also ``record_index`` int64 [B] (index in the source) and ``source_index``
  int32 [B] (position of the source in the flow's list).
  """

  kind: str
  specials: SpecialTokens
  max_text_len: int
  num_image_tokens: int
  emit_index: bool = False
  source_index: int = 0

  def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    s = self.max_text_len
    seq_len = s + self.num_image_tokens + 3
    text = [r["text_ids"] for r in rows]
    if self.kind == "t2i":
      b = builders.t2i_prompt(text, np.stack([r["image_ids"] for r in rows]), s, specials=self.specials,
                              cond_dropout=np.array([r["drop"] for r in rows], bool))
      out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    else:
      if self.kind == "lm":
        b = builders.lm_prompt(text, seq_len, specials=self.specials)
      elif self.kind == "lm_chat":
        b = builders.lm_chat_prompt(text, seq_len, specials=self.specials)
      elif self.kind == "mmu":
        b = builders.mmu_prompt(np.stack([r["image_ids"] for r in rows]), text, s, specials=self.specials)
      else:
        raise ValueError(f"unknown kind {self.kind!r}")
      out = {"input_ids": b.input_ids, "prompt_mask": b.prompt_mask}
    if self.emit_index:
      out["record_index"] = np.array([r["record_index"] for r in rows], np.int64)
      out["source_index"] = np.full(len(rows), self.source_index, np.int32)
    return out

"""Small synthetic datasets in every input format (random words and codes), for tests and demos.

All writers are deterministic given ``seed`` and return the path they wrote.
* :func:`write_text_jsonl` / :func:`write_text_parquet`: ``{"text"}`` rows (lm).
* :func:`write_chat_jsonl`: ``{"messages": [...]}`` or pre-formatted ``{"content"}`` rows (lm_chat).
* :func:`write_token_shards`: a token-shard folder as written by ``tokenize_images`` (t2i captions
  or mmu conversations) without running an image tokenizer.
* :func:`write_image_folder`: random RGB images of assorted sizes + ``metadata.jsonl``.
* :func:`tiny_tokenizer`: a byte-level BPE with every MMaDA special token.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from mmada_jax.data import records

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "po", "ga", "fu", "zi", "he", "ba", "ro")


def random_words(rng: np.random.Generator, count: int) -> str:
  """``count`` made-up words joined by spaces."""
  words = []
  for _ in range(count):
    k = int(rng.integers(1, 4))
    words.append("".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), k)))
  return " ".join(words)


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
  return random_words(rng, int(rng.integers(lo, hi + 1))).capitalize() + "."


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def text_rows(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[dict[str, Any]]:
  """``n`` rows ``{"id": i, "text": str}``; some texts span several lines."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    lines = [_sentence(rng, min_words, max_words) for _ in range(int(rng.integers(1, 3)))]
    rows.append({"id": i, "text": "\n".join(lines)})
  return rows


def write_text_jsonl(path: str, n: int, seed: int = 0, **kw) -> str:
  """Pre-training text as JSON lines (field ``text``)."""
  return _write_jsonl(path, text_rows(n, seed, **kw))


def write_text_parquet(path: str, n: int, seed: int = 0, row_group_size: int = 16, **kw) -> str:
  """Pre-training text as parquet (columns ``id``, ``text``)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = text_rows(n, seed, **kw)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
  return path


def chat_messages(rng: np.random.Generator, turns: int) -> list[dict[str, str]]:
  msgs = []
  for _ in range(turns):
    msgs.append({"role": "user", "content": _sentence(rng, 3, 12)})
    msgs.append({"role": "assistant", "content": " ".join(_sentence(rng, 4, 16) for _ in range(rng.integers(1, 3)))})
  return msgs


def format_chat(messages: list[dict[str, str]]) -> str:
  """LLaDA chat template text (BOS + turns), the pre-formatted ``content`` form."""
  out = ["<|startoftext|>"]
  for m in messages:
    out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n{m['content'].strip()}<|eot_id|>")
  return "".join(out)


def write_chat_jsonl(path: str, n: int, seed: int = 0, style: str = "messages") -> str:
  """Chat/SFT rows: ``{"messages": [...]}`` (style ``messages``) or ``{"content": str}``
  (style ``content``, already chat-formatted); 1-2 turns each."""
  if style not in ("messages", "content"):
    raise ValueError(f"style must be 'messages' or 'content', got {style!r}")
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    msgs = chat_messages(rng, int(rng.integers(1, 3)))
    rows.append({"id": i, "messages": msgs} if style == "messages" else {"id": i, "content": format_chat(msgs)})
  return _write_jsonl(path, rows)


def write_token_shards(folder: str, n: int, num_tokens: int = 16, seed: int = 0, kind: str = "caption",
                       shard_size: int = 8, codebook_size: int = 8192) -> str:
  """A token-shard folder of ``n`` records with random codes [num_tokens] in [0, codebook_size).

  ``kind``: ``caption`` (``text`` = a caption: t2i / caption-style mmu), ``messages`` (chat turns
  about the image: mmu) or ``conversations`` (LLaVA ``from``/``value`` turns with ``<image>``).
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  if kind not in ("caption", "messages", "conversations"):
    raise ValueError(f"kind must be caption, messages or conversations, got {kind!r}")
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  n_shards = max(1, math.ceil(n / shard_size))
  shards, fields = [], set()
  side = math.isqrt(num_tokens)
  for s in range(n_shards):
    name = records.shard_name(s, n_shards)
    w = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    for i in range(lo, hi):
      codes = rng.integers(0, codebook_size, num_tokens)
      meta: dict[str, Any] = {"id": i, "text": _sentence(rng, 2, 20) + " " + _sentence(rng, 2, 10)}
      if kind == "messages":
        meta["messages"] = chat_messages(rng, 1)
      elif kind == "conversations":
        meta["conversations"] = [{"from": "human", "value": "<image>\n" + _sentence(rng, 3, 8)},
                                 {"from": "gpt", "value": _sentence(rng, 3, 12)}]
      fields.update(meta)
      w.write(records.encode_record(codes, meta))
    w.close()
    shards.append({"file": name, "count": hi - lo})
  manifest = {
      "format": records.FORMAT_NAME, "version": records.FORMAT_VERSION, "count": n, "num_tokens": num_tokens,
      "grid": [side, num_tokens // side] if side * side == num_tokens else [1, num_tokens],
      "codebook_size": codebook_size, "code_dtype": "uint16", "resolution": None, "resize": None,
      "shards": shards, "text_fields": sorted(fields), "skipped": {"count": 0, "reasons": {}},
      "tokenizer": {"config": None, "config_hash": "synthetic", "params_hash": "synthetic", "path": None},
      "source": f"synthetic(seed={seed}, kind={kind})", "created": None,
  }
  records.write_json_atomic(os.path.join(folder, records.MANIFEST_NAME), manifest)
  return folder


def write_image_folder(folder: str, n: int, seed: int = 0,
                       sizes: tuple[tuple[int, int], ...] = ((40, 24), (24, 40), (32, 32)), fmt: str = "png") -> str:
  """``n`` random RGB images (cycling through ``sizes`` = (width, height)) and a
  ``metadata.jsonl`` with ``file_name``, ``text`` and ``id``."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  rows = []
  for i in range(n):
    w, h = sizes[i % len(sizes)]
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    name = f"img_{i:04d}.{fmt}"
    Image.fromarray(arr).save(os.path.join(folder, name))
    rows.append({"file_name": name, "text": _sentence(rng, 2, 12), "id": i})
  _write_jsonl(os.path.join(folder, "metadata.jsonl"), rows)
  return folder


def tiny_tokenizer(vocab_size: int = 384, seed: int = 0):
  """A ``TextTokenizer`` trained on synthetic text, holding every MMaDA special token."""
  from mmada_jax.prompting.text_tokenizer import train_tiny_tokenizer
  corpus = [r["text"] for r in text_rows(200, seed)]
  corpus += ["<image> user assistant system <eot_id> Describe this image in detail. What is shown?"]
  return train_tiny_tokenizer(corpus, vocab_size=vocab_size)

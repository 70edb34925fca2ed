"""The ``config.data`` section: where the three training flows read from and how they are batched.

Fields (``default_data_config()``):

* ``text_tokenizer`` (str): ``tokenizer.json`` or its folder; used when no tokenizer is passed.
* ``max_text_len`` (int): S, the text budget. ``num_image_tokens`` (int): N. Rows are L = S + N + 3.
* ``seed`` (int), ``shuffle`` (bool), ``num_epochs`` (int | None: None = repeat forever). Epochs
  follow the original ``CombinedLoader(mode="max_size_cycle")``: the flow with the most batches
  per epoch sets the epoch length, shorter flows cycle (reshuffled each cycle).
* ``worker_count`` (int): grain worker processes (0 = in the main process, as in tests). With k
  workers, worker i reads rows i, i+k, ... of each flow's stream and batches them itself, so the
  batches depend on k (deterministic for a fixed k; a saved state restores only with the same k). ``worker_buffer_size`` (int) batches
  per worker; ``read_threads`` (int) and ``prefetch_buffer_size`` (int) for the threaded
  per-record reads.
* ``cond_dropout_prob`` (float): t2i classifier-free-guidance caption dropout (0.1).
* ``t2i`` / ``lm`` / ``mmu``: one section per flow with
    - ``batch_size`` (int): GLOBAL rows per step over all hosts (each host gets
      ``batch_size / process_count``); 0 = the flow is off and absent from the batch.
    - ``path`` (str), ``format`` (``auto`` | ``shards`` | ``tfds`` | ``jsonl`` | ``parquet``),
      ``split`` (str, tfds only), ``kind`` (``t2i``; ``lm`` | ``lm_chat``; ``mmu``).
    - ``sources`` (list of dicts with ``path``, and optionally ``format``, ``split``, ``kind``,
      ``weight``): several datasets mixed per batch in proportion to ``weight`` (e.g. stage 2.2's
      lm 0.02 / lm_chat 0.98); when non-empty it replaces ``path``.
    - ``text_field`` (str): column holding the caption / text (``text``).
  Flow-specific:
    - t2i ``first_sentence_prob`` (float): probability of keeping only a caption's first sentence
      (stage 1.2 uses 0.5).
    - lm ``strip_newlines`` (bool) and ``max_chars`` (int, 0 = off): RefinedWeb preprocessing
      (newlines removed, a random ``max_chars`` window of longer documents), for ``kind`` lm
      sources; ``max_tokens`` (int, 0 = off): keep only lm_chat rows with fewer tokens (the
      original ``ChatDataset`` filter; a window of 1000 rows all dropped raises ValueError).
    - mmu ``caption_prompts`` (str): JSON file with a list of caption instructions for caption-only
      rows ("" = the built-in list); ``literal_eot`` (bool): write the original's literal
      ``<eot_id>`` (no pipes) in caption prompts (QUIRK, default True).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

TASKS = ("t2i", "lm", "mmu")
FORMATS = ("auto", "shards", "tfds", "jsonl", "parquet")
KINDS = {"t2i": ("t2i",), "lm": ("lm", "lm_chat"), "mmu": ("mmu",)}


def _task(kind: str, batch_size: int) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = batch_size
  t.path = ""
  t.format = "auto"
  t.split = "train"
  t.kind = kind
  t.sources = []
  t.text_field = "text"
  return t


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: stage 1.1 shapes (S = 128, N = 256, L = 387) and per-device batch sizes 7 / 2 / 6."""
  c = ml_collections.ConfigDict()
  c.text_tokenizer = ""
  c.max_text_len = 128
  c.num_image_tokens = 256
  c.seed = 10086
  c.shuffle = True
  c.num_epochs = config_dict.placeholder(int)
  c.worker_count = 0
  c.worker_buffer_size = 2
  c.read_threads = 4
  c.prefetch_buffer_size = 16
  c.cond_dropout_prob = 0.1

  c.t2i = _task("t2i", 7)
  c.t2i.first_sentence_prob = 0.0

  c.lm = _task("lm", 2)
  c.lm.strip_newlines = False
  c.lm.max_chars = 0
  c.lm.max_tokens = 0

  c.mmu = _task("mmu", 6)
  c.mmu.caption_prompts = ""
  c.mmu.literal_eot = True
  return c


def task_sources(cfg: Any, task: str) -> list[dict[str, Any]]:
  """The flow's datasets as dicts ``{path, format, split, kind, weight, key}`` (``key`` names the
  config entry for error messages). Raises ValueError on an unknown format, kind or weight."""
  sec = cfg[task]
  entries = list(sec.sources) if len(sec.sources) else [{"path": sec.path}]
  out = []
  for i, e in enumerate(entries):
    e = dict(e)
    key = f"data.{task}.sources[{i}].path" if len(sec.sources) else f"data.{task}.path"
    src = {"path": str(e.get("path", "") or ""), "format": e.get("format", sec.format),
           "split": e.get("split", sec.split), "kind": e.get("kind", sec.kind),
           "weight": float(e.get("weight", 1.0)), "key": key}
    if src["format"] not in FORMATS:
      raise ValueError(f"{key[:-5]}.format={src['format']!r}: expected one of {FORMATS}")
    if src["kind"] not in KINDS[task]:
      raise ValueError(f"{key[:-5]}.kind={src['kind']!r}: the {task} flow takes {KINDS[task]}")
    if not src["weight"] > 0:
      raise ValueError(f"{key[:-5]}.weight must be > 0, got {src['weight']}")
    out.append(src)
  return out

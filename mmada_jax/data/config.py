"""The ``config.data`` section: where the three training flows read from and how they are batched.

Its keys, types and defaults are the dataclasses below (:class:`DataConfig` with one sub-section
per flow, :class:`T2IFlowConfig` / :class:`LMFlowConfig` / :class:`MMUFlowConfig`, whose
``sources`` are :class:`SourceConfig` dicts); :func:`default_data_config` is their ConfigDict.
Epochs follow the original ``CombinedLoader(mode="max_size_cycle")``: the flow with the most
batches per epoch sets the epoch length, shorter flows cycle (reshuffled each cycle).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import ml_collections

from mmada_jax.config_schema import parse, to_config_dict

TASKS = ("t2i", "lm", "mmu")
FORMATS = ("auto", "shards", "tfds", "jsonl", "parquet")
KINDS = {"t2i": ("t2i",), "lm": ("lm", "lm_chat"), "mmu": ("mmu",)}
Format = Literal["auto", "shards", "tfds", "jsonl", "parquet"]
OnExhausted = Literal["repeat", "raise"]
ON_EXHAUSTED = ("repeat", "raise")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One dataset of a flow's ``sources`` list: ``path``, and ``format`` / ``split`` / ``kind``
  (None = the flow's own) and ``weight`` (its share of the flow's batches, relative to the others;
  each batch comes from one source). ``name``: the source in the ``data/<task>/<name>`` row
  counters of the step metrics ("" = the path's base name without extension; unique per flow).
  ``on_exhausted``: when this host's shard of the source has been read once, ``repeat`` (the next
  epoch, reshuffled) or ``raise`` (:class:`~mmada_jax.data.pipeline.SourceExhausted` naming the
  task, source and path; a last partial batch is dropped). A flow's own ``path`` repeats."""
  path: str = ""
  format: Format | None = None
  split: str | None = None
  kind: str | None = None
  weight: float = 1.0
  name: str = ""
  on_exhausted: OnExhausted = "repeat"


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Keys every flow section (``data.t2i`` / ``data.lm`` / ``data.mmu``) has.

  ``batch_size``: GLOBAL rows per step over all hosts (each host gets ``batch_size /
  process_count``); 0 = the flow is off and absent from the batch. ``path``, ``format``
  (auto | shards | tfds | jsonl | parquet), ``split`` (tfds only), ``kind`` (t2i; lm | lm_chat;
  mmu). ``sources``: several datasets mixed per batch in proportion to their ``weight`` (e.g.
  stage 2.2's lm 0.02 / lm_chat 0.98); when non-empty it replaces ``path``. ``text_field``: the
  column holding the caption / text. ``max_text_len``: this flow's text budget S_f (0 = the
  section's ``data.max_text_len``); its rows are S_f + N + 3 tokens, so flows may differ in length
  (e.g. short lm_chat rows that end where the evaluation's generation window ends).
  """
  batch_size: int = 0
  max_text_len: int = 0
  path: str = ""
  format: Format = "auto"
  split: str = "train"
  kind: str = ""
  sources: list[SourceConfig] = dataclasses.field(default_factory=list)
  text_field: str = "text"

  def formatter_options(self) -> dict[str, Any]:
    """The flow-specific keyword arguments of the row formatter (none for the base keys)."""
    return {}


@dataclasses.dataclass(frozen=True)
class T2IFlowConfig(FlowConfig):
  """``data.t2i``; ``first_sentence_prob``: probability of keeping only a caption's first
  sentence (stage 1.2 uses 0.5)."""
  batch_size: int = 7
  kind: str = "t2i"
  first_sentence_prob: float = 0.0

  def formatter_options(self) -> dict[str, Any]:
    return {"first_sentence_prob": self.first_sentence_prob}


@dataclasses.dataclass(frozen=True)
class LMFlowConfig(FlowConfig):
  """``data.lm``; ``strip_newlines`` and ``max_chars`` (0 = off): RefinedWeb preprocessing
  (newlines removed, a random ``max_chars`` window of longer documents) of ``kind`` lm sources;
  ``max_tokens`` (0 = off): keep only lm_chat rows with fewer tokens (the original
  ``ChatDataset`` filter; a window of 1000 rows all dropped raises ValueError)."""
  batch_size: int = 2
  kind: str = "lm"
  strip_newlines: bool = False
  max_chars: int = 0
  max_tokens: int = 0

  def formatter_options(self) -> dict[str, Any]:
    return {"strip_newlines": self.strip_newlines, "max_chars": self.max_chars, "max_tokens": self.max_tokens}


@dataclasses.dataclass(frozen=True)
class MMUFlowConfig(FlowConfig):
  """``data.mmu``; ``caption_prompts``: JSON file with a list of caption instructions for
  caption-only rows ("" = the built-in list); ``literal_eot``: write the original's literal
  ``<eot_id>`` (no pipes) in caption prompts (QUIRK, default True)."""
  batch_size: int = 6
  kind: str = "mmu"
  caption_prompts: str = ""
  literal_eot: bool = True

  def formatter_options(self) -> dict[str, Any]:
    return {"caption_prompts": self.caption_prompts, "literal_eot": self.literal_eot}


FLOW_SECTIONS: dict[str, type[FlowConfig]] = {"t2i": T2IFlowConfig, "lm": LMFlowConfig, "mmu": MMUFlowConfig}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The ``config.data`` section. Defaults: stage 1.1 shapes (S = 128, N = 256, L = 387) and
  per-device batch sizes 7 / 2 / 6.

  ``text_tokenizer``: ``tokenizer.json`` or its folder (used when no tokenizer is passed).
  ``max_text_len``: S, the text budget; ``num_image_tokens``: N; rows are L = S + N + 3.
  ``seed``, ``shuffle``, ``num_epochs`` (None = repeat forever). ``worker_count``: grain worker
  processes (0 = in the main process, as in tests); with k workers, worker i reads rows i, i+k,
  ... of each flow's stream and batches them itself, so the batches depend on k (deterministic
  for a fixed k; a saved state restores only with the same k). ``worker_buffer_size``: batches
  per worker; ``read_threads`` and ``prefetch_buffer_size``: the threaded per-record reads.
  ``cond_dropout_prob``: t2i classifier-free-guidance caption dropout.
  """
  text_tokenizer: str = ""
  max_text_len: int = 128
  num_image_tokens: int = 256
  seed: int = 10086
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  prefetch_buffer_size: int = 16
  cond_dropout_prob: float = 0.1
  t2i: T2IFlowConfig = dataclasses.field(default_factory=T2IFlowConfig)
  lm: LMFlowConfig = dataclasses.field(default_factory=LMFlowConfig)
  mmu: MMUFlowConfig = dataclasses.field(default_factory=MMUFlowConfig)


def default_data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of :class:`DataConfig`'s defaults with ``overrides``."""
  return to_config_dict(DataConfig, **overrides)


def flow_config(cfg: Any, task: str) -> FlowConfig:
  """The ``data.<task>`` section of ``cfg`` (``config.data`` as a ConfigDict, mapping or
  :class:`DataConfig`) parsed into its flow dataclass (ConfigError on an unknown key)."""
  if task not in FLOW_SECTIONS:
    raise ValueError(f"unknown flow {task!r}; flows are {TASKS}")
  sec = getattr(cfg, task) if isinstance(cfg, DataConfig) else cfg[task]
  return parse(FLOW_SECTIONS[task], sec, f"data.{task}")


def flow_text_len(cfg: Any, task: str) -> int:
  """S_f of the ``data.<task>`` flow: its ``max_text_len``, or ``data.max_text_len`` when that is 0.
  Rows of the flow are S_f + ``data.num_image_tokens`` + 3 tokens. Raises ValueError when < 0."""
  own = int(flow_config(cfg, task).max_text_len)
  if own < 0:
    raise ValueError(f"data.{task}.max_text_len={own} must be >= 0 (0 = data.max_text_len)")
  return own or int(cfg.max_text_len)


def _default_name(path: str) -> str:
  """``chat`` for ``/data/chat.jsonl`` or ``/data/chat/``."""
  return os.path.splitext(os.path.basename(os.path.normpath(path)))[0] if path else ""


def task_sources(cfg: Any, task: str) -> list[dict[str, Any]]:
  """The flow's datasets as dicts ``{path, format, split, kind, weight, name, on_exhausted, key}``
  (``key`` names the config entry for error messages). Raises ValueError on an unknown key, format,
  kind, ``on_exhausted``, a weight <= 0 or a repeated name."""
  flow = flow_config(cfg, task)
  entries = list(flow.sources) if flow.sources else [SourceConfig(path=flow.path)]
  out, names = [], set()
  for i, e in enumerate(entries):
    key = f"data.{task}.sources[{i}].path" if flow.sources else f"data.{task}.path"
    src = {"path": e.path or "", "format": flow.format if e.format is None else e.format,
           "split": flow.split if e.split is None else e.split, "kind": flow.kind if e.kind is None else e.kind,
           "weight": e.weight, "name": e.name or _default_name(e.path or "") or str(i),
           "on_exhausted": e.on_exhausted, "key": key}
    if src["on_exhausted"] not in ON_EXHAUSTED:
      raise ValueError(f"{key[:-5]}.on_exhausted={src['on_exhausted']!r}: expected one of {ON_EXHAUSTED}")
    if src["name"] in names:
      raise ValueError(f"{key[:-5]}: the flow already has a source named {src['name']!r}; set a unique name")
    names.add(src["name"])
    if src["format"] not in FORMATS:
      raise ValueError(f"{key[:-5]}.format={src['format']!r}: expected one of {FORMATS}")
    if src["kind"] not in KINDS[task]:
      raise ValueError(f"{key[:-5]}.kind={src['kind']!r}: the {task} flow takes {KINDS[task]}")
    if not src["weight"] > 0:
      raise ValueError(f"{key[:-5]}.weight must be > 0, got {src['weight']}")
    out.append(src)
  return out

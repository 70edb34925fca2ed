"""grain pipelines of the three training flows and the per-step mixed batch.

Per source of a flow (``MapDataset``, so every step is index based and exactly resumable)::

  source -> tag record index -> drop the remainder (equal shards) -> shard [i::count]
         -> shuffle(seed, per epoch) -> repeat (on_exhausted "repeat") -> RowFormatter (tokenise,
         per-row rng) -> to_iter_dataset (threaded reads) -> batch(B_host, batch_fn=BatchBuilder)
         -> SourceFeed (tags each batch with its source; "raise": SourceExhausted at the end)

Sources of one flow are mixed per batch by weight (``IterDataset.mix``: each batch comes from
one source, in a fixed pattern of the weights, so 2 : 1 weights give 2 of every 3 batches to the
first source); the flows are zipped
into one dict per step (``CombinedLoader(mode="max_size_cycle")`` of the original: every step
draws one t2i, one lm and one mmu batch; shorter flows cycle). With ``worker_count > 0`` the
zipped pipeline runs in grain worker processes (``mp_prefetch``).

Each step yields THIS host's share of the global batch (numpy, L = S + N + 3)::

  {"t2i": {"input_ids": int32 [B_t2i, L], "attention_mask": int32 [B_t2i, L]},
   "lm":  {"input_ids": int32 [B_lm, L],  "prompt_mask": int32 [B_lm, L]},
   "mmu": {"input_ids": int32 [B_mmu, L], "prompt_mask": int32 [B_mmu, L]}}

with ``B_task = data.<task>.batch_size / process_count``; a flow with batch size 0 is absent. A flow
with its own ``data.<task>.max_text_len`` S_f has rows of S_f + N + 3 tokens instead.
t2i image tokens are visible (codes + ``len(text tokenizer)``); masking happens on device.

Checkpointing: :class:`MixedBatchIterator` is a ``grain.DatasetIterator`` whose ``get_state()`` is
a JSON-serialisable dict, so both plain JSON and grain's orbax handler work::

  import grain, orbax.checkpoint as ocp
  it = make_mixed_iterator(config.data, tokenizer)
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  ...
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=grain.checkpoint.CheckpointRestore(it)))
  # ``it`` now continues with the batch after ``step``; one file per process
  # (process_<i>-of-<n>.json, named with jax.process_index()).

Row counters: :meth:`MixedBatchIterator.metrics` gives ``{"data/<task>/<source name>": rows}``,
the rows each source has fed its flow so far over all hosts; the counts live in the iterator
state, so they resume exactly with it. The trainer's step loop reads ``metrics()`` of its data
iterator (where it has one) after every batch and writes the values with that step's metrics.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import grain
import numpy as np

from mmada_jax.data.config import TASKS, FlowConfig, flow_config, flow_text_len, task_sources
from mmada_jax.data.formatting import DEFAULT_CAPTION_PROMPTS, TASK_IDS, BatchBuilder, RowFormatter
from mmada_jax.data.sources import open_source
from mmada_jax.prompting.special_tokens import SpecialTokens


def _tag(index: int, record: Any) -> tuple[int, Any]:
  return index, record


def _is_row(row: Any) -> bool:
  return row is not None


class SourceExhausted(RuntimeError):
  """A source with ``on_exhausted="raise"`` has no full batch left on this host."""


SOURCE_KEY = "_source"  # the source index a flow batch carries until MixedBatchIterator counts it


class SourceFeed(grain.IterDataset):
  """One source's batches of a flow, each tagged ``{SOURCE_KEY: index}``; at the end of the
  parent, :class:`SourceExhausted` (``on_exhausted="raise"``) or StopIteration. Its iterator's
  state is the parent's, unchanged."""

  def __init__(self, parent: grain.IterDataset, index: int, on_exhausted: str, what: str):
    super().__init__(parent)
    self.index, self.on_exhausted, self.what = index, on_exhausted, what

  def __iter__(self) -> "_SourceFeedIterator":
    return _SourceFeedIterator(self._parent.__iter__(), self.index, self.on_exhausted, self.what)

  def __str__(self) -> str:
    return f"SourceFeed({self.what}, on_exhausted={self.on_exhausted})"


class _SourceFeedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, index: int, on_exhausted: str, what: str):
    super().__init__(parent)
    self.index, self.on_exhausted, self.what = index, on_exhausted, what

  def __next__(self) -> dict[str, Any]:
    try:
      batch = next(self._parent)
    except StopIteration:
      if self.on_exhausted == "raise":
        raise SourceExhausted(f"{self.what} is exhausted: every full batch of its records on this host has been "
                              "used (on_exhausted='raise'; set 'repeat' to start another epoch)") from None
      raise
    return {**batch, SOURCE_KEY: self.index}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def _derive_seed(seed: int, *parts: int) -> int:
  """A 32-bit seed from the base seed and integer parts (SeedSequence mixing)."""
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *parts]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class FlowInfo:
  """One flow on this host: per-host batch size, source names, records per epoch of this
  host's shard of each source, and batches per epoch."""

  name: str
  batch_size: int
  sources: tuple[str, ...]
  shard_records: tuple[int, ...]
  steps_per_epoch: int
  source_names: tuple[str, ...] = ()


def resolve_shard_options(process_index: int | None = None, process_count: int | None = None,
                          shard_options: grain.sharding.ShardOptions | None = None) -> grain.sharding.ShardOptions:
  """Explicit ``shard_options`` > ``ShardOptions(process_index, process_count, drop_remainder=True)``
  > ``ShardByJaxProcess(drop_remainder=True)``."""
  if shard_options is not None:
    return shard_options
  if process_index is None and process_count is None:
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if process_index is None or process_count is None:
    raise ValueError("give both process_index and process_count, or neither")
  return grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)


def _caption_prompts(path: str) -> tuple[str, ...]:
  if not path:
    return DEFAULT_CAPTION_PROMPTS
  with open(path, encoding="utf-8") as f:
    prompts = json.load(f)
  if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"data.mmu.caption_prompts {path!r} must hold a non-empty JSON list of strings")
  return tuple(prompts)


def _formatter_options(flow: FlowConfig) -> dict[str, Any]:
  """The flow's own RowFormatter arguments, caption prompts read from their file."""
  opts = flow.formatter_options()
  if "caption_prompts" in opts:
    opts["caption_prompts"] = _caption_prompts(opts["caption_prompts"])
  return opts


def make_flow_dataset(data_cfg: Any, task: str, tokenizer: Any, specials: SpecialTokens,
                      shard: grain.sharding.ShardOptions, seed: int,
                      emit_index: bool = False) -> tuple[grain.IterDataset, FlowInfo]:
  """One flow's batched ``IterDataset`` for this host (see the module docstring) and its info.

  Raises FileNotFoundError for a missing/empty path (naming the config key), ValueError when the
  global batch size does not split over the hosts or a shard is empty.
  """
  sec = flow_config(data_cfg, task)
  global_bs = int(sec.batch_size)
  if global_bs % shard.shard_count:
    raise ValueError(f"data.{task}.batch_size={global_bs} is not divisible by the {shard.shard_count} processes")
  bs = global_bs // shard.shard_count
  s, n = flow_text_len(data_cfg, task), int(data_cfg.num_image_tokens)
  read = grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                           prefetch_buffer_size=int(data_cfg.prefetch_buffer_size))
  datasets, weights, names, source_names, lens = [], [], [], [], []
  for si, src in enumerate(task_sources(data_cfg, task)):
    source = open_source(src["path"], src["format"], src["split"], key=src["key"])
    ds = grain.MapDataset.source(source).map_with_index(_tag)
    total = len(ds)
    if shard.drop_remainder:
      ds = ds[:total - total % shard.shard_count]
    ds = ds[shard.shard_index::shard.shard_count]
    epoch_len = len(ds)
    if epoch_len == 0:
      raise ValueError(f"{src['key']} ({src['path']!r}) has {total} records: too few for "
                       f"{shard.shard_count} processes")
    if task in ("t2i", "mmu"):
      first = source[0]
      got = np.asarray(first.get("codes", ())).size
      if got != n:
        raise ValueError(f"{src['key']} ({src['path']!r}) holds {got} image tokens per record, but "
                         f"data.num_image_tokens is {n}")
    if bool(data_cfg.shuffle):
      ds = ds.shuffle(seed=_derive_seed(seed, TASK_IDS[task], si))
    if src["on_exhausted"] == "repeat":
      ds = ds.repeat(None)
    fmt = RowFormatter(
        kind=src["kind"], tokenizer=tokenizer, specials=specials, seed=seed, source_index=si, epoch_len=epoch_len,
        max_text_len=s, num_image_tokens=n, text_field=sec.text_field,
        cond_dropout_prob=float(data_cfg.cond_dropout_prob), name=src["key"], **_formatter_options(sec))
    ds = ds.map_with_index(fmt)
    if fmt.max_tokens and fmt.kind == "lm_chat":
      # Rows over the length limit come back as None; grain's filter raises once a whole window
      # of 1000 rows is dropped instead of spinning forever on an all-too-long source.
      it = ds.to_iter_dataset(read, allow_nones=True).filter(_is_row)
      it = grain.experimental.WithOptionsIterDataset(
          it, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=1.0))
    else:
      it = ds.to_iter_dataset(read)
    it = it.batch(bs, drop_remainder=True, batch_fn=BatchBuilder(src["kind"], specials, s, n, emit_index, si))
    what = f"data.{task} source {src['name']!r} ({src['key']}={src['path']!r})"
    datasets.append(SourceFeed(it, si, src["on_exhausted"], what))
    weights.append(src["weight"])
    names.append(src["path"])
    source_names.append(src["name"])
    lens.append(epoch_len)
  flow = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)
  info = FlowInfo(task, bs, tuple(names), tuple(lens), max(1, sum(lens) // bs), tuple(source_names))
  return flow, info


class FlowZipDataset(grain.IterDataset):
  """Zips named flow datasets into ``{name: batch}`` per step (stops when any flow stops)."""

  def __init__(self, flows: Mapping[str, grain.IterDataset]):
    super().__init__(list(flows.values()))
    self._names = tuple(flows)

  def __iter__(self) -> "_FlowZipIterator":
    return _FlowZipIterator(self._names, [p.__iter__() for p in self.parents])

  def __str__(self) -> str:
    return f"FlowZipDataset({list(self._names)})"


class _FlowZipIterator(grain.DatasetIterator):

  def __init__(self, names: tuple[str, ...], parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._names = names

  def __next__(self) -> dict[str, Any]:
    return {name: next(p) for name, p in zip(self._names, self._parents)}

  def get_state(self) -> dict[str, Any]:
    return {name: p.get_state() for name, p in zip(self._names, self._parents)}

  def set_state(self, state: dict[str, Any]) -> None:
    for name, p in zip(self._names, self._parents):
      p.set_state(state[name])


class MixedBatchIterator(grain.DatasetIterator):
  """Per-step mixed batches of this host (see the module docstring).

  Attributes:
    flows: ``{task: FlowInfo}`` of the active flows.
    seq_len: L = S + N + 3 (the longest flow's). steps_per_epoch: batches in one ``max_size_cycle`` epoch.
    total_steps: ``num_epochs * steps_per_epoch``, or None (repeat forever). step: batches returned.
  ``get_state()`` -> ``{"step": int, "flows": {...}, "rows": {task: [rows per source]},
  "signature": {...}}`` (JSON-serialisable; ``rows``: this host's row counters, see
  :meth:`metrics`; a state without them restores them as 0); ``set_state`` restores it, after which the iterator yields exactly the batches that followed the
  saved step. The signature (seed, shuffle, shard, workers, per-host batch sizes and the record
  counts of each source's shard; not the paths, so data may move) must match: restoring into a
  differently configured pipeline raises ValueError.
  """

  def __init__(self, parent: grain.DatasetIterator, flows: Mapping[str, FlowInfo], seq_len: int,
               total_steps: int | None, signature: Mapping[str, Any] | None = None, process_count: int = 1):
    super().__init__(parent)
    self.signature = json.loads(json.dumps(signature or {}))
    self.flows = dict(flows)
    self.seq_len = seq_len
    self.steps_per_epoch = max(f.steps_per_epoch for f in self.flows.values())
    self.total_steps = total_steps
    self.process_count = process_count
    self.step = 0
    self.rows = {k: [0] * len(f.sources) for k, f in self.flows.items()}

  @property
  def batch_sizes(self) -> dict[str, int]:
    """Per-host rows per flow."""
    return {k: f.batch_size for k, f in self.flows.items()}

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    if self.total_steps is not None and self.step >= self.total_steps:
      raise StopIteration
    batch = next(self._parent)
    out = {}
    for task, b in batch.items():
      b = dict(b)
      self.rows[task][int(b.pop(SOURCE_KEY))] += self.flows[task].batch_size
      out[task] = b
    self.step += 1
    return out

  def metrics(self) -> dict[str, int]:
    """``{"data/<task>/<source name>": rows}``: rows each source has fed its flow so far, over all
    hosts (this host's count times ``process_count``: every host draws the same number of batches
    from each source, as the mix's pattern depends only on the weights)."""
    return {f"data/{task}/{name}": n * self.process_count
            for task, f in self.flows.items() for name, n in zip(f.source_names, self.rows[task])}

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "flows": self._parent.get_state(), "rows": {k: list(v) for k, v in self.rows.items()},
            "signature": self.signature}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get("signature")
    if saved is not None and saved != self.signature:
      diff = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
      raise ValueError(f"data state was saved by a differently configured pipeline (differs in {diff}: "
                       f"saved {[saved.get(k) for k in diff]}, now {[self.signature.get(k) for k in diff]})")
    self._parent.set_state(state["flows"])
    self.step = int(state["step"])
    rows = state.get("rows") or {}
    self.rows = {k: [int(n) for n in rows.get(k, [0] * len(f.sources))] for k, f in self.flows.items()}

  def __repr__(self) -> str:
    return (f"MixedBatchIterator(step={self.step}, L={self.seq_len}, batch={self.batch_sizes}, "
            f"steps_per_epoch={self.steps_per_epoch}, total_steps={self.total_steps})")


def _with_lengths(data_cfg: Any, max_text_len: int | None, num_image_tokens: int | None) -> Any:
  """``data_cfg`` with S / N overridden (a copy when anything changes)."""
  if max_text_len is None and num_image_tokens is None:
    return data_cfg
  cfg = data_cfg.copy_and_resolve_references()
  if max_text_len is not None:
    cfg.max_text_len = int(max_text_len)
  if num_image_tokens is not None:
    cfg.num_image_tokens = int(num_image_tokens)
  return cfg


def _load_tokenizer(data_cfg: Any):
  from mmada_jax.prompting.text_tokenizer import TextTokenizer
  path = str(data_cfg.text_tokenizer or "")
  if not path:
    raise FileNotFoundError("config data.text_tokenizer is empty and no tokenizer was passed: set it to a "
                            "tokenizer.json (or its folder)")
  try:
    return TextTokenizer.from_file(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config data.text_tokenizer: {e}") from None


def make_mixed_dataset(data_cfg: Any, tokenizer: Any = None, *, max_text_len: int | None = None,
                       num_image_tokens: int | None = None, process_index: int | None = None,
                       process_count: int | None = None, seed: int | None = None,
                       shard_options: grain.sharding.ShardOptions | None = None, specials: SpecialTokens | None = None,
                       emit_index: bool = False) -> tuple[grain.IterDataset, dict[str, FlowInfo]]:
  """The zipped per-step ``IterDataset`` (before the step limit) and the active flows' info; each
  flow batch also holds ``SOURCE_KEY`` (its source's index), which :class:`MixedBatchIterator`
  counts and removes.

  Args:
    data_cfg: ``config.data`` (:func:`mmada_jax.data.config.default_data_config`).
    tokenizer: a ``TextTokenizer``; None = load ``data_cfg.text_tokenizer``.
    max_text_len / num_image_tokens: S and N, overriding ``data_cfg`` (which is not modified).
    process_index / process_count / shard_options: this host's shard (see
      :func:`resolve_shard_options`; default ``jax.process_index()`` of ``jax.process_count()``).
    seed: overrides ``data_cfg.seed``. specials: overrides ``SpecialTokens.from_tokenizer``.
    emit_index: also return ``record_index`` int64 [B] and ``source_index`` int32 [B] per flow.
  """
  data_cfg = _with_lengths(data_cfg, max_text_len, num_image_tokens)
  tokenizer = _load_tokenizer(data_cfg) if tokenizer is None else tokenizer
  specials = SpecialTokens.from_tokenizer(tokenizer) if specials is None else specials
  shard = resolve_shard_options(process_index, process_count, shard_options)
  seed = int(data_cfg.seed if seed is None else seed)
  if int(data_cfg.max_text_len) < 1 or int(data_cfg.num_image_tokens) < 1:
    raise ValueError("data.max_text_len and data.num_image_tokens must be >= 1")
  flows, infos = {}, {}
  for task in TASKS:
    if int(data_cfg[task].batch_size) <= 0:
      continue
    flows[task], infos[task] = make_flow_dataset(data_cfg, task, tokenizer, specials, shard, seed, emit_index)
  if not flows:
    raise ValueError("every flow has batch_size 0: set data.t2i/lm/mmu.batch_size")
  ds: grain.IterDataset = FlowZipDataset(flows)
  if int(data_cfg.worker_count) > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use the defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.worker_count),
                                                     per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
  return ds, infos


def make_mixed_iterator(data_cfg: Any, tokenizer: Any = None, *, max_text_len: int | None = None,
                        num_image_tokens: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, seed: int | None = None,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        specials: SpecialTokens | None = None, emit_index: bool = False) -> MixedBatchIterator:
  """The training input iterator of this host; arguments as :func:`make_mixed_dataset`.

  ``num_epochs`` (config) limits the steps to ``num_epochs * steps_per_epoch``; None repeats forever.
  """
  data_cfg = _with_lengths(data_cfg, max_text_len, num_image_tokens)
  ds, infos = make_mixed_dataset(data_cfg, tokenizer, process_index=process_index, process_count=process_count,
                                 seed=seed, shard_options=shard_options, specials=specials, emit_index=emit_index)
  seq_len = max(flow_text_len(data_cfg, t) for t in infos) + int(data_cfg.num_image_tokens) + 3
  steps = max(f.steps_per_epoch for f in infos.values())
  total = None if data_cfg.num_epochs is None else int(data_cfg.num_epochs) * steps
  shard = resolve_shard_options(process_index, process_count, shard_options)
  signature = {"seed": int(data_cfg.seed if seed is None else seed), "shuffle": bool(data_cfg.shuffle),
               "shard": [shard.shard_index, shard.shard_count], "workers": int(data_cfg.worker_count),
               **{f"flow.{k}": [f.batch_size, list(f.shard_records)] for k, f in infos.items()}}
  return MixedBatchIterator(iter(ds), infos, seq_len, total, signature, shard.shard_count)


def global_batch_size(data_cfg: Any) -> int:
  """Rows per step over all hosts and flows."""
  return sum(int(data_cfg[t].batch_size) for t in TASKS if int(data_cfg[t].batch_size) > 0)


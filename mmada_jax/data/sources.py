"""Random-access record sources (grain ``RandomAccessDataSource``: ``len`` + ``__getitem__``).

Every source returns plain dicts. Text values are ``str``; ``messages`` / ``conversations`` are
lists of dicts; ``codes`` (image sources) are integer numpy arrays [N]. Formats:

* ``shards``: a token-shard folder of :mod:`mmada_jax.data.tokenize_images` (ArrayRecord + manifest).
* ``tfds``: a prepared dataset of :mod:`mmada_jax.data.tfds_builder` (its version folder, the one
  holding ``dataset_info.json``), read with ``builder.as_data_source(split)``.
* ``jsonl``: one or more JSON-lines files (a file, or a folder of ``*.jsonl``); lines are indexed
  by byte offset once, then read on demand.
* ``parquet``: one or more parquet files; row groups are read on demand and a few are cached, so
  a shuffled read of a large file is slow: convert such data with the tfds builder instead.

All sources pickle without their open file handles (for grain worker processes).
"""
from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import threading
from typing import Any, Sequence

import numpy as np

from mmada_jax.data import records

_JSON_FIELDS = ("messages", "conversations")


class JsonlSource:
  """Records of JSON-lines files (blank lines skipped), in file order."""

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.path.abspath(p) for p in paths]
    offsets, file_ids = [], []
    for fi, p in enumerate(self.paths):
      pos = 0
      with open(p, "rb") as f:
        for line in f:
          if line.strip():
            offsets.append(pos)
            file_ids.append(fi)
          pos += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    self._file_ids = np.asarray(file_ids, np.int32)
    self._local = threading.local()

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> dict[str, Any]:
    handles = getattr(self._local, "handles", None)
    if handles is None:
      handles = self._local.handles = {}
    fi = int(self._file_ids[index])
    f = handles.get(fi)
    if f is None:
      f = handles[fi] = open(self.paths[fi], "rb")
    f.seek(int(self._offsets[index]))
    line = f.readline()
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.paths[fi]}: record {index} is not valid JSON ({e})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{self.paths[fi]}: record {index} is a {type(row).__name__}, expected an object")
    return row

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_local"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def __repr__(self) -> str:
    return f"JsonlSource({len(self)} records in {len(self.paths)} files)"


class ParquetSource:
  """Rows of parquet files (as dicts), read per row group with a small LRU cache."""

  def __init__(self, paths: Sequence[str], columns: Sequence[str] | None = None, cache_groups: int = 4):
    import pyarrow.parquet as pq
    self.paths = [os.path.abspath(p) for p in paths]
    self.columns = None if columns is None else list(columns)
    self.cache_groups = cache_groups
    self._groups: list[tuple[int, int]] = []  # (file index, row group)
    starts = []
    n = 0
    for fi, p in enumerate(self.paths):
      meta = pq.ParquetFile(p).metadata
      for g in range(meta.num_row_groups):
        starts.append(n)
        self._groups.append((fi, g))
        n += meta.row_group(g).num_rows
    self._starts = starts
    self._len = n
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __len__(self) -> int:
    return self._len

  def _group(self, gi: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    with self._lock:
      if gi in self._cache:
        self._cache.move_to_end(gi)
        return self._cache[gi]
    fi, g = self._groups[gi]
    rows = pq.ParquetFile(self.paths[fi]).read_row_group(g, columns=self.columns).to_pylist()
    with self._lock:
      self._cache[gi] = rows
      while len(self._cache) > self.cache_groups:
        self._cache.popitem(last=False)
    return rows

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range [0, {self._len})")
    gi = bisect.bisect_right(self._starts, index) - 1
    return dict(self._group(gi)[index - self._starts[gi]])

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"], state["_cache"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __repr__(self) -> str:
    return f"ParquetSource({self._len} rows in {len(self.paths)} files)"


class TokenShardSource:
  """Records of a token-shard folder: ``{"codes": uint16 [N], "text": str, ...}``."""

  def __init__(self, folder: str):
    import grain
    self.folder = os.path.abspath(folder)
    self.manifest = records.read_manifest(self.folder)
    paths = records.shard_paths(self.folder, self.manifest)
    if not paths:
      raise ValueError(f"token-shard folder {folder!r} holds no records")
    self._source = grain.sources.ArrayRecordDataSource(paths)

  @property
  def num_tokens(self) -> int:
    return int(self.manifest["num_tokens"])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return records.decode_record(self._source[index])

  def __repr__(self) -> str:
    return f"TokenShardSource({len(self)} records, N={self.num_tokens}, {self.folder})"


class TfdsSource:
  """Records of a prepared tfds dataset (array_record files), decoded to str / lists / numpy."""

  def __init__(self, version_dir: str, split: str = "train"):
    import tensorflow_datasets as tfds
    self.version_dir = os.path.abspath(version_dir)
    self.split = split
    builder = tfds.builder_from_directory(self.version_dir)
    if split not in builder.info.splits:
      raise ValueError(f"tfds dataset {version_dir!r} has no split {split!r} (has {list(builder.info.splits)})")
    self._source = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _decode_tfds(self._source[index])

  def __repr__(self) -> str:
    return f"TfdsSource({len(self)} records, {self.version_dir}:{self.split})"


def _decode_tfds(ex: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in ex.items():
    if isinstance(v, bytes):
      v = v.decode("utf-8")
      if k in _JSON_FIELDS:
        v = json.loads(v) if v else None
      if v is None or (k in _JSON_FIELDS and not v) or (k == "content" and not v):
        continue  # absent optional field
    out[k] = v
  return out


# ---- format detection ------------------------------------------------------------------------

def _find_tfds_version_dir(path: str) -> str | None:
  """``path`` itself or the single folder holding ``dataset_info.json`` up to three levels below it
  (``<version>``, ``<config>/<version>`` or a tfds data dir's ``<name>/<config>/<version>``)."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted({f for depth in (1, 2, 3)
                  for f in glob.glob(os.path.join(path, *["*"] * depth, "dataset_info.json"))})
  if len(found) == 1:
    return os.path.dirname(found[0])
  if len(found) > 1:
    raise ValueError(f"{path!r} holds several tfds datasets {[os.path.dirname(f) for f in found]}; name one")
  return None


def detect_format(path: str) -> str:
  """``shards`` | ``tfds`` | ``jsonl`` | ``parquet`` for an existing path (ValueError if none fits)."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, records.MANIFEST_NAME)):
      return "shards"
    if _find_tfds_version_dir(path):
      return "tfds"
    if glob.glob(os.path.join(path, "*.jsonl")):
      return "jsonl"
    if glob.glob(os.path.join(path, "*.parquet")):
      return "parquet"
    raise ValueError(f"cannot tell the format of folder {path!r}: no manifest.json (token shards), "
                     "dataset_info.json (tfds), *.jsonl or *.parquet")
  if path.endswith((".jsonl", ".json")):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  raise ValueError(f"cannot tell the format of file {path!r}; expected .jsonl or .parquet")


def _files(path: str, ext: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, f"*{ext}")))
    if not files:
      raise ValueError(f"folder {path!r} holds no *{ext} files")
    return files
  return [path]


def open_source(path: str, fmt: str = "auto", split: str = "train", key: str = "path"):
  """Opens ``path`` as a record source.

  Args:
    path: file or folder. fmt: ``auto`` or one of ``shards``/``tfds``/``jsonl``/``parquet``.
    split: the tfds split. key: the config key named in errors (e.g. ``data.t2i.path``).
  Raises:
    FileNotFoundError: empty or missing ``path`` (the message names ``key`` and the path).
  """
  if not path:
    raise FileNotFoundError(f"config {key} is empty: set it to the data folder or file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {key}: no such file or folder {path!r}")
  fmt = detect_format(path) if fmt == "auto" else fmt
  if fmt == "shards":
    return TokenShardSource(path)
  if fmt == "tfds":
    vdir = _find_tfds_version_dir(path) if os.path.isdir(path) else None
    if vdir is None:
      raise FileNotFoundError(f"config {key}: no prepared tfds dataset (dataset_info.json) under {path!r}")
    return TfdsSource(vdir, split)
  if fmt == "jsonl":
    return JsonlSource(_files(path, ".jsonl"))
  if fmt == "parquet":
    return ParquetSource(_files(path, ".parquet"))
  raise ValueError(f"config {key}: unknown format {fmt!r}")

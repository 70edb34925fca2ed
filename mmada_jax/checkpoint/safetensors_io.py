"""Tensor-by-tensor access to Hugging Face safetensors checkpoints.

A checkpoint is a directory (or a single ``*.safetensors`` file) holding either one
``<name>.safetensors`` file or several shards listed by ``<name>.safetensors.index.json``.
Tensors are read one at a time with plain reads (no memory map), so converting a large
checkpoint never holds more than the tensor being read in addition to what the caller keeps.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the expected layout."""


_DEFAULT_NAMES = ("model.safetensors", "pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")


def _resolve(path: str, file_names: Iterable[str]) -> tuple[str, dict[str, str]]:
  """Returns (directory, {tensor key: shard file path})."""
  if os.path.isfile(path):
    if path.endswith(".index.json"):
      index_path = path
    else:
      return os.path.dirname(path), {k: path for k in _read_header(path)[0]}
  else:
    if not os.path.isdir(path):
      raise CheckpointError(f"checkpoint path does not exist: {path}")
    index_path = None
    for name in file_names:
      if os.path.isfile(os.path.join(path, name + ".index.json")):
        index_path = os.path.join(path, name + ".index.json")
        break
      if os.path.isfile(os.path.join(path, name)):
        single = os.path.join(path, name)
        return path, {k: single for k in _read_header(single)[0]}
    if index_path is None:
      raise CheckpointError(
          f"no safetensors weights in {path}: expected one of "
          + ", ".join(list(file_names) + [n + ".index.json" for n in file_names]))
  directory = os.path.dirname(index_path)
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise CheckpointError(f"cannot read safetensors index {index_path}: {e}") from e
  key_to_file = {}
  for key, shard in weight_map.items():
    shard_path = os.path.join(directory, shard)
    if not os.path.isfile(shard_path):
      raise CheckpointError(f"shard {shard} listed in {index_path} (for {key}) is missing")
    key_to_file[key] = shard_path
  return directory, key_to_file


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}


def _read_header(file_path: str) -> tuple[dict, int]:
  """Parses a safetensors header: ({key: {dtype, shape, data_offsets}}, data start offset)."""
  try:
    size = os.path.getsize(file_path)
    with open(file_path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError("file is shorter than the 8-byte header length")
      n = struct.unpack("<Q", raw)[0]
      if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file size {size}")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"cannot read safetensors file {file_path}: {e}") from e
  header.pop("__metadata__", None)
  start = 8 + n
  for key, info in header.items():
    lo, hi = info["data_offsets"]
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{file_path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if hi - lo != nbytes or start + hi > size:
      raise CheckpointError(f"{file_path} is truncated or corrupt: tensor {key!r} needs bytes "
                            f"[{start + lo}, {start + hi}) of a {size}-byte file")
  return header, start


class SafetensorsReader:
  """Lazy reader over a (possibly sharded) safetensors checkpoint.

  ``reader[key]`` reads one tensor with ``pread`` into a fresh numpy array (bf16 as
  ``ml_dtypes.bfloat16``); nothing is memory-mapped, so finished tensors do not linger in the
  process's resident memory. ``shape(key)`` and ``dtype(key)`` read only the header.
  """

  def __init__(self, path: str, file_names: Iterable[str] = _DEFAULT_NAMES):
    self.directory, self._key_to_file = _resolve(path, tuple(file_names))
    self._headers: dict[str, tuple[dict, int]] = {}

  def _info(self, key: str) -> tuple[str, dict, int]:
    if key not in self._key_to_file:
      raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.directory}")
    file_path = self._key_to_file[key]
    if file_path not in self._headers:
      self._headers[file_path] = _read_header(file_path)
    header, start = self._headers[file_path]
    if key not in header:
      raise CheckpointError(f"tensor {key!r} is listed for {file_path} but is not in that file")
    return file_path, header[key], start

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._info(key)[1]["shape"])

  def dtype(self, key: str) -> str:
    """The safetensors dtype string, e.g. ``F32``, ``BF16``, ``I64``."""
    return self._info(key)[1]["dtype"]

  def __getitem__(self, key: str) -> np.ndarray:
    file_path, info, start = self._info(key)
    lo, hi = info["data_offsets"]
    out = np.empty(info["shape"], _DTYPES[info["dtype"]])
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    try:
      with open(file_path, "rb", buffering=0) as f:
        f.seek(start + lo)
        got = 0
        while got < hi - lo:
          n = f.readinto(view[got:])
          if not n:
            raise CheckpointError(f"{file_path} ended early while reading tensor {key!r}")
          got += n
    except OSError as e:
      raise CheckpointError(f"cannot read tensor {key!r} from {file_path}: {e}") from e
    return out

  def close(self) -> None:
    self._headers.clear()

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_safetensors(
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    directory: str,
    base_name: str = "model.safetensors",
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
  """Writes tensors as one file or as shards plus an index, atomically.

  Tensors are consumed one at a time; each shard is flushed when it reaches
  ``max_shard_bytes``. Files are written to a temporary directory first and moved into
  ``directory`` only when all of them are complete, so a failure leaves no half-written
  checkpoint. Returns the written file names.
  """
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".partial-", dir=directory)
  stem = base_name[: -len(".safetensors")]
  current: dict[str, np.ndarray] = {}
  current_bytes = 0
  shard_files: list[str] = []
  weight_map: dict[str, str] = {}
  total = 0
  meta = {"format": "pt", **(metadata or {})}

  def flush():
    nonlocal current, current_bytes
    if not current:
      return
    index = len(shard_files)
    name = f"{stem}-{index:05d}.safetensors"
    save_file(current, os.path.join(tmp, name), metadata=meta)
    shard_files.append(name)
    for k in current:
      weight_map[k] = name
    current, current_bytes = {}, 0

  try:
    for key, value in items:
      value = np.ascontiguousarray(value)
      if current and current_bytes + value.nbytes > max_shard_bytes:
        flush()
      current[key] = value
      current_bytes += value.nbytes
      total += value.nbytes
    flush()
    if len(shard_files) == 1:
      os.replace(os.path.join(tmp, shard_files[0]), os.path.join(tmp, base_name))
      written = [base_name]
    else:
      n = len(shard_files)
      renamed = {}
      for i, name in enumerate(shard_files):
        final = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
        renamed[name] = final
      index = {"metadata": {"total_size": total},
               "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
      with open(os.path.join(tmp, base_name + ".index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
      written = list(renamed.values()) + [base_name + ".index.json"]
    for name in written:
      os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    return written
  finally:
    for name in os.listdir(tmp):
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)

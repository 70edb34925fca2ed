"""Tensor-by-tensor access to Hugging Face safetensors checkpoints.

A checkpoint is a directory (or a single ``*.safetensors`` file) holding either one
``<name>.safetensors`` file or several shards listed by ``<name>.safetensors.index.json``.
Tensors are read one at a time, memory-mapped, so converting a large checkpoint never holds
more than the tensor being read in addition to what the caller keeps.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Iterator, Mapping

import numpy as np
from safetensors import safe_open
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
      return os.path.dirname(path), _keys_of(path)
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
        return path, _keys_of(single)
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


def _keys_of(file_path: str) -> dict[str, str]:
  try:
    with safe_open(file_path, framework="numpy") as f:
      return {k: file_path for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers.
    raise CheckpointError(f"cannot read safetensors file {file_path}: {e}") from e


class SafetensorsReader:
  """Lazy reader over a (possibly sharded) safetensors checkpoint.

  ``reader[key]`` returns a numpy array (bf16 as ``ml_dtypes.bfloat16``); ``shape(key)`` and
  ``dtype(key)`` read only the header.
  """

  def __init__(self, path: str, file_names: Iterable[str] = _DEFAULT_NAMES):
    self.directory, self._key_to_file = _resolve(path, tuple(file_names))
    self._handles: dict[str, object] = {}

  def _handle(self, key: str):
    if key not in self._key_to_file:
      raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.directory}")
    file_path = self._key_to_file[key]
    if file_path not in self._handles:
      try:
        self._handles[file_path] = safe_open(file_path, framework="numpy")
      except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {file_path}: {e}") from e
    return self._handles[file_path]

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """The safetensors dtype string, e.g. ``F32``, ``BF16``, ``I64``."""
    return self._handle(key).get_slice(key).get_dtype()

  def __getitem__(self, key: str) -> np.ndarray:
    try:
      return self._handle(key).get_tensor(key)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"cannot read tensor {key!r} from {self._key_to_file[key]}: {e}") from e

  def close(self) -> None:
    self._handles.clear()

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

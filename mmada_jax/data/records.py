"""On-disk layout of pre-tokenised image data ("token shards").

A token-shard folder holds ArrayRecord files and a JSON manifest::

  OUT/
    manifest.json                         # see :func:`read_manifest`
    tokens-00000-of-00003.array_record    # one record per image (group_size 1: O(1) random access)
    ...

Each record is a msgpack map: ``"codes"`` = the image codes as raw little-endian ``uint16`` bytes
(``N = h*w`` codes, row-major over the code grid, values in [0, codebook_size)) plus the text fields
of the input row (``"text"``; any other JSON-able metadata such as ``"messages"``,
``"conversations"`` or ``"id"`` is kept as is). :func:`decode_record` gives the codes back as a
``uint16 [N]`` numpy array.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import msgpack
import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mmada_image_tokens"
FORMAT_VERSION = 1
CODE_DTYPE = np.dtype("<u2")
"""Stored code dtype: uint16 holds any codebook up to 65536 entries (MAGVIT-v2 has 8192)."""


def encode_record(codes: np.ndarray, fields: Mapping[str, Any]) -> bytes:
  """codes int [N] in [0, 65536) + JSON-able text fields -> msgpack bytes."""
  codes = np.asarray(codes)
  if codes.ndim != 1:
    raise ValueError(f"codes must be 1-D [N], got shape {codes.shape}")
  if codes.size and (int(codes.min()) < 0 or int(codes.max()) > np.iinfo(CODE_DTYPE).max):
    raise ValueError(f"codes must lie in [0, 65536) to be stored as uint16, got [{codes.min()}, {codes.max()}]")
  if "codes" in fields:
    raise ValueError("a text field may not be named 'codes'")
  payload = dict(fields)
  payload["codes"] = codes.astype(CODE_DTYPE).tobytes()
  return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """msgpack bytes -> dict with ``"codes"`` uint16 [N] and the text fields (str/list/dict/...)."""
  rec = msgpack.unpackb(data, raw=False)
  rec["codes"] = np.frombuffer(rec["codes"], dtype=CODE_DTYPE)
  return rec


def shard_name(index: int, count: int) -> str:
  return f"tokens-{index:05d}-of-{count:05d}.array_record"


def read_manifest(folder: str) -> dict[str, Any]:
  """Reads ``folder/manifest.json``.

  Fields: ``format``, ``version``, ``count`` (records), ``num_tokens`` (N), ``grid`` [h, w],
  ``codebook_size``, ``code_dtype``, ``resolution`` (px), ``resize``, ``shards`` (list of
  ``{"file", "count", "source"}``), ``text_fields``, ``skipped`` (``count`` and per-reason
  ``{"count", "examples": [{"where", "detail"}]}`` of the inputs that could not become records),
  ``tokenizer`` (``config``, ``config_hash``, ``params_hash``), ``source``, ``processes``.
  Raises FileNotFoundError when there is no manifest, ValueError when it is not a token-shard one.
  """
  path = os.path.join(folder, MANIFEST_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no token-shard manifest at {path!r}")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT_NAME:
    raise ValueError(f"{path!r} is not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
  if int(manifest.get("version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{path!r} has format version {manifest['version']}, newer than {FORMAT_VERSION}")
  return manifest


def shard_paths(folder: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
  """Absolute paths of the manifest's non-empty shard files, in order."""
  manifest = read_manifest(folder) if manifest is None else manifest
  return [os.path.join(folder, s["file"]) for s in manifest["shards"] if s["count"]]


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

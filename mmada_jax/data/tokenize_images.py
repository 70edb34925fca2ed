"""Pre-tokenise images once with the MAGVIT-v2 tokenizer into ArrayRecord token shards.

Command::

  python -m mmada_jax.data.tokenize_images --tokenizer DIR --input SRC --output OUT \\
      [--resolution 256] [--resize clip|squash|pad_white] [--batch-size 16] [--shard-size 2048]

SRC is one of
* a folder of images with a ``metadata.jsonl`` / ``captions.jsonl`` (or a single ``*.jsonl``) whose
  rows name the image (``file_name``/``image``/``image_path``/``path``, relative to the folder);
* a folder of images without one (caption from a sidecar ``<stem>.txt`` when present, else "");
* a ``.jsonl`` file with image paths (relative to the file) and text;
* a ``.parquet`` file (or a folder of them) whose image column holds paths, encoded bytes or the
  Hugging Face ``{"bytes", "path"}`` struct.
The caption is read from ``--text-field`` (default ``text``, falling back to ``caption``) and stored
as ``text``; every other JSON-able column (``messages``, ``conversations``, ``id``, ...) is kept.

Output (see :mod:`mmada_jax.data.records`): ``OUT/tokens-*.array_record`` (codes as uint16 +
text fields) and ``OUT/manifest.json`` (count, grid, tokenizer config/params hashes). The work is
done in ``OUT.partial/`` and renamed to OUT only when complete, so OUT is never half-written. A
failed run leaves ``OUT.partial/`` with its finished shards; running the same command again
resumes after the last finished shard; different settings are refused unless ``--restart``. An
existing complete OUT is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from mmada_jax.data import records
from mmada_jax.data.images import IMAGE_EXTENSIONS, RESIZE_MODES, preprocess_image

log = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
IMAGE_KEYS = ("file_name", "image", "image_path", "path", "file", "img", "jpg", "png")
METADATA_NAMES = ("metadata.jsonl", "captions.jsonl")


# ---- input rows ------------------------------------------------------------------------------

class InputRows:
  """The rows of SRC in a fixed order: ``len()`` and ``rows(start, stop)`` yielding
  ``(image_ref, base_dir, fields)`` with ``fields`` = the JSON-able text/metadata columns."""

  def __init__(self, path: str, text_field: str = "text", image_field: str | None = None):
    self.path = os.path.abspath(path)
    self.text_field = text_field
    self.image_field = image_field
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"--input: no such file or folder: {path!r}")
    self._parquet: list[str] = []
    self._rows: list[dict[str, Any]] | None = None
    self.base_dir = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
    if os.path.isdir(self.path):
      meta = [os.path.join(self.path, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(self.path, n))]
      jsonls = sorted(glob.glob(os.path.join(self.path, "*.jsonl")))
      parquets = sorted(glob.glob(os.path.join(self.path, "*.parquet")))
      if meta:
        self._rows = _read_jsonl(meta[0])
      elif len(jsonls) == 1:
        self._rows = _read_jsonl(jsonls[0])
      elif len(jsonls) > 1:
        raise ValueError(f"--input {path!r} holds several .jsonl files {jsonls}; name one, or call it metadata.jsonl")
      elif parquets:
        self._parquet = parquets
      else:
        self._rows = self._image_folder_rows()
    elif self.path.endswith((".jsonl", ".json")):
      self._rows = _read_jsonl(self.path)
    elif self.path.endswith(".parquet"):
      self._parquet = [self.path]
    else:
      raise ValueError(f"--input {path!r}: expected a folder, a .jsonl or a .parquet file")
    if self._parquet:
      import pyarrow.parquet as pq
      self._pq_counts = [pq.ParquetFile(p).metadata.num_rows for p in self._parquet]
    if len(self) == 0:
      raise ValueError(f"--input {path!r} holds no rows")

  def _image_folder_rows(self) -> list[dict[str, Any]]:
    rows = []
    for root, _, files in sorted(os.walk(self.path)):
      for name in sorted(files):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          full = os.path.join(root, name)
          rel = os.path.relpath(full, self.path)
          txt = os.path.splitext(full)[0] + ".txt"
          text = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
          rows.append({"file_name": rel, "text": text})
    return rows

  def __len__(self) -> int:
    return len(self._rows) if self._rows is not None else sum(self._pq_counts)

  def _split(self, row: dict[str, Any], index: int) -> tuple[Any, dict[str, Any]]:
    key = self.image_field
    if key is None:
      key = next((k for k in IMAGE_KEYS if k in row), None)
    if key is None or key not in row:
      raise ValueError(f"row {index} of {self.path!r} has no image column (looked for "
                       f"{[self.image_field] if self.image_field else list(IMAGE_KEYS)}; keys: {sorted(row)})")
    text_key = self.text_field if self.text_field in row else ("caption" if "caption" in row else None)
    fields: dict[str, Any] = {"text": "" if text_key is None or row[text_key] is None else str(row[text_key])}
    for k, v in row.items():
      if k in (key, text_key, "codes") or k in fields:
        continue
      if _jsonable(v):
        fields[k] = v
    return row[key], fields

  def rows(self, start: int, stop: int) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """Rows ``start <= i < stop`` as ``(image_ref, base_dir, fields)``."""
    if self._rows is not None:
      for i in range(start, stop):
        ref, fields = self._split(self._rows[i], i)
        yield ref, self.base_dir, fields
      return
    import pyarrow.parquet as pq
    offset = 0
    for path, count in zip(self._parquet, self._pq_counts):
      if offset + count <= start or offset >= stop:
        offset += count
        continue
      pf = pq.ParquetFile(path)
      row_offset = offset
      base = os.path.dirname(path)
      for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row_offset + n > start and row_offset < stop:
          table = pf.read_row_group(g).to_pylist()
          for j, row in enumerate(table):
            i = row_offset + j
            if start <= i < stop:
              ref, fields = self._split(row, i)
              yield ref, base, fields
        row_offset += n
      offset += count

  def describe(self) -> str:
    return self.path


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
      rows.append(row)
  return rows


def _jsonable(v: Any) -> bool:
  if v is None or isinstance(v, (str, bool, int, float)):
    return True
  if isinstance(v, (list, tuple)):
    return all(_jsonable(x) for x in v)
  if isinstance(v, dict):
    return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
  return False


# ---- tokenizer fingerprint -------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """``{"config", "config_hash", "params_hash"}`` of an ImageTokenizer (sha256 hex digests of the
  canonical config JSON and of every parameter's path, dtype, shape and bytes)."""
  import jax
  cfg = tokenizer.config.to_hf_config()
  cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tokenizer.params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return {"config": cfg, "config_hash": cfg_hash, "params_hash": h.hexdigest()}


# ---- main routine ----------------------------------------------------------------------------

def _partial_dir(output_dir: str) -> str:
  return os.path.abspath(output_dir).rstrip(os.sep) + ".partial"


def _ref_str(ref: Any) -> str:
  return repr(ref) if isinstance(ref, (str, os.PathLike)) else f"<{type(ref).__name__}>"


def _write_shard(tokenizer, rows: InputRows, lo: int, hi: int, path: str, pool, bar, *, resolution: int,
                 resize: str, batch_size: int, skip_bad: bool) -> tuple[int, list[int], set[str]]:
  """Encodes rows [lo, hi) into one ArrayRecord file; returns (records written, skipped rows,
  field names). Images are loaded in ``pool`` with a look-ahead of 4 batches."""
  from array_record.python.array_record_module import ArrayRecordWriter

  if os.path.exists(path):
    os.remove(path)  # an unfinished shard of an interrupted run
  writer = ArrayRecordWriter(path, "group_size:1")
  written, skipped, names = 0, [], set()
  pending: collections.deque = collections.deque()
  imgs: list[np.ndarray] = []
  metas: list[dict[str, Any]] = []

  def flush():
    nonlocal written
    if not imgs:
      return
    x = np.stack(imgs)
    if len(imgs) < batch_size:  # pad: one compiled shape for every call
      x = np.concatenate([x, np.zeros((batch_size - len(imgs),) + x.shape[1:], np.float32)])
    codes = np.asarray(tokenizer.encode(x))[:len(imgs)]
    for c, m in zip(codes, metas):
      writer.write(records.encode_record(c, m))
      names.update(m)
    written += len(imgs)
    imgs.clear()
    metas.clear()

  def drain_one():
    i, ref, fut, meta = pending.popleft()
    try:
      img = fut.result()
    except Exception as e:  # noqa: BLE001 - reported with the row and the image reference
      if not skip_bad:
        raise RuntimeError(f"row {i}: cannot load image {_ref_str(ref)}: {e}; fix or remove it (or pass "
                           "--skip-bad) and run the same command again to resume") from e
      log.warning("skipping row %d (%s): %s", i, _ref_str(ref), e)
      skipped.append(i)
    else:
      imgs.append(img)
      metas.append(meta)
      if len(imgs) == batch_size:
        flush()
    bar.update(1)

  try:
    for i, (ref, base, meta) in enumerate(rows.rows(lo, hi), start=lo):
      pending.append((i, ref, pool.submit(preprocess_image, ref, resolution, resize, base), meta))
      if len(pending) >= 4 * batch_size:
        drain_one()
    while pending:
      drain_one()
    flush()
  finally:
    writer.close()
  return written, skipped, names


def tokenize_images(tokenizer, input_path: str, output_dir: str, *, resolution: int = 256, resize: str = "clip",
                    batch_size: int = 16, shard_size: int = 2048, text_field: str = "text",
                    image_field: str | None = None, num_threads: int = 8, skip_bad: bool = False,
                    overwrite: bool = False, restart: bool = False, progress: bool = True,
                    tokenizer_path: str | None = None) -> dict[str, Any]:
  """Encodes every image of ``input_path`` once and writes token shards to ``output_dir``.

  Args:
    tokenizer: an ``ImageTokenizer`` (``encode(float [B, R, R, 3] in [-1, 1]) -> int32 [B, h*w]``).
    resolution: R in pixels (a multiple of the tokenizer's downsampling factor).
    resize: ``clip`` | ``squash`` | ``pad_white`` (:mod:`mmada_jax.data.images`).
    batch_size: images per ``encode`` call (the last batch is padded, so one compiled shape).
    shard_size: input rows per ArrayRecord shard (also the resume granularity).
    skip_bad: log and skip images that fail to load instead of stopping.
    overwrite: replace a complete ``output_dir``. restart: discard an incompatible partial run.
  Returns:
    The manifest dict (also written to ``output_dir/manifest.json``).
  Raises:
    FileExistsError: ``output_dir`` is complete (no ``overwrite``) or a partial run with other
      settings exists (no ``restart``). RuntimeError: an image failed (``skip_bad`` off); the
      finished shards stay in ``output_dir.partial`` for a resume.
  """
  from tqdm.auto import tqdm

  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  f = tokenizer.config.downsample_factor
  if resolution <= 0 or resolution % f:
    raise ValueError(f"resolution {resolution} must be a positive multiple of the tokenizer's downsampling factor {f}")
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be >= 1")
  if tokenizer.config.codebook_size > 65536:
    raise ValueError(f"codebook of {tokenizer.config.codebook_size} codes does not fit the uint16 storage")
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    what = "a complete token-shard folder" if os.path.isfile(os.path.join(output_dir, records.MANIFEST_NAME)) \
        else "something"
    raise FileExistsError(f"--output {output_dir!r} already exists ({what}); pass --overwrite to rebuild it")

  rows = InputRows(input_path, text_field=text_field, image_field=image_field)
  n_rows = len(rows)
  n_shards = math.ceil(n_rows / shard_size)
  grid = tokenizer.grid_size(resolution, resolution)
  fingerprint = tokenizer_fingerprint(tokenizer)
  settings = {"input": rows.describe(), "input_rows": n_rows, "resolution": resolution, "resize": resize,
              "shard_size": shard_size, "text_field": text_field, "image_field": image_field,
              "skip_bad": skip_bad, "config_hash": fingerprint["config_hash"],
              "params_hash": fingerprint["params_hash"]}

  partial = _partial_dir(output_dir)
  state = {"settings": settings, "shards": [], "skipped": []}
  progress_path = os.path.join(partial, PROGRESS_NAME)
  if os.path.isdir(partial):
    old = None
    if os.path.isfile(progress_path):
      with open(progress_path, encoding="utf-8") as fh:
        old = json.load(fh)
    if old is not None and old.get("settings") == settings:
      state = old
      log.info("resuming %s after %d of %d shards", partial, len(state["shards"]), n_shards)
    elif restart:
      shutil.rmtree(partial)
    else:
      diff = sorted(k for k in settings if old is None or old.get("settings", {}).get(k) != settings[k])
      raise FileExistsError(f"a partial run with different settings ({', '.join(diff) or 'no progress file'}) "
                            f"exists at {partial!r}; pass --restart to discard it")
  os.makedirs(partial, exist_ok=True)
  records.write_json_atomic(progress_path, state)

  done_shards = len(state["shards"])
  start_row = min(done_shards * shard_size, n_rows)
  bar = tqdm(total=n_rows, initial=start_row, unit="img", desc="tokenize", disable=not progress,
             file=sys.stderr)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
  try:
    for shard in range(done_shards, n_shards):
      lo, hi = shard * shard_size, min((shard + 1) * shard_size, n_rows)
      name = records.shard_name(shard, n_shards)
      written, skipped, fields = _write_shard(tokenizer, rows, lo, hi, os.path.join(partial, name), pool, bar,
                                              resolution=resolution, resize=resize, batch_size=batch_size,
                                              skip_bad=skip_bad)
      state["shards"].append({"file": name, "count": written, "rows": [lo, hi]})
      state["skipped"].extend(skipped)
      state["text_fields"] = sorted(set(state.get("text_fields", [])) | fields)
      records.write_json_atomic(progress_path, state)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()

  count = sum(s["count"] for s in state["shards"])
  manifest = {
      "format": records.FORMAT_NAME, "version": records.FORMAT_VERSION, "count": count,
      "num_tokens": grid[0] * grid[1], "grid": list(grid), "codebook_size": tokenizer.config.codebook_size,
      "code_dtype": "uint16", "resolution": resolution, "resize": resize,
      "shards": [{"file": s["file"], "count": s["count"]} for s in state["shards"]],
      "text_fields": state.get("text_fields", []), "skipped_rows": state["skipped"],
      "tokenizer": dict(fingerprint, path=tokenizer_path), "source": rows.describe(),
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  records.write_json_atomic(os.path.join(partial, records.MANIFEST_NAME), manifest)
  if os.path.exists(output_dir):  # overwrite: swap, then remove the old folder
    old = f"{output_dir}.old{os.getpid()}"
    os.rename(output_dir, old)
    os.rename(partial, output_dir)
    shutil.rmtree(old)
  else:
    os.rename(partial, output_dir)
  os.remove(os.path.join(output_dir, PROGRESS_NAME))
  return manifest


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.data.tokenize_images", description=__doc__.split("\n")[0])
  p.add_argument("--tokenizer", required=True, help="ImageTokenizer folder (config.json + safetensors)")
  p.add_argument("--input", required=True, help="image folder, .jsonl or .parquet")
  p.add_argument("--output", required=True, help="output token-shard folder (must not exist)")
  p.add_argument("--resolution", type=int, default=256, help="square side R in pixels (256 -> 16x16 codes)")
  p.add_argument("--resize", choices=RESIZE_MODES, default="clip")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--shard-size", type=int, default=2048, help="input rows per shard (resume granularity)")
  p.add_argument("--text-field", default="text")
  p.add_argument("--image-field", default=None)
  p.add_argument("--num-threads", type=int, default=8, help="image decode/resize threads")
  p.add_argument("--dtype", default="float32", help="tokenizer parameter and compute dtype")
  p.add_argument("--skip-bad", action="store_true", help="skip images that fail to load")
  p.add_argument("--overwrite", action="store_true", help="replace a complete --output")
  p.add_argument("--restart", action="store_true", help="discard a partial run with other settings")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  tok = ImageTokenizer.from_pretrained(args.tokenizer, param_dtype=args.dtype, dtype=args.dtype)
  try:
    manifest = tokenize_images(tok, args.input, args.output, resolution=args.resolution, resize=args.resize,
                               batch_size=args.batch_size, shard_size=args.shard_size, text_field=args.text_field,
                               image_field=args.image_field, num_threads=args.num_threads, skip_bad=args.skip_bad,
                               overwrite=args.overwrite, restart=args.restart, progress=not args.quiet,
                               tokenizer_path=os.path.abspath(args.tokenizer))
  except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {manifest['count']} images ({manifest['grid'][0]}x{manifest['grid'][1]} codes) in "
        f"{len(manifest['shards'])} shards to {os.path.abspath(args.output)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

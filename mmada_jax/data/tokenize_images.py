"""Pre-tokenise images once with the MAGVIT-v2 tokenizer into ArrayRecord token shards.

Command::

  python -m mmada_jax.data.tokenize_images --tokenizer DIR --input SRC --output OUT \\
      [--resolution 256] [--resize clip|squash|pad_white] [--batch-size 16] [--shard-size 2048]

SRC (see :mod:`mmada_jax.data.image_inputs`): webdataset tar shards (``shards/{00000..01242}.tar``,
one output shard per tar), ImageNet-style class folders with ``--class-names FILE``, LLaVA JSON
(``--image-root`` for its images), an image folder with ``metadata.jsonl`` / sidecar ``.txt``
captions, a ``.jsonl`` or ``.parquet`` (image column: paths, bytes or ``{"bytes", "path"}``;
``--shard-size`` rows per output shard). The caption is read from ``--text-field`` (default
``text``, falling back to ``caption``) and stored as ``text``; every other JSON-able column
(``conversations``, ``id``, ``label``, ...) is kept.

Bad input (a file that is not an image, a missing image, a line that is not JSON, a tar member
without its image, a truncated tar) is skipped and counted per reason, with the first few paths,
in the manifest's ``skipped``; ``--strict`` stops at the first instead.

Many hosts: every process takes the output shards ``i`` with ``i % process_count ==
process_index`` (from ``jax.distributed`` when initialised, e.g. via ``--coordinator-address``
``--num-processes --process-id``, or from ``--process-index/--process-count`` for independent
jobs) and encodes data-parallel over its local devices; images are decoded and resized in a
thread pool (``--num-threads``, default: the cores). Process 0 writes the one manifest once every
shard is finished (after a barrier, or by waiting for the other jobs' shards).

Output (see :mod:`mmada_jax.data.records`): ``OUT/tokens-*.array_record`` and
``OUT/manifest.json``. The work is done in ``OUT.partial/``: each shard is written under a
temporary name, renamed, then marked done by a ``<shard>.done.json`` beside it; OUT appears only
when complete, so it is never half-written. Running the same command again resumes with the
unfinished shards (with any process count); different settings are refused unless ``--restart``.
An existing complete OUT is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Sequence

import numpy as np

from mmada_jax.data import records
from mmada_jax.data.image_inputs import BadRow, Unit, open_inputs
from mmada_jax.data.images import RESIZE_MODES, preprocess_image

log = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"
DONE_SUFFIX = ".done.json"
MAX_EXAMPLES = 5


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


# ---- bad-input accounting ----------------------------------------------------------------------

def image_error_reason(e: BaseException) -> str:
  """A short reason word for an image that failed to load."""
  from PIL import Image, UnidentifiedImageError
  if isinstance(e, Image.DecompressionBombError):
    return "image_too_large"
  if isinstance(e, FileNotFoundError):
    return "image_not_found"
  if isinstance(e, UnidentifiedImageError):
    return "not_an_image"
  if isinstance(e, (OSError, SyntaxError)):
    return "corrupt_image"
  return "unreadable_image"


def add_skip(skipped: dict[str, Any], reason: str, where: str, detail: str, count: int = 1) -> None:
  """Counts one skipped input under ``reason`` (keeping the first few ``where``/``detail``)."""
  entry = skipped.setdefault(reason, {"count": 0, "examples": []})
  entry["count"] += count
  if len(entry["examples"]) < MAX_EXAMPLES:
    entry["examples"].append({"where": where, "detail": detail[:300]})


def merge_skips(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per-shard skip tables -> one ``{reason: {"count", "examples"}}`` (examples in shard order)."""
  out: dict[str, Any] = {}
  for part in parts:
    for reason, entry in sorted(part.items()):
      tgt = out.setdefault(reason, {"count": 0, "examples": []})
      tgt["count"] += entry["count"]
      tgt["examples"].extend(entry["examples"][:MAX_EXAMPLES - len(tgt["examples"])])
  return dict(sorted(out.items()))


# ---- processes ---------------------------------------------------------------------------------

def resolve_processes(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int, bool]:
  """``(index, count, distributed)``: jax.distributed's when initialised (explicit values must
  agree), else the given ones (default 0 of 1)."""
  import jax
  if jax.process_count() > 1:
    pi, pc = jax.process_index(), jax.process_count()
    if (process_index is not None and process_index != pi) or (process_count is not None and process_count != pc):
      raise ValueError(f"--process-index/--process-count {process_index}/{process_count} disagree with "
                       f"jax.distributed ({pi} of {pc})")
    return pi, pc, True
  pi = 0 if process_index is None else int(process_index)
  pc = 1 if process_count is None else int(process_count)
  if pc < 1 or not 0 <= pi < pc:
    raise ValueError(f"process index {pi} must lie in [0, {pc})")
  return pi, pc, False


def local_data_mesh():
  """A data-parallel mesh over this process's devices (None for a single device)."""
  import jax
  from mmada_jax.sharding import make_mesh
  devices = jax.local_devices()
  return None if len(devices) == 1 else make_mesh(f"data={len(devices)}", devices=devices)


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _wait_for(test, what: str, timeout: float, poll: float) -> None:
  deadline = time.monotonic() + timeout
  while not test():
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {timeout:.0f} s for {what}")
    time.sleep(poll)


# ---- main routine ----------------------------------------------------------------------------

def _partial_dir(output_dir: str) -> str:
  return os.path.abspath(output_dir).rstrip(os.sep) + ".partial"


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as fh:
      return json.load(fh)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _write_shard(tokenizer, unit: Unit, path: str, pool, bar, *, resolution: int, resize: str, batch_size: int,
                 skip_bad: bool, tmp_tag: str) -> dict[str, Any]:
  """Encodes one unit into one ArrayRecord file (under a temporary name, then renamed); returns
  ``{"count", "skipped", "text_fields"}``. Images are loaded in ``pool`` with a look-ahead of 4
  batches; each encode call gets a batch padded to a multiple of the tokenizer mesh's size."""
  from array_record.python.array_record_module import ArrayRecordWriter

  mesh = getattr(tokenizer, "mesh", None)
  ndev = 1 if mesh is None else int(mesh.size)
  padded = -(-batch_size // ndev) * ndev
  tmp = f"{path}.tmp-{tmp_tag}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  written, skipped, names = 0, {}, set()
  pending: collections.deque = collections.deque()
  imgs: list[np.ndarray] = []
  metas: list[dict[str, Any]] = []

  def flush():
    nonlocal written
    if not imgs:
      return
    x = np.stack(imgs)
    if len(imgs) < padded:  # one compiled shape for every call
      x = np.concatenate([x, np.zeros((padded - len(imgs),) + x.shape[1:], np.float32)])
    codes = np.asarray(tokenizer.encode(x))[:len(imgs)]
    for c, m in zip(codes, metas):
      writer.write(records.encode_record(c, m))
      names.update(m)
    written += len(imgs)
    imgs.clear()
    metas.clear()

  def bad(reason: str, where: str, detail: str, exc: BaseException | None = None):
    if not skip_bad:
      raise RuntimeError(f"{reason}: {where}: {detail}; fix or remove it (or drop --strict) and run the same "
                         "command again to resume") from exc
    log.warning("skipping %s (%s): %s", where, reason, detail)
    add_skip(skipped, reason, where, detail)

  def drain_one():
    where, fut, meta = pending.popleft()
    try:
      img = fut.result()
    except Exception as e:  # noqa: BLE001 - counted with its path and reason
      bad(image_error_reason(e), where, f"{type(e).__name__}: {e}", e)
    else:
      imgs.append(img)
      metas.append(meta)
      if len(imgs) == batch_size:
        flush()
    bar.update(1)

  ok = False
  try:
    for row in unit.rows():
      if isinstance(row, BadRow):
        bad(row.reason, row.where, row.detail)
        bar.update(1)
        continue
      pending.append((row.where, pool.submit(preprocess_image, row.ref, resolution, resize, row.base), row.fields))
      if len(pending) >= 4 * batch_size:
        drain_one()
    while pending:
      drain_one()
    flush()
    ok = True
  finally:
    writer.close()
    if ok:
      os.replace(tmp, path)
    elif os.path.exists(tmp):
      os.remove(tmp)
  return {"count": written, "skipped": skipped, "text_fields": sorted(names)}


def tokenize_images(tokenizer, input_path: str, output_dir: str, *, resolution: int = 256, resize: str = "clip",
                    batch_size: int = 16, shard_size: int = 2048, text_field: str = "text",
                    image_field: str | None = None, class_names: str | None = None, image_root: str | None = None,
                    num_threads: int | None = None, skip_bad: bool = True, overwrite: bool = False,
                    restart: bool = False, progress: bool = True, tokenizer_path: str | None = None,
                    process_index: int | None = None, process_count: int | None = None,
                    wait_timeout: float = 7 * 86400.0, poll_interval: float = 1.0) -> dict[str, Any]:
  """Encodes every image of ``input_path`` once and writes token shards to ``output_dir``.

  Args:
    tokenizer: an ``ImageTokenizer`` (``encode(float [B, R, R, 3] in [-1, 1]) -> int32 [B, h*w]``);
      with a mesh (:func:`local_data_mesh`) each batch is split over its devices.
    resolution: R in pixels (a multiple of the tokenizer's downsampling factor).
    resize: ``clip`` | ``squash`` | ``pad_white`` (:mod:`mmada_jax.data.images`).
    batch_size: images per ``encode`` call (the last batch is padded, so one compiled shape).
    shard_size: input rows per output shard for row-indexed inputs (tar inputs: one shard per tar).
    class_names / image_root: see :func:`mmada_jax.data.image_inputs.open_inputs`.
    num_threads: decode/resize threads (None: ``os.cpu_count()``).
    skip_bad: count and skip bad input (default) instead of stopping at the first.
    overwrite: replace a complete ``output_dir``. restart: discard an incompatible partial run.
    process_index / process_count: this job's share when ``jax.distributed`` is not initialised.
    wait_timeout: how long process 0 waits for the other processes' shards (and the others for
      process 0's settings) when there is no ``jax.distributed`` barrier.
  Returns:
    The manifest dict (also written to ``output_dir/manifest.json``); an independent job other
    than process 0 returns ``{"process_index", "process_count", "shards"}`` (the shards it wrote).
  Raises:
    FileExistsError: ``output_dir`` is complete (no ``overwrite``) or a partial run with other
      settings exists (no ``restart``). RuntimeError: bad input with ``skip_bad`` off; the
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
  pi, pc, distributed = resolve_processes(process_index, process_count)
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    what = "a complete token-shard folder" if os.path.isfile(os.path.join(output_dir, records.MANIFEST_NAME)) \
        else "something"
    raise FileExistsError(f"--output {output_dir!r} already exists ({what}); pass --overwrite to rebuild it")

  inputs = open_inputs(input_path, text_field=text_field, image_field=image_field, class_names=class_names,
                       image_root=image_root, shard_size=shard_size)
  units = inputs.units
  n_shards = len(units)
  names = [records.shard_name(i, n_shards) for i in range(n_shards)]
  grid = tokenizer.grid_size(resolution, resolution)
  fingerprint = tokenizer_fingerprint(tokenizer)
  settings = {"input": inputs.describe(), "units": [u.name for u in units], "resolution": resolution,
              "resize": resize, "text_field": text_field, "image_field": image_field,
              "class_names": None if class_names is None else os.path.abspath(class_names),
              "image_root": None if image_root is None else os.path.abspath(image_root), "skip_bad": skip_bad,
              "config_hash": fingerprint["config_hash"], "params_hash": fingerprint["params_hash"]}

  partial = _partial_dir(output_dir)
  settings_path = os.path.join(partial, SETTINGS_NAME)
  if pi == 0:
    if os.path.isdir(partial):
      old = _read_json(settings_path)
      if old == settings:
        log.info("resuming %s", partial)
      elif restart:
        shutil.rmtree(partial)
      else:
        diff = sorted(k for k in settings if old is None or old.get(k) != settings[k])
        raise FileExistsError(f"a partial run with different settings ({', '.join(diff) or 'no settings file'}) "
                              f"exists at {partial!r}; pass --restart to discard it")
    os.makedirs(partial, exist_ok=True)
    records.write_json_atomic(settings_path, settings)
  if distributed:
    _barrier("mmada_tokenize_images:setup")
  if pi != 0:
    if not os.path.exists(partial):  # an independent job that starts first
      os.makedirs(partial, exist_ok=True)
      records.write_json_atomic(settings_path, settings)
    _wait_for(lambda: _read_json(settings_path) == settings, f"{partial!r} to hold these settings (process 0 "
              "discards other ones with --restart)", wait_timeout, poll_interval)

  def done(i: int) -> bool:
    return os.path.isfile(os.path.join(partial, names[i] + DONE_SUFFIX)) and \
        os.path.isfile(os.path.join(partial, names[i]))

  mine = [i for i in range(n_shards) if i % pc == pi and not done(i)]
  log.info("process %d of %d: %d of %d shards to write", pi, pc, len(mine), n_shards)
  bar = tqdm(unit="img", desc=f"tokenize p{pi}", disable=not progress, file=sys.stderr)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads or os.cpu_count() or 1))
  try:
    for i in mine:
      info = _write_shard(tokenizer, units[i], os.path.join(partial, names[i]), pool, bar, resolution=resolution,
                          resize=resize, batch_size=batch_size, skip_bad=skip_bad, tmp_tag=f"p{pi}")
      records.write_json_atomic(os.path.join(partial, names[i] + DONE_SUFFIX), dict(info, source=units[i].name))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()

  if distributed:
    _barrier("mmada_tokenize_images:shards")
  if pi != 0:
    if distributed:
      _barrier("mmada_tokenize_images:manifest")
      return records.read_manifest(output_dir)
    return {"process_index": pi, "process_count": pc, "shards": [names[i] for i in mine]}
  _wait_for(lambda: all(done(i) for i in range(n_shards)), f"the {n_shards} shards of all {pc} processes",
            wait_timeout, poll_interval)

  infos = [_read_json(os.path.join(partial, n + DONE_SUFFIX)) for n in names]
  skipped = merge_skips([x["skipped"] for x in infos])
  manifest = {
      "format": records.FORMAT_NAME, "version": records.FORMAT_VERSION, "count": sum(x["count"] for x in infos),
      "num_tokens": grid[0] * grid[1], "grid": list(grid), "codebook_size": tokenizer.config.codebook_size,
      "code_dtype": "uint16", "resolution": resolution, "resize": resize,
      "shards": [{"file": n, "count": x["count"], "source": x["source"]} for n, x in zip(names, infos)],
      "text_fields": sorted(set().union(*[x["text_fields"] for x in infos])),
      "skipped": {"count": sum(e["count"] for e in skipped.values()), "reasons": skipped},
      "tokenizer": dict(fingerprint, path=tokenizer_path), "source": inputs.describe(),
      "processes": pc, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if manifest["skipped"]["count"]:
    log.warning("skipped %d inputs: %s", manifest["skipped"]["count"],
                ", ".join(f"{r} {e['count']}" for r, e in skipped.items()))
  records.write_json_atomic(os.path.join(partial, records.MANIFEST_NAME), manifest)
  if os.path.exists(output_dir):  # overwrite: swap, then remove the old folder
    old = f"{output_dir}.old{os.getpid()}"
    os.rename(output_dir, old)
    os.rename(partial, output_dir)
    shutil.rmtree(old)
  else:
    os.rename(partial, output_dir)
  for n in os.listdir(output_dir):
    if n.endswith(DONE_SUFFIX) or n == SETTINGS_NAME:
      os.remove(os.path.join(output_dir, n))
  if distributed:
    _barrier("mmada_tokenize_images:manifest")
  return manifest


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.data.tokenize_images", description=__doc__.split("\n")[0])
  p.add_argument("--tokenizer", required=True, help="ImageTokenizer folder (config.json + safetensors)")
  p.add_argument("--input", required=True, help="tar shards / brace pattern, image folder, .jsonl, .json or .parquet")
  p.add_argument("--output", required=True, help="output token-shard folder (must not exist)")
  p.add_argument("--resolution", type=int, default=256, help="square side R in pixels (256 -> 16x16 codes)")
  p.add_argument("--resize", choices=RESIZE_MODES, default="clip")
  p.add_argument("--batch-size", type=int, default=16, help="images per encode call (per process)")
  p.add_argument("--shard-size", type=int, default=2048, help="input rows per shard for row-indexed inputs")
  p.add_argument("--text-field", default="text")
  p.add_argument("--image-field", default=None)
  p.add_argument("--class-names", default=None, help="caption table of ImageNet-style class folders")
  p.add_argument("--image-root", default=None, help="folder the image paths of a .json/.jsonl are relative to")
  p.add_argument("--num-threads", type=int, default=None, help="decode/resize threads (default: the cores)")
  p.add_argument("--dtype", default="float32", help="tokenizer parameter and compute dtype")
  p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of counting it")
  p.add_argument("--overwrite", action="store_true", help="replace a complete --output")
  p.add_argument("--restart", action="store_true", help="discard a partial run with other settings")
  p.add_argument("--process-index", type=int, default=None, help="this job's index (without jax.distributed)")
  p.add_argument("--process-count", type=int, default=None, help="number of jobs (without jax.distributed)")
  p.add_argument("--coordinator-address", default=None, help="jax.distributed coordinator HOST:PORT")
  p.add_argument("--num-processes", type=int, default=None, help="jax.distributed process count")
  p.add_argument("--process-id", type=int, default=None, help="jax.distributed process id")
  p.add_argument("--wait-timeout", type=float, default=7 * 86400.0, help="seconds to wait for the other jobs")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  import jax
  if args.coordinator_address:
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  tok = ImageTokenizer.from_pretrained(args.tokenizer, param_dtype=args.dtype, dtype=args.dtype,
                                       mesh=local_data_mesh())
  try:
    manifest = tokenize_images(tok, args.input, args.output, resolution=args.resolution, resize=args.resize,
                               batch_size=args.batch_size, shard_size=args.shard_size, text_field=args.text_field,
                               image_field=args.image_field, class_names=args.class_names,
                               image_root=args.image_root, num_threads=args.num_threads, skip_bad=not args.strict,
                               overwrite=args.overwrite, restart=args.restart, progress=not args.quiet,
                               tokenizer_path=os.path.abspath(args.tokenizer), process_index=args.process_index,
                               process_count=args.process_count, wait_timeout=args.wait_timeout)
  except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "count" not in manifest:
    print(f"process {manifest['process_index']} of {manifest['process_count']}: wrote "
          f"{len(manifest['shards'])} shards; process 0 writes the manifest")
    return 0
  print(f"wrote {manifest['count']} images ({manifest['grid'][0]}x{manifest['grid'][1]} codes) in "
        f"{len(manifest['shards'])} shards to {os.path.abspath(args.output)}; skipped "
        f"{manifest['skipped']['count']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

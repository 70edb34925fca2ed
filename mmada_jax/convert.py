"""Checkpoint converter.

  python -m mmada_jax.convert to-orbax  SRC DST [--dtype bfloat16]   # original HF layout -> ours
  python -m mmada_jax.convert to-hf     SRC DST [--dtype bfloat16] [--max-shard-size 5GB]
  python -m mmada_jax.convert inspect   SRC                             # architecture + tensor table

SRC may be an original Hugging Face directory (config.json + model.safetensors or shards +
index) or an Orbax directory written by ``to-orbax``; its saved generation config
(generation_config.json's ``mmada_jax`` section) is carried over. Tensors are read one at a time; the
output is written to a temporary directory and renamed when complete, so an error (a missing or
mis-shaped tensor, a corrupt file) leaves nothing half-written at DST.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

from mmada_jax.checkpoint import generation_file, hf_mmada, orbax_io
from mmada_jax.checkpoint.safetensors_io import CheckpointError


def _parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (e.g. 5GB, 500MB)")
  unit = (m.group(2) or "B").upper().replace("IB", "B")
  scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "K": 2**10, "M": 2**20,
           "G": 2**30, "T": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _load(src: str, dtype: str | None):
  if orbax_io.is_orbax_model_dir(src):
    return orbax_io.load_params(src, dtype)
  return hf_mmada.load_hf_checkpoint(src, dtype, progress=True)


def _prepare_dst(dst: str, overwrite: bool) -> None:
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not overwrite:
    raise FileExistsError(f"destination {dst} exists and is not empty (use --overwrite)")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  for name, hlp in (("to-orbax", "original HF layout (or Orbax) -> Orbax"),
                    ("to-hf", "Orbax (or original HF layout) -> original HF layout")):
    s = sub.add_parser(name, help=hlp)
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype of the output (default: keep the source's)")
    s.add_argument("--overwrite", action="store_true")
    if name == "to-hf":
      s.add_argument("--max-shard-size", type=_parse_size, default=_parse_size("5GB"))
  s = sub.add_parser("inspect", help="print the architecture and parameter table")
  s.add_argument("src")
  args = p.parse_args(argv)

  try:
    if args.cmd == "inspect":
      params, cfg = _load(args.src, None)
      print(json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, indent=2))
      import jax
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        print(f"{'/'.join(k.key for k in path):24s} {str(tuple(leaf.shape)):28s} {leaf.dtype}")
      print(f"parameters: {cfg.num_params():,}")
      return 0
    _prepare_dst(args.dst, args.overwrite)
    t0 = time.time()
    params, cfg = _load(args.src, args.dtype)
    base = hf_mmada.read_hf_config(args.src)
    generation = generation_file.read_section(args.src)     # carried over when the source has one
    if args.cmd == "to-orbax":
      orbax_io.save_params(params, cfg, args.dst, hf_config=base, generation_config=generation,
                           overwrite=args.overwrite)
    else:
      tmp = os.path.abspath(args.dst) + ".partial"
      shutil.rmtree(tmp, ignore_errors=True)
      try:
        hf_mmada.save_hf_checkpoint(params, cfg, tmp, dtype=args.dtype, base_config=base,
                                    generation_config=generation, max_shard_bytes=args.max_shard_size,
                                    progress=True)
        if os.path.exists(args.dst):
          shutil.rmtree(args.dst)
        os.replace(tmp, args.dst)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.dst} ({cfg.num_params():,} parameters, {cfg.param_dtype}) in {time.time() - t0:.1f}s")
    return 0
  except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

"""Checkpoint converter.

  python -m mmada_jax.convert to-orbax   SRC DST [--dtype bfloat16]   # original HF layout -> ours
  python -m mmada_jax.convert to-hf      SRC DST [--dtype bfloat16] [--max-shard-size 5GB]
                                         [--text-tokenizer TOK] [--image-tokenizer MAGVIT]
                                         [--merge-lora LORA_RUN]        # SRC = the adapters' base
  python -m mmada_jax.convert export-run RUN_DIR DST [--dtype ...]     # a demo run -> one folder
  python -m mmada_jax.convert inspect    SRC                            # architecture + tensor table

SRC may be an original Hugging Face directory (config.json + model.safetensors or shards +
index) or an Orbax directory written by ``to-orbax``; its saved generation config
(generation_config.json's ``mmada_jax`` section) is carried over. ``to-hf`` writes a config.json
with every field the original's model classes read (``hf_mmada.ORIGINAL_CONFIG_FIELDS``), for a
model trained here from scratch as for an imported one. With ``--text-tokenizer`` (a
tokenizer.json or its folder) the tokenizer's files (tokenizer.json, tokenizer_config.json with the
chat template, special_tokens_map.json) go beside the weights, and with ``--image-tokenizer`` (a
MAGVIT-v2 folder) the tokenizer goes to DST/image_tokenizer/ in the original's layout: the folder
the original's inference scripts load. ``export-run RUN_DIR`` does this for a demo run directory
(RUN_DIR/model, RUN_DIR/text_tokenizer and, when present, RUN_DIR/image_tokenizer).
``to-hf --merge-lora LORA_RUN`` (a LoRA / QLoRA training workdir, its checkpoints directory or
one step directory) writes SRC with the run's adapters merged in (``W + A·B·α/r``; a QLoRA base
dequantized first, as the adapters were trained on it): SRC must be the base the run was
trained on (its content hash is checked against the checkpoint's).

Tensors are read one at a time; the output is written to a temporary directory and renamed when
complete, so an error (a missing or mis-shaped tensor, a corrupt file, a tokenizer that does not
belong to the model) leaves nothing half-written at DST.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable

from mmada_jax.checkpoint import generation_file, hf_mmada, magvit, orbax_io
from mmada_jax.checkpoint.safetensors_io import CheckpointError
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.text_tokenizer import TextTokenizer

IMAGE_TOKENIZER_DIR = hf_mmada.IMAGE_TOKENIZER_DIR
RUN_PARTS = ("model", "text_tokenizer", "image_tokenizer")
"""A demo run directory's artefacts that ``export-run`` reads (the last one optional)."""


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


def _companions(cfg: MMaDAConfig, text_tokenizer: str | None, image_tokenizer: str | None,
                where: str) -> list[Callable[[str], Any]]:
  """Loads (and checks against the model) the tokenizers to write beside the weights; returns
  the writers for ``hf_mmada.export_pretrained``."""
  out: list[Callable[[str], Any]] = []
  tok = None
  if text_tokenizer is not None:
    try:
      tok = TextTokenizer.from_file(text_tokenizer)
    except (FileNotFoundError, ValueError):
      raise
    except Exception as e:      # noqa: BLE001  (the tokenizers library's parse errors)
      raise ValueError(f"cannot load the text tokenizer {text_tokenizer}: {e}") from e
    out.append(tok.save)
  codebook = None
  if image_tokenizer is not None:
    if not os.path.isdir(image_tokenizer):
      raise FileNotFoundError(f"image tokenizer directory not found: {image_tokenizer}")
    mcfg, mparams = magvit.load_pretrained(image_tokenizer)
    codebook = mcfg.codebook_size
    out.append(lambda d: magvit.save_pretrained(mcfg, mparams, os.path.join(d, IMAGE_TOKENIZER_DIR)))
  hf_mmada.check_companions(cfg, tok, codebook, where=where)
  return out


def _run_parts(run_dir: str) -> tuple[str, str, str | None]:
  """(model, text tokenizer, image tokenizer or None) of a demo run directory."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"run directory not found: {run_dir}")
  model, text, image = (os.path.join(run_dir, p) for p in RUN_PARTS)
  for path, what in ((model, "the saved model"), (text, "the text tokenizer")):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{run_dir} has no {os.path.basename(path)}/ ({what}); export-run takes a "
                              f"demo run directory (python -m mmada_jax.demo --workdir RUN_DIR)")
  return model, text, image if os.path.isdir(image) else None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  for name, hlp in (("to-orbax", "original HF layout (or Orbax) -> Orbax"),
                    ("to-hf", "Orbax (or original HF layout) -> original HF layout"),
                    ("export-run", "a demo run directory -> one folder in the original's layout")):
    s = sub.add_parser(name, help=hlp)
    s.add_argument("run_dir" if name == "export-run" else "src")
    s.add_argument("dst")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype of the output (default: keep the source's)")
    s.add_argument("--overwrite", action="store_true")
    if name != "to-orbax":
      s.add_argument("--max-shard-size", type=_parse_size, default=_parse_size("5GB"))
    if name == "to-hf":
      s.add_argument("--text-tokenizer", default=None,
                     help="tokenizer.json (or its folder) to write beside the weights")
      s.add_argument("--image-tokenizer", default=None,
                     help=f"MAGVIT-v2 folder to write to DST/{IMAGE_TOKENIZER_DIR}/")
      s.add_argument("--merge-lora", default=None, metavar="LORA_RUN",
                     help="a LoRA training workdir / checkpoint whose adapters are merged into SRC (its base)")
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
    text_tok = image_tok = None
    if args.cmd == "export-run":
      args.src, text_tok, image_tok = _run_parts(args.run_dir)
    elif args.cmd == "to-hf":
      text_tok, image_tok = args.text_tokenizer, args.image_tokenizer
    companions = []
    if args.cmd != "to-orbax":      # tokenizers are checked against config.json before the weights load
      arch = MMaDAConfig.from_hf_config(hf_mmada.read_hf_config(args.src))
      companions = _companions(arch, text_tok, image_tok, args.cmd)
    params, cfg = _load(args.src, args.dtype)
    if args.cmd == "to-hf" and args.merge_lora:
      from mmada_jax.train.lora import merge_checkpoint
      params = merge_checkpoint(params, cfg, args.merge_lora)
    base = hf_mmada.read_hf_config(args.src)
    generation = generation_file.read_section(args.src)     # carried over when the source has one
    if args.cmd == "to-orbax":
      orbax_io.save_params(params, cfg, args.dst, hf_config=base, generation_config=generation,
                           overwrite=args.overwrite)
    else:
      hf_mmada.export_pretrained(params, cfg, args.dst, dtype=args.dtype, base_config=base,
                                 generation_config=generation, companions=companions,
                                 max_shard_bytes=args.max_shard_size, progress=True, overwrite=args.overwrite)
    print(f"wrote {args.dst} ({cfg.num_params():,} parameters, {cfg.param_dtype}) in {time.time() - t0:.1f}s")
    return 0
  except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

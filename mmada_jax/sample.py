"""Sampling command: text, image understanding and text-to-image from a saved model.

  python -m mmada_jax.sample --model DIR --text-tokenizer PATH [--image-tokenizer DIR] \\
      [--mesh-shape fsdp=4,tensor=2] [--param-dtype bfloat16] [--dtype bfloat16] [--seed 0] \\
      text   [PROMPT ...] [--prompts-file FILE] [--raw] [sampler options]
      answer QUESTION [...] --image PATH [--image PATH ...] [sampler options]
      image  [PROMPT ...] [--prompts-file FILE] --out DIR [--steps 15 --guidance-scale 3.5 ...]

DIR is a model directory (ours or the original Hugging Face layout); PATH a ``tokenizer.json``
(or its folder). Prompts come from the arguments and/or a file (one per line, blank lines
skipped) and run as one batch. Every sampler option left out takes the model's saved generation
config (``generation_config.json``; derived and logged for a checkpoint without one). ``text``
and ``answer`` print one answer per prompt (``--json``: one JSON object per line); ``answer``
takes one question per image, or one question for every image; ``image`` writes
``DIR/000.png, 001.png, …`` and prints their paths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
  """A bad command line (missing file, no prompt, …): printed as ``error: …``, exit status 2."""


def _add_text_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--gen-length", type=int, help="tokens to generate")
  p.add_argument("--block-length", type=int, help="semi-autoregressive block size (divides gen-length)")
  p.add_argument("--steps", type=int, help="total denoising steps (a multiple of the block count)")
  p.add_argument("--temperature", type=float, help="Gumbel temperature (0 = greedy)")
  p.add_argument("--remasking", choices=("low_confidence", "random"))
  p.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight (0 = off)")
  p.add_argument("--cache", choices=("none", "prefix", "dual"), help="approximate KV cache")
  p.add_argument("--threshold", type=float, help="parallel decoding: commit every token above it")
  p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _add_prompts(p: argparse.ArgumentParser, what: str) -> None:
  p.add_argument("prompts", nargs="*", metavar=what.upper(), help=f"{what}s (one batch)")
  p.add_argument("--prompts-file", help=f"a file with one {what} per line")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.sample", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="model directory (Orbax or original HF layout)")
  p.add_argument("--text-tokenizer", required=True, help="tokenizer.json or a folder holding one")
  p.add_argument("--image-tokenizer", help="MAGVIT-v2 folder (needed by answer and image)")
  p.add_argument("--mesh-shape", default="", help="e.g. fsdp=4,tensor=2 (default: one device)")
  p.add_argument("--param-dtype", choices=DTYPES, help="parameter storage dtype (default: as stored)")
  p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the parameter dtype)")
  p.add_argument("--seed", type=int, default=0)
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("text", help="text generation (chat template)")
  _add_prompts(t, "prompt")
  t.add_argument("--raw", action="store_true", help="raw text after BOS instead of the chat template")
  _add_text_options(t)
  a = sub.add_parser("answer", help="answer questions about images")
  _add_prompts(a, "question")
  a.add_argument("--image", action="append", default=[], help="an image file (repeat for a batch)")
  a.add_argument("--resize", choices=("clip", "squash", "pad_white"), default="clip",
                 help="how images are brought to the model's resolution (default: clip)")
  _add_text_options(a)
  i = sub.add_parser("image", help="text-to-image")
  _add_prompts(i, "prompt")
  i.add_argument("--out", required=True, help="folder for the PNGs")
  i.add_argument("--steps", type=int, help="MaskGIT decoding steps")
  i.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight")
  i.add_argument("--temperature", type=float, help="re-masking temperature tau0")
  i.add_argument("--noise-schedule", help="cosine, linear, pow<p> or sigmoid")
  i.add_argument("--max-text-len", type=int, help="text tokens of the prompt layout (default: saved)")
  return p


def read_prompts(args: argparse.Namespace, what: str) -> list[str]:
  """The positional prompts followed by the file's non-blank lines; at least one."""
  prompts = list(args.prompts)
  if args.prompts_file:
    if not os.path.isfile(args.prompts_file):
      raise UsageError(f"prompts file not found: {args.prompts_file}")
    with open(args.prompts_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise UsageError(f"no {what}: give them as arguments or with --prompts-file")
  return prompts


def _text_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  kw = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
        "temperature": args.temperature, "remasking": args.remasking, "guidance_scale": args.guidance_scale,
        "threshold": args.threshold}
  kw = {k: v for k, v in kw.items() if v is not None}
  if args.cache not in (None, "none"):
    kw["cache"] = args.cache
  return kw


def _load_images(paths: list[str], itok: Any, grid: tuple[int, int], mode: str) -> Any:
  import numpy as np
  from PIL import Image

  from mmada_jax.data.images import load_image, preprocess_image
  f = itok.config.downsample_factor
  h, w = grid[0] * f, grid[1] * f
  out = []
  for path in paths:
    if not os.path.isfile(path):
      raise UsageError(f"image file not found: {path}")
    if h == w:
      out.append(preprocess_image(path, h, mode))
    else:
      img = load_image(path).resize((w, h), Image.BICUBIC)
      out.append(np.asarray(img, np.float32) / 127.5 - 1.0)
  return np.stack(out)


def _print_texts(prompts: list[str], texts: list[str], as_json: bool) -> None:
  for prompt, text in zip(prompts, texts):
    print(json.dumps({"prompt": prompt, "text": text}) if as_json else text, flush=True)


def run(args: argparse.Namespace) -> int:
  if not os.path.isdir(args.model):
    raise UsageError(f"model directory not found: {args.model}")
  if args.cmd in ("answer", "image") and not args.image_tokenizer:
    raise UsageError(f"{args.cmd} needs --image-tokenizer DIR (the MAGVIT-v2 folder)")
  if args.image_tokenizer and not os.path.isdir(args.image_tokenizer):
    raise UsageError(f"image tokenizer directory not found: {args.image_tokenizer}")
  what = "question" if args.cmd == "answer" else "prompt"
  prompts = read_prompts(args, f"{what}s")
  if args.cmd == "answer":
    if not args.image:
      raise UsageError("answer needs at least one --image PATH")
    if len(prompts) == 1:
      prompts = prompts * len(args.image)
    elif len(prompts) != len(args.image):
      raise UsageError(f"answer: {len(prompts)} questions for {len(args.image)} images (give one "
                       "question per image, or one for all)")

  from mmada_jax.api import ImageTokenizer, MMaDA
  from mmada_jax.prompting import TextTokenizer
  from mmada_jax.sharding import make_mesh

  mesh = make_mesh(args.mesh_shape) if args.mesh_shape else None
  tok = TextTokenizer.from_file(args.text_tokenizer)
  model = MMaDA.from_pretrained(args.model, param_dtype=args.param_dtype, dtype=args.dtype, mesh=mesh)
  itok = None
  if args.image_tokenizer:
    itok = ImageTokenizer.from_pretrained(args.image_tokenizer, mesh=mesh)

  if args.cmd == "text":
    out = model.generate_text(prompts, tokenizer=tok, chat=not args.raw, seed=args.seed, **_text_kwargs(args))
    _print_texts(prompts, out.texts, args.json)
  elif args.cmd == "answer":
    images = _load_images(args.image, itok, model.generation_config.grid, args.resize)
    out = model.answer(images, prompts, image_tokenizer=itok, tokenizer=tok, seed=args.seed,
                       **_text_kwargs(args))
    _print_texts(prompts, out.texts, args.json)
  else:
    from PIL import Image
    kw = {"steps": args.steps, "guidance_scale": args.guidance_scale, "temperature": args.temperature,
          "noise_schedule": args.noise_schedule, "max_text_len": args.max_text_len}
    gen = model.generate_images(prompts, image_tokenizer=itok, tokenizer=tok, seed=args.seed,
                                **{k: v for k, v in kw.items() if v is not None})
    os.makedirs(args.out, exist_ok=True)
    for k, img in enumerate(gen.images):
      path = os.path.join(args.out, f"{k:03d}.png")
      Image.fromarray(img).save(path)
      print(path, flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return run(args)
  except (UsageError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

"""``python -m mmada_jax.aot``: compile a stage's train step for a TPU slice and print the report.

  python -m mmada_jax.aot --config=configs/mmada_8b.py:stage1_3 --topology=v5p-128 [--json] \
      [--config.mesh_shape=fsdp=-1] [--config.model.remat_policy=dots] [--config.optimizer.grad_accum=8]
  python -m mmada_jax.aot --config=configs/mmada_8b.py:stage1_3 --topology=v5e:1x1 \
      --program=text_sampler|t2i_sampler --quantize=none|int8|int4 [--json]

``--program`` (default ``train_step``) selects an inference sampler instead of the train step
(memory only; bfloat16 or weight-only quantized weights, ``aot.programs.SamplerShapes``).
Exit code 2 (with ``error: …`` on stderr) when the configuration cannot be laid out on the slice.
"""
from __future__ import annotations

import json
import sys

from mmada_jax.aot.estimate import estimate, estimate_sampler
from mmada_jax.aot.programs import QUANTIZE_CHOICES, SAMPLER_PROGRAMS
from mmada_jax.aot.report import format_report, format_sampler_report
from mmada_jax.aot.topology import parse_topology


def _flags():
  from absl import flags
  from ml_collections import config_flags
  cfg = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).", lock_config=True)
  f = {
      "config": cfg,
      "topology": flags.DEFINE_string("topology", None, "TPU slice: v5p:4x4x4, v5e:16x16, v6e:8x8, v5p-128, v6e-64 …"),
      "json": flags.DEFINE_bool("json", False, "Print one JSON line instead of text."),
      "grpo_prompt_len": flags.DEFINE_integer("grpo_prompt_len", 256, "UniGRPO prompt width when rl.max_prompt_len=0."),
      "twins": flags.DEFINE_bool("twins", True, "Compile the 1- and 2-layer cost twins for FLOPs, step time and MFU "
                                 "(False: memory only, one compile)."),
      "compiler_options": flags.DEFINE_string("compiler_options", "", "XLA options key=value,… passed to compile()."),
      "program": flags.DEFINE_enum("program", "train_step", ["train_step", *SAMPLER_PROGRAMS],
                                   "What to compile: the stage's train step or an inference sampler."),
      "quantize": flags.DEFINE_enum("quantize", "none", list(QUANTIZE_CHOICES),
                                    "Sampler programs: weight-only quantization of the weights (none = bfloat16)."),
      "sampler_shapes": flags.DEFINE_string("sampler_shapes", "", "Sampler programs: key=value,… overrides of "
                                            "aot.programs.SamplerShapes (prompt_len, gen_length, block_length, "
                                            "steps, cache, batch, t2i_steps, cfg, text_len, image_tokens)."),
  }
  return f


def _options(text: str) -> dict[str, str]:
  out = {}
  for part in [p.strip() for p in text.split(",") if p.strip()]:
    k, sep, v = part.partition("=")
    if not sep:
      raise ValueError(f"--compiler_options entry {part!r} is not key=value")
    out[k.strip().lstrip("-")] = v.strip()
  return out


def main(argv: list[str] | None = None) -> int:
  import os
  from absl import app
  # Compiling for abstract devices never claims a chip: let several AOT runs share libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  f = _flags()

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    if f["config"].value is None or not f["topology"].value:
      raise app.UsageError("--config and --topology are required, e.g. --config=configs/mmada_8b.py:stage1_3 "
                           "--topology=v5p-128")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
      topo = parse_topology(f["topology"].value)
      if f["program"].value in SAMPLER_PROGRAMS:
        r = estimate_sampler(f["config"].value, topo, f["program"].value, f["quantize"].value,
                             shapes=f["sampler_shapes"].value,
                             compiler_options=_options(f["compiler_options"].value), log=log)
        print(json.dumps(r, sort_keys=True, default=float) if f["json"].value else format_sampler_report(r),
              flush=True)
        return
      if f["quantize"].value != "none":
        raise ValueError("--quantize applies to the sampler programs (--program=text_sampler|t2i_sampler)")
      r = estimate(f["config"].value, topo, grpo_prompt_len=f["grpo_prompt_len"].value, twins=f["twins"].value,
                   compiler_options=_options(f["compiler_options"].value), log=log)
    except ValueError as e:   # a configuration that cannot be laid out on this topology
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(r, sort_keys=True, default=float) if f["json"].value else format_report(r), flush=True)

  from mmada_jax.train.config_files import resolve_config_argv
  try:   # --config=configs/NAME.py: the working directory's file, else the packaged preset
    argv = resolve_config_argv(argv or sys.argv)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(run, argv=argv)
  return 0


if __name__ == "__main__":
  main()

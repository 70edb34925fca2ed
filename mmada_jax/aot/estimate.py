"""The AOT report of one stage on one TPU slice: per-chip HBM against capacity, FLOPs, XLA's step
time and MFU (:func:`estimate`), from the real step and its 1- / 2-layer cost twins (the
package docstring explains the method); :func:`direct_cost` is the reference count it is checked
against.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ml_collections import ConfigDict

from mmada_jax.aot.programs import COST_KEYS, StepShapes, compile_optimizer, compile_step, sharding_context
from mmada_jax.aot.topology import GIB, Topology
from mmada_jax.model import lm_head
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import MESH_AXES, make_mesh
from mmada_jax.train import metrics as metrics_lib
from mmada_jax.train.config import model_config


COST_TWIN_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": "1000000000"}
"""Compile options of the cost twins: no windowed-einsum loops (their bodies would be counted once).
The twins are also traced with the LM-head chunk loop unrolled (``lm_head.unrolled_chunks``)."""

KERNEL_EFFICIENCY = 0.5
"""Fraction of the chip's peak at which the step-time estimate runs the splash attention kernels:
XLA's cost model charges a custom call only its operand bytes, so their matmul FLOPs
(:func:`~mmada_jax.aot.programs.splash_kernel_flops`) are added as FLOPs / (peak × this), on top
(no overlap with the bytes already charged: conservative)."""


def scaled_cost(one: dict[str, float], two: dict[str, float], opt: dict[str, float], grad_accum: int,
                n_layers: int) -> dict[str, float]:
  """Per-chip cost of the whole step from the 1- and 2-layer twins (module docstring):
  ``opt + A·((one − opt) + (n_layers − 1)·(two − one))``."""
  return {k: opt[k] + grad_accum * ((one[k] - opt[k]) + (n_layers - 1) * (two[k] - one[k])) for k in COST_KEYS}


def analytical_flops(cfg: MMaDAConfig, shapes: StepShapes, frozen_base: bool = False) -> float:
  """Model FLOPs of one optimizer step (the trainer's MFU convention, ``metrics.flops_per_step``),
  with the LM head counted only at the ``logit_positions`` per row where the loss applies it and
  only over the ``head_vocab`` rows it projects onto. ``frozen_base`` (LoRA): 4 instead of 6 FLOPs
  per matmul parameter and token (no weight gradients of the base; the adapters' are neglected)."""
  flops = metrics_lib.flops_per_step(cfg, shapes.rows, shapes.length, frozen_base)
  per = 4.0 if frozen_base else 6.0
  head = per * cfg.d_model * cfg.vocab_size
  used = per * cfg.d_model * (shapes.head_vocab or cfg.vocab_size)
  return flops - head * shapes.rows * shapes.length + used * shapes.rows * shapes.logit_positions



def _memory_fields(c: Any, cap: int, say: Callable[[str], None]) -> dict[str, Any]:
  """The report's fit / HBM fields of compile result ``c`` against ``cap`` bytes per chip (an
  out-of-memory compile: the figures its error message gives, and ``compile_error``)."""
  if c.memory is None:
    used = c.oom["used_bytes"] if c.oom else None
    if c.oom:
      cap = int(c.oom["capacity_bytes"])
    return dict(fits=False, hbm_per_chip_bytes=used, hbm_capacity_bytes=cap,
                hbm_headroom=None if used is None else 1.0 - used / cap, compile_error=c.error)
  m = c.memory
  hbm = m["argument"] + m["output"] + m["temp"] - m["alias"]
  say(f"  compiled in {c.seconds:.0f}s; HBM {hbm / GIB:.2f} GiB per chip")
  return dict(fits=hbm <= cap, hbm_per_chip_bytes=hbm, hbm_headroom=1.0 - hbm / cap, memory=m)

def estimate(config: ConfigDict, topo: Topology, *, devices: list[Any] | None = None,
             grpo_prompt_len: int = 256, twins: bool = True,
             compiler_options: Mapping[str, Any] | None = None, log=None) -> dict[str, Any]:
  """Compiles the step of ``config`` for ``topo`` and returns the report dict (``--json`` fields)."""
  say = log or (lambda msg: None)
  devices = topo.devices() if devices is None else devices
  mesh = make_mesh(str(config.mesh_shape), devices)
  model_cfg = model_config(config.model)
  say(f"compiling the {config.stage.name} step for {topo.name} ({topo.chips} chips), mesh {dict(mesh.shape)}")
  prog = compile_step(config, model_cfg, mesh, grpo_prompt_len=grpo_prompt_len, compiler_options=compiler_options)
  c = prog.compiled
  sh = prog.shapes
  shards = sharding_context(config, mesh).ways("batch")
  cap = topo.gen.hbm_bytes
  out: dict[str, Any] = {
      "topology": topo.name, "chips": topo.chips, "device_kind": topo.gen.device_kind,
      "stage": str(config.stage.name), "mesh": {a: int(mesh.shape[a]) for a in MESH_AXES},
      "sharding_preset": str(config.sharding_preset),
      "sharding_rules": str(config.sharding_rules), "remat_policy": model_cfg.remat_policy,
      "scan_layers": model_cfg.scan_layers, "logits_chunk": int(config.stage.logits_chunk),
      "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype,
      "rows_per_step": sh.rows, "seq_len": sh.length, "logit_positions": sh.logit_positions,
      "head_vocab": sh.head_vocab or model_cfg.vocab_size,
      "grad_accum": sh.grad_accum,
      "rows_per_shard_micro": sh.rows / sh.grad_accum / shards,
      "tokens_per_step": sh.rows * sh.length, "hbm_capacity_bytes": cap,
      "peak_flops_per_chip": topo.gen.peak_flops, "compile_seconds": round(c.seconds, 1),
      "step_flops": analytical_flops(model_cfg, sh, frozen_base=int(config.lora.rank) > 0), "xla_step_flops": None, "estimated_step_seconds": None,
      "estimated_mfu": None,
  }
  out.update(_memory_fields(c, cap, say))
  if c.memory is None:
    return out

  if not twins:
    return out
  cost_opts = {**COST_TWIN_OPTIONS, **dict(compiler_options or {})}
  costs, kernels = [], []
  for n in (1, 2):
    twin_cfg = ConfigDict(config.to_dict())
    twin_cfg.model.n_layers, twin_cfg.model.scan_layers = n, False
    say(f"  compiling the {n}-layer unrolled cost twin")
    with lm_head.unrolled_chunks():   # the LM-head chunk loop too: every chunk counted
      tw = compile_step(twin_cfg, model_config(twin_cfg.model), mesh, grpo_prompt_len=grpo_prompt_len,
                        compiler_options=cost_opts)
    if tw.compiled.cost is None:
      raise RuntimeError(f"the {n}-layer cost twin did not compile: {tw.compiled.error}")
    costs.append(tw.compiled.cost)
    kernels.append(tw.compiled.kernel_flops)
  opt = compile_optimizer(prog, mesh, cost_opts)
  total = scaled_cost(costs[0], costs[1], opt.cost, sh.grad_accum, model_cfg.n_layers)
  kernel = sh.grad_accum * (kernels[0] + (model_cfg.n_layers - 1) * (kernels[1] - kernels[0]))
  total["flops"] += kernel
  kernel_secs = kernel / (topo.gen.peak_flops * KERNEL_EFFICIENCY)
  peak = topo.chips * topo.gen.peak_flops
  # Roofline of the totals: a lower bound on any schedule's time, never an estimate of it.
  roof = max(total["flops"] / topo.gen.peak_flops, total["bytes accessed"] / topo.gen.hbm_bandwidth)
  out.update(xla_step_flops=total["flops"] * topo.chips, xla_bytes_per_chip=total["bytes accessed"],
             roofline_step_seconds=roof, roofline_mfu_bound=out["step_flops"] / (roof * peak),
             kernel_flops_per_chip=kernel, kernel_seconds=kernel_secs, kernel_efficiency=KERNEL_EFFICIENCY,
             xla_raw={"step_as_counted": c.cost, "twin_1_layer": costs[0], "twin_2_layers": costs[1],
                      "optimizer": opt.cost})
  if any(x["optimal_seconds"] < 0 for x in (*costs, opt.cost)):
    # Measured with libtpu 0.0.42.1: on v5e/v6e the cost model gives some ops a time of -1 s.
    out["cost_model_note"] = (f"XLA's cost model returned negative op times for {topo.gen.name} (a -1 s "
                              "sentinel per op it cannot cost): no step-time estimate")
    return out
  secs = total["optimal_seconds"] + kernel_secs
  out.update(estimated_step_seconds=secs, estimated_mfu=out["step_flops"] / (secs * peak),
             estimated_tokens_per_second=sh.rows * sh.length / secs)
  return out


def direct_cost(config: ConfigDict, topo: Topology, devices: list[Any], compiler_options=None,
                **kw) -> dict[str, float]:
  """Per-chip cost of ``config``'s step compiled as is with windowed einsums off, scaled only by
  the gradient-accumulation trip count: exact when the layers are unrolled (``scan_layers=False``);
  the reference the twin estimate is checked against."""
  mesh = make_mesh(str(config.mesh_shape), devices)
  opts = {**COST_TWIN_OPTIONS, **dict(compiler_options or {})}
  with lm_head.unrolled_chunks():
    prog = compile_step(config, model_config(config.model), mesh, compiler_options=opts, **kw)
  opt = compile_optimizer(prog, mesh, opts).cost
  a = prog.shapes.grad_accum
  return {k: opt[k] + a * (prog.compiled.cost[k] - opt[k]) for k in COST_KEYS}


def estimate_sampler(config: ConfigDict, topo: Topology, program: str, quantize: str = "none", *,
                     shapes: str = "", devices: list[Any] | None = None,
                     compiler_options: Mapping[str, Any] | None = None, log=None) -> dict[str, Any]:
  """Compiles an inference sampler (``text_sampler`` | ``t2i_sampler``, :class:`SamplerShapes`)
  of ``config.model`` in bfloat16 or weight-only ``quantize``d (int8 | int4) for ``topo`` on
  ``config.mesh_shape``; returns its report (memory only: the samplers' loops are not costed).
  The T2I layout is ``config.data``'s (max_text_len, num_image_tokens); ``shapes``: ``key=value,…``
  overrides of :class:`SamplerShapes`."""
  from mmada_jax import quant
  from mmada_jax.aot.programs import SamplerShapes, abstract_sampler_params, compile_sampler, inference_config
  say = log or (lambda msg: None)
  devices = topo.devices() if devices is None else devices
  mesh = make_mesh(str(config.mesh_shape), devices)
  ctx = sharding_context(config, mesh)
  model_cfg = inference_config(model_config(config.model))
  shapes = SamplerShapes.parse(program, shapes, text_len=int(config.data.max_text_len),
                              image_tokens=int(config.data.num_image_tokens))
  say(f"compiling the {program} ({quantize}) for {topo.name} ({topo.chips} chips), mesh {dict(mesh.shape)}")
  c = compile_sampler(shapes, model_cfg, mesh, ctx, quantize, compiler_options)
  params = abstract_sampler_params(model_cfg, mesh, ctx.rules, quantize)
  cap = topo.gen.hbm_bytes
  out: dict[str, Any] = {
      "program": program, "quantize": quantize, "topology": topo.name, "chips": topo.chips,
      "device_kind": topo.gen.device_kind, "mesh": {a: int(mesh.shape[a]) for a in MESH_AXES},
      "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype,
      "param_bytes": quant.nbytes(params), "shapes": dataclasses.asdict(shapes), "seq_len": shapes.length,
      "hbm_capacity_bytes": cap, "compile_seconds": round(c.seconds, 1),
  }
  out.update(_memory_fields(c, cap, say))
  return out

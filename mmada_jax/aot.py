"""Ahead-of-time compile of the real train step for a TPU topology, from a CPU-only host.

  python -m mmada_jax.aot --config=configs/mmada_8b.py:stage1_3 --topology=v5p-128 [--json] \
      [--config.mesh_shape=fsdp=-1] [--config.model.remat_policy=dots] [--config.optimizer.grad_accum=8] \
      [--config.stage.logits_chunk=256]

Every ``--config.*`` override of the trainer works (the config is the trainer's, locked). The step
is the trainer's own: ``state_shardings`` → ``make_step_fn(stage, tx, schedule, ...)`` →
``jit_step``, with the stage's loss (mixed t2i/lm/mmu for ``pretrain``/``sft``, UniGRPO's
``grpo_loss_fn`` with the frozen reference params as a step argument for ``grpo``/``unigrpo``),
lowered on abstract TPU devices (``jax.experimental.topologies``) and compiled by libtpu.
Nothing is allocated; no TPU is needed, only the ``libtpu`` wheel (works under
``JAX_PLATFORMS=cpu``).

Reported (per chip unless said otherwise):

* HBM = arguments + outputs + temporaries − aliased (donated state) bytes of
  ``compiled.memory_analysis()`` (generated code excluded, it is reported separately), against
  the chip's capacity; ``fits`` = HBM ≤ capacity. A step XLA cannot fit fails to compile; the
  "Used X of Y hbm" figures of that error are reported instead (``fits`` false).
* FLOPs per optimizer step: analytical (``6·N_matmul·tokens + 12·n_layers·L²·d·rows``, the
  trainer's MFU convention, remat recompute not counted) and XLA's (all chips, recompute
  included).
* XLA's cost-model step time (``optimal_seconds``) — the cost model's optimistic bound, NOT a
  measurement — and ``estimated_mfu = analytical_flops / (seconds · chips · peak)``.

XLA's ``cost_analysis()`` counts a while-loop body once, and a scanned model has several loops:
the layer scan, the gradient-accumulation scan (A micro-batches) and, on TPU, the "windowed
einsum" loops into which SPMD turns FSDP all-gather/reduce-scatter matmuls (one per sharded
matmul, body = one shard). The real step's counts are therefore far too small. The estimate is
instead built from cost twins: the same step with 1 and 2 unrolled layers, compiled with
windowed einsums off (``xla_jf_spmd_threshold_for_windowed_einsum_mib``), so every op is
counted, and the optimizer update alone (C_opt):

  total = C_opt + A · [(C_1 − C_opt) + (n_layers − 1) · (C_2 − C_1)]

(C_2 − C_1 is one layer's forward + backward + recompute). Memory always comes from the real
step compiled with the given options. The cost model sums per-op times (compute or HBM traffic,
whichever bounds the op); collectives appear to be costed by their HBM traffic, not by ICI
bandwidth or latency (an all-gather's ``optimal_seconds`` ≈ its bytes accessed / HBM bandwidth),
and nothing is overlapped. It is XLA's model, not a measurement. With libtpu 0.0.42.1 the v5e
and v6e cost models give some ops a time of −1 s (measured), so no time or MFU estimate is
reported there (``cost_model_note``); the roofline of XLA's totals, max(FLOPs/peak,
bytes/HBM bandwidth), is reported for every generation as a lower bound on the step time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.sharding.rules import MESH_AXES, make_mesh
from mmada_jax.train import metrics as metrics_lib
from mmada_jax.train import optim, state as state_lib
from mmada_jax.train.stages import MixedSpec, Stage, mixed_loss_fn
from mmada_jax.train.step import BATCH_AXES, jit_step, make_step_fn
from mmada_jax.train.trainer import model_config, parse_rules

GIB = 2 ** 30
COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


# ----------------------------------------------------------------------------- topologies

@dataclasses.dataclass(frozen=True)
class Generation:
  """Per-chip figures of a TPU generation. ``alias_counts_cores``: the accelerator type's number
  counts TensorCores (v4-N, v5p-N = N/2 chips), else chips (v5litepod-N, v6e-N)."""
  name: str
  peak_flops: float          # dense bf16 FLOP/s per chip
  hbm_bytes: int             # HBM per chip
  hbm_bandwidth: float       # HBM bytes/s per chip
  ndim: int                  # torus dimensions of the topology name
  alias_counts_cores: bool
  device_kind: str           # jax device_kind of the abstract devices
  chip_config_name: str = "default"


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 275e12, 32 * GIB, 1228e9, 3, True, "TPU v4", "megacore"),
    "v5p": Generation("v5p", 459e12, 95 * GIB, 2765e9, 3, True, "TPU v5"),
    "v5e": Generation("v5e", 197e12, 16 * GIB, 819e9, 2, False, "TPU v5 lite"),
    "v6e": Generation("v6e", 918e12, 32 * GIB, 1640e9, 2, False, "TPU v6 lite"),
}
_GEN_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
# Default slice shapes for accelerator-type aliases (chips -> topology).
_SHAPES_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
              4096: (16, 16, 16), 6144: (16, 16, 24)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice: generation and chip grid (``v5p:4x4x4``)."""
  gen: Generation
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.gen.name}:{'x'.join(map(str, self.dims))}"

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips per host VM: 2x2x1 for multi-host slices of every generation; v5e/v6e 8-chip
    slices (2x4) are one 8-chip host; a grid smaller than a host is one host."""
    d = tuple(self.dims) + (1,) * (3 - len(self.dims))
    if self.gen.ndim == 2 and self.chips == 8:
      return (d[0], d[1], 1)
    return (min(d[0], 2), min(d[1], 2), 1)

  def devices(self) -> list[Any]:
    import os
    # Describing a topology never claims a chip: let this process load libtpu even while another
    # process (a run on this host, another AOT compile) holds libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=self.name, chip_config_name=self.gen.chip_config_name,
        chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1)
    devs = list(desc.devices)
    if len(devs) != self.chips:
      raise RuntimeError(f"topology {self.name}: libtpu returned {len(devs)} devices for {self.chips} chips")
    return devs


def parse_topology(spec: str) -> Topology:
  """``v5p:4x4x4`` / ``v5e:16x16`` / ``v6e:8x8``, or an accelerator type ``v5p-128`` (cores:
  64 chips), ``v4-64`` (cores), ``v5litepod-256`` / ``v5e-256`` / ``v6e-64`` (chips)."""
  s = spec.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", s)
  if m:
    gen = _generation(m.group(1), spec)
    dims = tuple(int(x) for x in m.group(2).split("x"))
    if len(dims) != gen.ndim or min(dims) < 1:
      raise ValueError(f"topology {spec!r}: {gen.name} grids have {gen.ndim} dimensions, e.g. "
                       f"{gen.name}:{'x'.join(['4'] * gen.ndim)}")
    return Topology(gen, dims)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
  if not m:
    raise ValueError(f"topology {spec!r}: expected e.g. v5p:4x4x4, v5e:16x16, v6e:8x8 or v5p-128, v6e-64")
  gen = _generation(m.group(1), spec)
  n = int(m.group(2))
  chips = n // 2 if gen.alias_counts_cores else n
  if gen.alias_counts_cores and n % 2:
    raise ValueError(f"topology {spec!r}: {gen.name}-N counts TensorCores (2 per chip); N must be even")
  shapes = _SHAPES_3D if gen.ndim == 3 else _SHAPES_2D
  if chips not in shapes:
    raise ValueError(f"topology {spec!r} ({chips} chips): no default slice shape; give it as "
                     f"{gen.name}:AxB{'xC' if gen.ndim == 3 else ''}")
  return Topology(gen, shapes[chips])


def _generation(word: str, spec: str) -> Generation:
  key = _GEN_ALIASES.get(word, word)
  if key not in GENERATIONS:
    raise ValueError(f"topology {spec!r}: unknown TPU generation {word!r}; known: {sorted(GENERATIONS)}")
  return GENERATIONS[key]


# ----------------------------------------------------------------------------- abstract stage + batch

@dataclasses.dataclass(frozen=True)
class StepShapes:
  """What one optimizer step processes: global rows of ``length`` tokens; ``logit_positions``
  per row where the LM head is applied (= length unless the loss projects fewer), onto
  ``head_vocab`` rows of the head (0 = the whole vocabulary; UniGRPO t2i: the image codebook)."""
  rows: int
  length: int
  grad_accum: int
  logit_positions: int
  head_vocab: int = 0


def _no_data(*_):
  raise RuntimeError("the AOT stage has shapes only, no data")


def _leaf(shape: tuple[int, ...], dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
  spec = P(None, BATCH_AXES, *([None] * (len(shape) - 2)))
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))


def _micro_rows(rows: int, grad_accum: int, mesh: Mesh, what: str) -> int:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if rows % grad_accum or (rows // grad_accum) % shards:
    raise ValueError(f"{what}: {rows} rows per step do not split into optimizer.grad_accum={grad_accum} "
                     f"micro-batches over the {shards} data×fsdp shards of mesh {dict(mesh.shape)}; rows must "
                     f"be a multiple of {grad_accum * shards}")
  return rows // grad_accum


def abstract_stage(config: ConfigDict, model_cfg: MMaDAConfig, mesh: Mesh, params: Any, *,
                   grpo_prompt_len: int = 256) -> tuple[Stage, Any, Any, StepShapes]:
  """(stage, abstract batch [A, B/A, ...] sharded as the trainer's, abstract frozen pytree, shapes)
  for ``config.stage.name``: ``pretrain``/``sft`` (mixed loss) or ``grpo``/``unigrpo``.

  Args:
    params: the abstract (sharded) parameters; UniGRPO's frozen reference has their shardings.
    grpo_prompt_len: UniGRPO prompt text width when ``rl.max_prompt_len`` is 0 (MMU prompts add
      the image's ``num_vq_tokens`` + 3 layout tokens to it).
  """
  name = str(config.stage.name)
  acc = int(config.optimizer.grad_accum)
  if name in ("pretrain", "sft"):
    spec = MixedSpec.from_config(config, model_cfg)
    if name == "sft" and spec.lm_format != "lm_chat":
      raise ValueError("stage 'sft' trains lm_chat rows: set stage.lm_format='lm_chat'")
    loss = functools.partial(mixed_loss_fn, model_cfg=model_cfg, spec=spec)
    length = int(config.data.max_text_len) + int(config.data.num_image_tokens) + 3
    keys = {"t2i": ("input_ids", "attention_mask"), "lm": ("input_ids", "prompt_mask"),
            "mmu": ("input_ids", "prompt_mask")}
    batch, rows = {}, 0
    for task, names in keys.items():
      n = int(config.data[task].batch_size)
      if n <= 0:
        continue
      micro = _micro_rows(n, acc, mesh, f"data.{task}.batch_size={n}")
      batch[task] = {k: _leaf((acc, micro, length), jnp.int32, mesh) for k in names}
      rows += n
    if not batch:
      raise ValueError("every flow has batch_size 0: set data.t2i/lm/mmu.batch_size")
    shapes = StepShapes(rows, length, acc, length)
    stage = Stage(name=name, loss_fn=loss, make_batches=_no_data, sequences=_no_data,
                  metric_names=("loss", "loss_t2i", "loss_lm", "loss_mmu"))
    return stage, batch, None, shapes
  if name in ("grpo", "unigrpo"):
    from mmada_jax.rl.grpo import GRPOConfig, grpo_loss_fn
    g = GRPOConfig.from_config(config.get("rl"))
    sp = SpecialTokens()
    n_img = int(model_cfg.num_vq_tokens)
    if g.task == "t2i":
      length, resp = int(g.max_text_len) + n_img + 3, n_img
      vocab_range = (int(sp.image_offset), int(sp.image_offset) + int(model_cfg.codebook_size))
    else:
      prompt = int(g.max_prompt_len) or int(grpo_prompt_len) + (n_img + 3 if g.task == "mmu" else 0)
      length, resp = prompt + int(g.gen_length), int(g.gen_length)
      vocab_range = None
    rows = g.rollouts_per_step
    micro = _micro_rows(rows, acc, mesh, f"rl.group_size×rl.prompts_per_step={rows}")
    f32, i32 = jnp.float32, jnp.int32
    batch = {"input_ids": _leaf((acc, micro, length), i32, mesh),
             "attention_mask": _leaf((acc, micro, length), i32, mesh),
             "response_start": _leaf((acc, micro), i32, mesh), "targets": _leaf((acc, micro, resp), i32, mesh),
             "loss_mask": _leaf((acc, micro, resp), jnp.bool_, mesh),
             "old_logp": _leaf((acc, micro, resp), f32, mesh), "ref_logp": _leaf((acc, micro, resp), f32, mesh)}
    for k in ("advantages", "seq_weight", "reward", "reward_std", "response_length", "mask_ratio"):
      batch[k] = _leaf((acc, micro), f32, mesh)
    frozen = {"ref": params} if g.loss.needs_ref else None
    loss = functools.partial(grpo_loss_fn, model_cfg=model_cfg, loss_cfg=g.loss, vocab_range=vocab_range)
    stage = Stage(name=name, loss_fn=loss, make_batches=_no_data, sequences=_no_data)
    head = vocab_range[1] - vocab_range[0] if vocab_range else 0
    return stage, batch, frozen, StepShapes(rows, length, acc, resp, head)
  raise ValueError(f"mmada_jax.aot: stage {name!r} has no abstract batch; known: pretrain, sft, grpo, unigrpo")


# ----------------------------------------------------------------------------- compile

@dataclasses.dataclass
class Compiled:
  """One compiled program: XLA's memory and cost figures (per chip) or the OOM error's."""
  seconds: float
  memory: dict[str, int] | None = None
  cost: dict[str, float] | None = None
  oom: dict[str, float] | None = None
  error: str = ""


def memory_figures(mem: Any) -> dict[str, int]:
  """Bytes per device of ``compiled.memory_analysis()``: argument, output, temp, alias, generated_code."""
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f.replace("_size_in_bytes", ""): int(getattr(mem, f)) for f in fields}


def _cost_dict(cost: Any) -> dict[str, float]:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(cost.get(k, 0.0)) for k in COST_KEYS}


_OOM = (re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.I),
        re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                   re.I))


def _parse_oom(text: str) -> dict[str, float] | None:
  """Bytes used and available from libtpu's out-of-memory messages (either form), else None."""
  m = next((m for m in (p.search(text) for p in _OOM) if m), None)
  if not m:
    return None
  scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  return {"used_bytes": float(m.group(1)) * scale[m.group(2).upper()],
          "capacity_bytes": float(m.group(3)) * scale[m.group(4).upper()]}


def _compile(fn, args: tuple, compiler_options: Mapping[str, Any] | None) -> Compiled:
  t0 = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile(compiler_options=dict(compiler_options or {}) or None)
  except Exception as e:  # noqa: BLE001 - XLA raises XlaRuntimeError / ValueError on resource exhaustion
    text = str(e)
    oom = _parse_oom(text)
    if oom is None and "RESOURCE_EXHAUSTED" not in text:
      raise
    return Compiled(time.perf_counter() - t0, oom=oom, error=text.strip().splitlines()[0][:500])
  out = Compiled(time.perf_counter() - t0)
  out.memory = memory_figures(compiled.memory_analysis())
  out.cost = _cost_dict(compiled.cost_analysis())
  return out


@dataclasses.dataclass
class StepProgram:
  """The real step of ``config`` on ``mesh``: compiled, with its optimizer and shapes."""
  compiled: Compiled
  shapes: StepShapes
  model_cfg: MMaDAConfig
  tx: optax.GradientTransformation
  abstract: Any
  shardings: Any


def compile_step(config: ConfigDict, model_cfg: MMaDAConfig, mesh: Mesh, *,
                 grpo_prompt_len: int = 256, compiler_options: Mapping[str, Any] | None = None) -> StepProgram:
  """Lowers and compiles the trainer's jitted step for ``config`` on ``mesh`` (abstract arrays only)."""
  rules = parse_rules(config.sharding_rules)
  params_shape = state_lib.abstract_params(model_cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, params_shape, int(config.steps))
  abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  stage, batch, frozen, shapes = abstract_stage(config, model_cfg, mesh, abstract.params,
                                                grpo_prompt_len=grpo_prompt_len)
  step_fn = make_step_fn(stage, tx, schedule, shardings.params)
  with jax.set_mesh(mesh):
    compiled = _compile(jit_step(step_fn, shardings, batch, frozen, mesh), (abstract, batch, frozen),
                        compiler_options)
  return StepProgram(compiled, shapes, model_cfg, tx, abstract, shardings)


def compile_optimizer(prog: StepProgram, mesh: Mesh, compiler_options: Mapping[str, Any] | None = None) -> Compiled:
  """The optimizer update alone (clip + AdamW + apply) on the step's shardings: the part of the
  step outside the gradient-accumulation loop."""
  p_sh, o_sh = prog.shardings.params, prog.shardings.opt_state
  tx = prog.tx

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

  fn = jax.jit(update, in_shardings=(p_sh, o_sh, p_sh), out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())),
               donate_argnums=(0, 1))
  with jax.set_mesh(mesh):
    return _compile(fn, (prog.abstract.params, prog.abstract.opt_state, prog.abstract.params), compiler_options)


COST_TWIN_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": "1000000000"}
"""Compile options of the cost twins: no windowed-einsum loops (their bodies would be counted once)."""


def scaled_cost(one: dict[str, float], two: dict[str, float], opt: dict[str, float], grad_accum: int,
                n_layers: int) -> dict[str, float]:
  """Per-chip cost of the whole step from the 1- and 2-layer twins (module docstring):
  ``opt + A·((one − opt) + (n_layers − 1)·(two − one))``."""
  return {k: opt[k] + grad_accum * ((one[k] - opt[k]) + (n_layers - 1) * (two[k] - one[k])) for k in COST_KEYS}


def analytical_flops(cfg: MMaDAConfig, shapes: StepShapes) -> float:
  """Model FLOPs of one optimizer step (the trainer's MFU convention, ``metrics.flops_per_step``),
  with the LM head counted only at the ``logit_positions`` per row where the loss applies it and
  only over the ``head_vocab`` rows it projects onto."""
  flops = metrics_lib.flops_per_step(cfg, shapes.rows, shapes.length)
  head = 6.0 * cfg.d_model * cfg.vocab_size
  used = 6.0 * cfg.d_model * (shapes.head_vocab or cfg.vocab_size)
  return flops - head * shapes.rows * shapes.length + used * shapes.rows * shapes.logit_positions


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
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  cap = topo.gen.hbm_bytes
  out: dict[str, Any] = {
      "topology": topo.name, "chips": topo.chips, "device_kind": topo.gen.device_kind,
      "stage": str(config.stage.name), "mesh": {a: int(mesh.shape[a]) for a in MESH_AXES},
      "sharding_rules": str(config.sharding_rules), "remat_policy": model_cfg.remat_policy,
      "scan_layers": model_cfg.scan_layers, "logits_chunk": int(config.stage.get("logits_chunk", 0)),
      "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype,
      "rows_per_step": sh.rows, "seq_len": sh.length, "logit_positions": sh.logit_positions,
      "head_vocab": sh.head_vocab or model_cfg.vocab_size,
      "grad_accum": sh.grad_accum,
      "rows_per_shard_micro": sh.rows / sh.grad_accum / shards,
      "tokens_per_step": sh.rows * sh.length, "hbm_capacity_bytes": cap,
      "peak_flops_per_chip": topo.gen.peak_flops, "compile_seconds": round(c.seconds, 1),
      "step_flops": analytical_flops(model_cfg, sh), "xla_step_flops": None, "estimated_step_seconds": None,
      "estimated_mfu": None,
  }
  if c.memory is None:
    used = c.oom["used_bytes"] if c.oom else None
    if c.oom:
      cap = int(c.oom["capacity_bytes"])
    out.update(fits=False, hbm_per_chip_bytes=used, hbm_capacity_bytes=cap,
               hbm_headroom=None if used is None else 1.0 - used / cap, compile_error=c.error)
    return out
  m = c.memory
  hbm = m["argument"] + m["output"] + m["temp"] - m["alias"]
  out.update(fits=hbm <= cap, hbm_per_chip_bytes=hbm, hbm_headroom=1.0 - hbm / cap, memory=m)
  say(f"  compiled in {c.seconds:.0f}s; HBM {hbm / GIB:.2f} GiB per chip")

  if not twins:
    return out
  cost_opts = {**COST_TWIN_OPTIONS, **dict(compiler_options or {})}
  costs = []
  for n in (1, 2):
    twin_cfg = ConfigDict(config.to_dict())
    twin_cfg.model.n_layers, twin_cfg.model.scan_layers = n, False
    say(f"  compiling the {n}-layer unrolled cost twin")
    tw = compile_step(twin_cfg, model_config(twin_cfg.model), mesh, grpo_prompt_len=grpo_prompt_len,
                      compiler_options=cost_opts)
    if tw.compiled.cost is None:
      raise RuntimeError(f"the {n}-layer cost twin did not compile: {tw.compiled.error}")
    costs.append(tw.compiled.cost)
  opt = compile_optimizer(prog, mesh, cost_opts)
  total = scaled_cost(costs[0], costs[1], opt.cost, sh.grad_accum, model_cfg.n_layers)
  peak = topo.chips * topo.gen.peak_flops
  # Roofline of the totals: a lower bound on any schedule's time, never an estimate of it.
  roof = max(total["flops"] / topo.gen.peak_flops, total["bytes accessed"] / topo.gen.hbm_bandwidth)
  out.update(xla_step_flops=total["flops"] * topo.chips, xla_bytes_per_chip=total["bytes accessed"],
             roofline_step_seconds=roof, roofline_mfu_bound=out["step_flops"] / (roof * peak),
             xla_raw={"step_as_counted": c.cost, "twin_1_layer": costs[0], "twin_2_layers": costs[1],
                      "optimizer": opt.cost})
  if any(x["optimal_seconds"] < 0 for x in (*costs, opt.cost)):
    # Measured with libtpu 0.0.42.1: on v5e/v6e the cost model gives some ops a time of -1 s.
    out["cost_model_note"] = (f"XLA's cost model returned negative op times for {topo.gen.name} (a -1 s "
                              "sentinel per op it cannot cost): no step-time estimate")
    return out
  secs = total["optimal_seconds"]
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
  prog = compile_step(config, model_config(config.model), mesh, compiler_options=opts, **kw)
  opt = compile_optimizer(prog, mesh, opts).cost
  a = prog.shapes.grad_accum
  return {k: opt[k] + a * (prog.compiled.cost[k] - opt[k]) for k in COST_KEYS}


def format_report(r: Mapping[str, Any]) -> str:
  """Human-readable lines of an :func:`estimate` report."""
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"topology {r['topology']}: {r['chips']} chips ({r['device_kind']}, {r['hbm_capacity_bytes'] / GIB:.1f} GiB HBM, "
      f"{r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 each); mesh {mesh}"
      + (f"; rules {r['sharding_rules']}" if r["sharding_rules"] else ""),
      f"stage {r['stage']}: {r['rows_per_step']} rows × {r['seq_len']} tokens per step, grad_accum {r['grad_accum']} "
      f"→ {r['rows_per_shard_micro']:g} rows per data shard per micro-batch; remat {r['remat_policy']}, "
      f"{'scanned' if r['scan_layers'] else 'unrolled'} layers, logits "
      + (f"at the {r['logit_positions']} response positions" if r["logit_positions"] != r["seq_len"]
         else f"in chunks of {r['logits_chunk']}" if r["logits_chunk"] else "full [B, L, V]"),
  ]
  if r.get("memory") is None:
    used = r.get("hbm_per_chip_bytes")
    lines.append("does NOT fit: XLA could not compile it in HBM"
                 + (f" (used {used / GIB:.2f} GiB of {r['hbm_capacity_bytes'] / GIB:.2f} GiB)" if used else "")
                 + f": {r.get('compile_error', '')}")
    return "\n".join(lines)
  m = r["memory"]
  lines.append(
      f"HBM per chip (arguments + outputs + temps − aliased): {r['hbm_per_chip_bytes'] / GIB:.2f} GiB of "
      f"{r['hbm_capacity_bytes'] / GIB:.1f} GiB ({100 * r['hbm_headroom']:.0f}% free) → "
      f"{'fits' if r['fits'] else 'does NOT fit'}")
  lines.append("  " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in m.items()))
  lines.append(f"FLOPs per step: analytical {r['step_flops']:.3e} (6·N_matmul·tokens + attention)"
               + (f", XLA {r['xla_step_flops']:.3e} (all chips, loops scaled, remat recompute included)"
                  if r.get("xla_step_flops") else ""))
  if r.get("cost_model_note"):
    lines.append(r["cost_model_note"])
  if r.get("roofline_step_seconds"):
    lines.append(f"roofline of XLA's totals (max of FLOPs/peak, bytes/HBM bandwidth): {r['roofline_step_seconds']:.3f} s, "
                 f"a lower bound → MFU ≤ {100 * r['roofline_mfu_bound']:.1f}%")
  if r.get("estimated_step_seconds"):
    lines.append(f"XLA cost-model step time {r['estimated_step_seconds']:.3f} s (an optimistic bound, not a "
                 f"measurement) → estimated MFU {100 * r['estimated_mfu']:.1f}%, "
                 f"{r['estimated_tokens_per_second']:.3g} tokens/s")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point

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
      r = estimate(f["config"].value, topo, grpo_prompt_len=f["grpo_prompt_len"].value, twins=f["twins"].value,
                   compiler_options=_options(f["compiler_options"].value), log=log)
    except ValueError as e:   # a configuration that cannot be laid out on this topology
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(json.dumps(r, sort_keys=True, default=float) if f["json"].value else format_report(r), flush=True)

  app.run(run, argv=argv or sys.argv)
  return 0


if __name__ == "__main__":
  main()

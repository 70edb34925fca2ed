"""The programs an AOT run compiles: the trainer's real step on abstract inputs, and the optimizer.

* :func:`abstract_step`: the registered stage built abstract, its batch spec laid out as the
  trainer's step batch ``[A, B/A, ...]``, its abstract frozen state, and :class:`StepShapes`;
* :func:`compile_step` / :func:`compile_optimizer`: lowered and compiled (libtpu for abstract TPU
  devices), returning XLA's memory and cost figures, or the out-of-memory error's
  (:func:`parse_oom`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.sharding import ShardingContext, use_sharding
from mmada_jax.train import lora, optim, state as state_lib
from mmada_jax.train.stages import Stage, get_stage
from mmada_jax.train.step import jit_step, make_step_fn

COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


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


def sharding_context(config: ConfigDict, mesh: Mesh) -> ShardingContext:
  """The trainer's sharding context for ``config`` on ``mesh`` (preset + overrides)."""
  return ShardingContext.create(mesh, str(config.sharding_preset), str(config.sharding_rules))


def _leaf(shape: tuple[int, ...], dtype, ctx: ShardingContext) -> jax.ShapeDtypeStruct:
  """An abstract batch leaf [A, rows, ...] laid out as ``sharding.transfer.to_global(..., micro=A)``."""
  sharding = ctx.sharding((None, "batch") + (None,) * (len(shape) - 2))
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _micro_rows(rows: int, grad_accum: int, ctx: ShardingContext, what: str) -> int:
  shards = ctx.ways("batch")
  if rows % grad_accum or (rows // grad_accum) % shards:
    raise ValueError(f"{what}: {rows} rows per step do not split into optimizer.grad_accum={grad_accum} "
                     f"micro-batches over the {shards} batch shards of mesh {ctx.mesh_shape}; rows must "
                     f"be a multiple of {grad_accum * shards}")
  return rows // grad_accum


def grpo_prompt_width(config: ConfigDict, model_cfg: MMaDAConfig, grpo_prompt_len: int) -> ConfigDict:
  """``config`` with ``rl.max_prompt_len`` set for a UniGRPO text / MMU stage whose width comes from
  its prompts (``rl.max_prompt_len=0``): ``grpo_prompt_len`` text tokens, plus the image's
  ``num_vq_tokens`` + 3 layout tokens for MMU. Other configs are returned as they are."""
  if config.get("rl") is None:
    return config
  rl = GRPOConfig.from_config(config.rl)
  if rl.max_prompt_len > 0 or rl.task == "t2i":
    return config
  out = ConfigDict(config.to_dict())
  extra = int(model_cfg.num_vq_tokens) + 3 if rl.task == "mmu" else 0
  out.rl.max_prompt_len = int(grpo_prompt_len) + extra
  return out


def abstract_step(config: ConfigDict, model_cfg: MMaDAConfig, mesh: Mesh, params: Any, *,
                  grpo_prompt_len: int = 256) -> tuple[Stage, Any, Any, StepShapes]:
  """(stage, abstract batch [A, B/A, ...] laid out as the trainer's, abstract frozen pytree, shapes)
  for ``config.stage.name``: the registered stage built abstract (from the config alone), its
  :meth:`~mmada_jax.train.stages.Stage.batch_spec` in the step layout, and its ``init_frozen`` of
  the abstract params (UniGRPO's reference has their shardings).

  Args:
    params: the abstract (sharded) parameters.
    grpo_prompt_len: UniGRPO prompt text width when ``rl.max_prompt_len`` is 0
      (:func:`grpo_prompt_width`).
  """
  config = grpo_prompt_width(config, model_cfg, grpo_prompt_len)
  stage = get_stage(config, model_cfg, abstract=True)
  plan = lora.plan_from_config(config, model_cfg)
  if plan is not None:   # LoRA: ``params`` are the adapters; the frozen pytree holds the (quantized) base
    stage, params = plan.wrap_stage(stage), plan.abstract_base(sharding_context(config, mesh))
  spec = stage.batch_spec()
  acc = int(config.optimizer.grad_accum)
  ctx = sharding_context(config, mesh)

  def leaf(path, s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    micro = _micro_rows(int(s.shape[0]), acc, ctx, f"stage {stage.name!r} batch leaf {jax.tree_util.keystr(path)}")
    return _leaf((acc, micro, *s.shape[1:]), s.dtype, ctx)

  batch = jax.tree_util.tree_map_with_path(leaf, spec)
  frozen = stage.init_frozen(params) if stage.init_frozen is not None else None
  rows, length = stage.sequences(spec)
  positions, head = stage.logit_shape or (length, 0)
  return stage, batch, frozen, StepShapes(rows, length, acc, positions, head)


# ----------------------------------------------------------------------------- compile

@dataclasses.dataclass
class Compiled:
  """One compiled program: XLA's memory and cost figures (per chip) or the OOM error's."""
  seconds: float
  memory: dict[str, int] | None = None
  cost: dict[str, float] | None = None
  oom: dict[str, float] | None = None
  error: str = ""
  kernel_flops: float = 0.0      # FLOPs of the splash kernels (custom calls XLA's cost model cannot see)


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


def parse_oom(text: str) -> dict[str, float] | None:
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
    oom = parse_oom(text)
    if oom is None and "RESOURCE_EXHAUSTED" not in text:
      raise
    return Compiled(time.perf_counter() - t0, oom=oom, error=text.strip().splitlines()[0][:500])
  out = Compiled(time.perf_counter() - t0)
  out.memory = memory_figures(compiled.memory_analysis())
  out.cost = _cost_dict(compiled.cost_analysis())
  out.kernel_flops = splash_kernel_flops(compiled.as_text())
  return out


_SPLASH_CALL = re.compile(r"%splash_mha_(fwd|dq|dkv)\S* = (.*?) custom-call\(")
_ARRAY = re.compile(r"(?:bf16|f32|f16)\[([\d,]+)\]")


def splash_kernel_flops(hlo_text: str) -> float:
  """Matmul FLOPs per chip of the splash attention custom calls in compiled HLO, each counted once
  (a loop body once, as XLA's cost analysis counts). From each call's output q-shaped array
  [..., heads, L, h] (self-attention: L keys): fwd 2 matmuls (4·heads·L²·h), dq 3, dkv 4
  (taken with the dq call's query heads, so GQA counts query heads)."""
  per = {"fwd": 4.0, "dq": 6.0, "dkv": 8.0}
  sizes: dict[str, list[float]] = {"fwd": [], "dq": [], "dkv": []}
  for kind, outs in _SPLASH_CALL.findall(hlo_text):
    dims = [tuple(int(d) for d in a.split(",")) for a in _ARRAY.findall(outs)]
    dims = [d for d in dims if len(d) >= 3]
    if dims:
      d = dims[0]
      sizes[kind].append(float(math.prod(d)) * d[-2])      # heads·L·h · L
  dq_mean = sum(sizes["dq"]) / len(sizes["dq"]) if sizes["dq"] else 0.0
  return (per["fwd"] * sum(sizes["fwd"]) + per["dq"] * sum(sizes["dq"])
          + per["dkv"] * dq_mean * len(sizes["dkv"]))


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
  ctx = sharding_context(config, mesh)
  rules = ctx.rules
  plan = lora.plan_from_config(config, model_cfg)   # LoRA: the state trains the adapters only
  params_shape = state_lib.abstract_params(model_cfg) if plan is None else plan.abstract_adapters()
  tx, schedule = optim.make_optimizer(config.optimizer, params_shape, int(config.steps))
  abstract, shardings = state_lib.state_shardings(
      model_cfg, tx, mesh, rules, params=None if plan is None else params_shape,
      axes=None if plan is None else plan.adapter_axes())
  stage, batch, frozen, shapes = abstract_step(config, model_cfg, mesh, abstract.params,
                                               grpo_prompt_len=grpo_prompt_len)
  step_fn = make_step_fn(stage, tx, schedule, shardings.params)
  with use_sharding(ctx):
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


# ----------------------------------------------------------------------------- samplers

SAMPLER_PROGRAMS = ("text_sampler", "t2i_sampler")
QUANTIZE_CHOICES = ("none", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class SamplerShapes:
  """One sampler call: ``text_sampler`` = block diffusion after a ``prompt_len`` prompt
  (``gen_length`` tokens, ``block_length`` blocks, ``steps`` forwards, ``cache`` mode, greedy);
  ``t2i_sampler`` = MaskGIT over ``image_tokens`` slots after a ``text_len`` prompt
  (``L = text_len + image_tokens + 3``), ``t2i_steps`` forwards of 2·batch rows with CFG."""
  program: str
  batch: int = 1
  prompt_len: int = 512
  gen_length: int = 256
  block_length: int = 32
  steps: int = 256
  cache: str = "prefix"
  text_len: int = 512
  image_tokens: int = 1024
  t2i_steps: int = 15
  cfg: bool = True

  @classmethod
  def parse(cls, program: str, text: str = "", **defaults: int) -> "SamplerShapes":
    """``program``'s shapes from ``defaults`` and ``key=value,…`` overrides (``text``)."""
    kw: dict[str, Any] = dict(defaults)
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "program"}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
      k, sep, v = part.partition("=")
      k = k.strip()
      if not sep or k not in fields:
        raise ValueError(f"--sampler_shapes entry {part!r}: expected key=value with key one of {sorted(fields)}")
      v = v.strip()
      if k == "cache":
        kw[k] = v
      elif k == "cfg":
        if v.lower() not in ("true", "false", "1", "0"):
          raise ValueError(f"--sampler_shapes cfg={v!r}: expected true or false")
        kw[k] = v.lower() in ("true", "1")
      else:
        try:
          kw[k] = int(v)
        except ValueError:
          raise ValueError(f"--sampler_shapes {k}={v!r}: expected an integer") from None
    out = cls(program, **kw)
    if out.cache not in ("none", "prefix", "dual"):
      raise ValueError(f"--sampler_shapes cache={out.cache!r}: expected none, prefix or dual")
    if out.gen_length % out.block_length or out.steps % (out.gen_length // out.block_length):
      raise ValueError(f"--sampler_shapes: gen_length {out.gen_length} must be a multiple of block_length "
                       f"{out.block_length} and steps {out.steps} of the number of blocks")
    return out

  @property
  def length(self) -> int:
    """Tokens per model row of the full-sequence forward."""
    if self.program == "text_sampler":
      return self.prompt_len + self.gen_length
    return self.text_len + self.image_tokens + 3


def inference_config(model_cfg: MMaDAConfig) -> MMaDAConfig:
  """The model config the samplers are compiled with: bfloat16 storage and compute (the
  training config's float32 master weights are a training choice), no remat."""
  return model_cfg.replace(param_dtype="bfloat16", dtype="bfloat16", remat_policy="none")


def abstract_sampler_params(model_cfg: MMaDAConfig, mesh: Mesh, rules, quantize: str) -> Any:
  """Abstract (sharded) inference parameters: bfloat16, or weight-only ``quantize``d."""
  from mmada_jax import quant
  spec = None if quantize == "none" else quant.QuantSpec.make(quantize)
  structs = quant.abstract_params(model_cfg, spec)
  shard = ShardingContext(mesh, rules).param_shardings(quant.param_axes(spec, model_cfg), structs)
  return quant.abstract_params(model_cfg, spec, shard)


def compile_sampler(shapes: SamplerShapes, model_cfg: MMaDAConfig, mesh: Mesh, ctx: ShardingContext,
                    quantize: str = "none", compiler_options: Mapping[str, Any] | None = None) -> Compiled:
  """Lowers and compiles the compiled sampler of ``shapes.program`` (the sampling package's own
  jitted loop) on ``mesh`` with abstract parameters (``quantize``: none | int8 | int4)."""
  from mmada_jax.sampling import cache as cache_lib, t2i as t2i_lib
  if shapes.program not in SAMPLER_PROGRAMS:
    raise ValueError(f"unknown sampler program {shapes.program!r}; use one of {SAMPLER_PROGRAMS}")
  if quantize not in QUANTIZE_CHOICES:
    raise ValueError(f"--quantize={quantize!r} is not one of {QUANTIZE_CHOICES}")
  if shapes.length > model_cfg.max_sequence_length:
    raise ValueError(f"{shapes.program}: {shapes.length} tokens exceed max_sequence_length "
                     f"{model_cfg.max_sequence_length}")
  params = abstract_sampler_params(model_cfg, mesh, ctx.rules, quantize)
  rep = NamedSharding(mesh, P())
  b = shapes.batch
  ids_sh = ctx.sharding(("batch", None), (b, shapes.length))
  ids = jax.ShapeDtypeStruct((b, shapes.length), jnp.int32, sharding=ids_sh)
  f32 = lambda: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  with use_sharding(ctx):
    if shapes.program == "text_sampler":
      rest = shapes.gen_length - shapes.block_length
      fn = functools.partial(
          cache_lib._cached_core, cfg=model_cfg, prompt_len=shapes.prompt_len, gen_length=shapes.gen_length,
          block_length=shapes.block_length, steps=shapes.steps, remasking="low_confidence", use_cfg=False,
          sample=False, mask_id=model_cfg.mask_token_id, record=False, cache=shapes.cache,
          window=shapes.block_length + (rest if shapes.cache == "prefix" else 0), use_threshold=False,
          min_transfer="best", use_stop=False)
      args = (params, ids, None, f32(), f32(), f32(), jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), None)
    else:
      n, t = shapes.image_tokens, shapes.t2i_steps
      # The LLaDA tokenizer's image offset; a smaller vocabulary (toy configs) ends with the codebook.
      offset = t2i_lib.IMAGE_TOKEN_OFFSET
      if offset + model_cfg.codebook_size > model_cfg.vocab_size:
        offset = model_cfg.vocab_size - model_cfg.codebook_size
      fn = functools.partial(
          t2i_lib._t2i_core, cfg=model_cfg, num_vq_tokens=n, codebook_size=model_cfg.codebook_size,
          image_token_offset=offset, prefix_len=shapes.text_len + 1, use_cfg=shapes.cfg,
          mask_id=model_cfg.mask_token_id, record=False)
      args = (params, ids, None, ids if shapes.cfg else None, None,
              jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep),
              jax.ShapeDtypeStruct((t,), jnp.float32, sharding=rep),
              jax.ShapeDtypeStruct((t,), jnp.int32, sharding=rep), key, None, None)
    return _compile(_Lowerable(fn), args, compiler_options)


class _Lowerable:
  """``fn(*args)`` (a partial of a jitted sampler core with its static settings) as ``.lower``."""

  def __init__(self, fn):
    self.fn = fn

  def lower(self, *args):
    core, kw = self.fn.func, self.fn.keywords
    return core.lower(*args, **kw)

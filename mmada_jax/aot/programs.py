"""The programs an AOT run compiles: the trainer's real step on abstract inputs, and the optimizer.

* :func:`abstract_step`: the registered stage built abstract, its batch spec laid out as the
  trainer's step batch ``[A, B/A, ...]``, its abstract frozen state, and :class:`StepShapes`;
* :func:`compile_step` / :func:`compile_optimizer`: lowered and compiled (libtpu for abstract TPU
  devices), returning XLA's memory and cost figures, or the out-of-memory error's
  (:func:`parse_oom`).
"""
from __future__ import annotations

import dataclasses
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
from mmada_jax.train import optim, state as state_lib
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
  ctx = sharding_context(config, mesh)
  rules = ctx.rules
  params_shape = state_lib.abstract_params(model_cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, params_shape, int(config.steps))
  abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
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

"""Train-step throughput of any training config on the local backend (prints one JSON line).

  python bench/bench_train.py --config=configs/tiny.py:pretrain [--steps=10 --warmup=2]
  python bench/bench_train.py --config=configs/mmada_8b.py:stage1_3,devices=8 \
      --config.mesh_shape=fsdp=-1 --config.model.remat_policy=dots --config.optimizer.grad_accum=1

The step is the trainer's (``make_step_fn`` + ``jit_step`` on the config's mesh, state from
``init_state`` with random parameters). Batches are ``--data=synthetic`` (default: random token
ids of the stage's exact batch shapes, so any config runs without its datasets) or ``stage``
(the stage's own iterator: toy or records, with its ``pre_step``). Any ``--config.*`` override
works.

Reported: steps/s and tokens/s over ``--steps`` timed steps after ``--warmup`` (each step waits
for the previous one); analytical MFU = model FLOPs (``mmada_jax.aot.analytical_flops``: the
trainer's 6·N_matmul·tokens + attention convention) / (step time · devices · peak), with the
peak looked up from the device kind (``config.peak_flops_per_device`` overrides it; no peak on
CPU = no MFU); peak device memory (``memory_stats()['peak_bytes_in_use']`` where the backend
reports it, e.g. GPU/TPU) and XLA's compiled memory analysis; the host's peak RSS.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed optimizer steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "stage"], "Batch source.")
_GRPO_PROMPT_LEN = flags.DEFINE_integer("grpo_prompt_len", 256, "UniGRPO prompt width when rl.max_prompt_len=0.")


def synthetic_batch(abstract_batch, vocab_size: int, seed: int = 0):
  """Random arrays of the abstract batch's shapes, dtypes and shardings (the same global values on
  every process). Token ids lie in [0, vocab); masks are 1 (``attention_mask``) or a random
  prompt prefix (``prompt_mask``); ``response_start`` leaves room for the response."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    shape, dtype = leaf.shape, np.dtype(leaf.dtype)
    if "attention_mask" in name or "seq_weight" in name:
      x = np.ones(shape, dtype)
    elif "prompt_mask" in name:
      cut = rng.integers(1, shape[-1] // 2, shape[:-1])[..., None]
      x = (np.arange(shape[-1]) < cut).astype(dtype)
    elif "response_start" in name:
      x = np.zeros(shape, dtype)
    elif dtype == np.bool_:
      x = rng.random(shape) < 0.5
    elif np.issubdtype(dtype, np.integer):
      x = rng.integers(0, vocab_size, shape).astype(dtype)
    else:
      x = rng.standard_normal(shape).astype(dtype) * 0.1
    return jax.make_array_from_callback(shape, leaf.sharding, lambda idx, x=x: x[idx])

  return jax.tree_util.tree_map_with_path(make, abstract_batch)


def run(config) -> dict:
  import jax
  import numpy as np

  from mmada_jax import aot
  from mmada_jax.sharding import ShardingContext, make_mesh, to_global, use_sharding
  from mmada_jax.train import metrics as metrics_lib, optim, state as state_lib
  from mmada_jax.train.stages import StepContext, get_stage
  from mmada_jax.train.step import jit_step, make_step_fn
  from mmada_jax.train.config import model_config

  model_cfg = model_config(config.model)
  mesh = make_mesh(str(config.mesh_shape))
  ctx = ShardingContext.create(mesh, str(config.sharding_preset), str(config.sharding_rules))
  rules = ctx.rules
  params_shape = state_lib.abstract_params(model_cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, params_shape, int(config.steps))
  abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  with use_sharding(ctx):
    state = state_lib.init_state(model_cfg, tx, shardings, int(config.seed))
  aot_stage, abstract_batch, _, shapes = aot.abstract_step(
      config, model_cfg, mesh, abstract.params, grpo_prompt_len=_GRPO_PROMPT_LEN.value)
  acc = int(config.optimizer.grad_accum)
  if _DATA.value == "stage":
    stage = get_stage(config, model_cfg)
    with use_sharding(ctx):
      frozen = stage.init_frozen(state.params) if stage.init_frozen else None
    data = stage.make_batches(jax.process_index(), jax.process_count())

    def next_batch(step):
      host = next(data)
      if stage.pre_step is not None:
        host = stage.pre_step(StepContext(state, step, mesh, config, model_cfg, frozen), host)
      rows, length = stage.sequences(host)
      return to_global(host, ctx, micro=acc), rows * jax.process_count() * length
  else:
    stage = aot_stage
    frozen = None
    if stage.init_frozen is not None:   # e.g. UniGRPO's reference policy: a copy of the params
      with use_sharding(ctx):
        frozen = stage.init_frozen(state.params)
    fixed = synthetic_batch(abstract_batch, model_cfg.vocab_size, int(config.seed))
    if "response_start" in fixed:
      start = shapes.length - shapes.logit_positions
      fixed["response_start"] = jax.make_array_from_callback(
          fixed["response_start"].shape, fixed["response_start"].sharding,
          lambda idx: np.full(fixed["response_start"].shape, start, np.int32)[idx])

    def next_batch(step):
      return fixed, shapes.rows * shapes.length

  step_fn = make_step_fn(stage, tx, schedule, shardings.params)
  batch, tokens = next_batch(0)
  t0 = time.perf_counter()
  with use_sharding(ctx):
    compiled = jit_step(step_fn, shardings, batch, frozen, mesh).lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  mem = None
  try:
    mem = aot.memory_figures(compiled.memory_analysis())
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass

  times, total_tokens = [], 0
  with use_sharding(ctx):
    for i in range(_WARMUP.value + _STEPS.value):
      if i:
        batch, tokens = next_batch(i)
      t = time.perf_counter()
      state, metrics = compiled(state, batch, frozen)
      jax.block_until_ready((state, metrics))
      if i >= _WARMUP.value:
        times.append(time.perf_counter() - t)
        total_tokens += tokens
  elapsed = sum(times)
  step_s = elapsed / len(times)
  dev = jax.devices()[0]
  peak = metrics_lib.peak_flops_per_device(dev.device_kind, float(config.peak_flops_per_device))
  flops = aot.analytical_flops(model_cfg, shapes)
  peak_mem = metrics_lib.peak_device_memory_bytes()
  return {
      "config": sys.argv[1:], "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "devices": jax.device_count(), "mesh": dict(mesh.shape), "stage": str(config.stage.name),
      "params": model_cfg.num_params(), "remat_policy": model_cfg.remat_policy, "data": _DATA.value,
      "rows_per_step": shapes.rows, "seq_len": shapes.length, "grad_accum": acc,
      "compile_s": round(compile_s, 2), "steps_timed": len(times), "step_s": step_s,
      "step_s_min": min(times), "steps_per_s": 1.0 / step_s, "tokens_per_s": total_tokens / elapsed,
      "model_flops_per_step": flops, "peak_flops_per_device": peak,
      "mfu": flops / step_s / (peak * jax.device_count()) if peak else None,
      "peak_device_memory_bytes": peak_mem, "compiled_memory": mem,
      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "final_loss": float(jax.device_get(metrics["loss"])),
  }


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py:pretrain")
  print(json.dumps(run(_CONFIG.value)), flush=True)


if __name__ == "__main__":
  app.run(main)

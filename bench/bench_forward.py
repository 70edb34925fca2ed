"""Forward throughput and conversion memory benchmark (prints JSON; not a test).

  python bench/bench_forward.py forward [--batch 4 --length 512 --dtypes float32,bfloat16]
  python bench/bench_forward.py convert-memory [--params 1e9]
  python bench/bench_forward.py head-gemm [--batch 4 --length 291 --repeats 5]

``forward``: tokens/s of a ~100M-parameter MMaDA config on the default backend, fp32 and bf16
compute (fp32 parameters). ``convert-memory``: writes a synthetic sharded bf16 checkpoint in the
original layout, converts it to Orbax in a subprocess, and reports that process's peak RSS
against the size of one copy of the weights. ``head-gemm``: the CPU comparison work (d_model 256,
4 layers, 8 heads, MLP 704, the full 134,656 vocabulary, fp32): the jitted forward with full
logits, its model FLOP/s (forward = a third of the trainer's 6·N·tokens + attention count), and the
LM-head GEMM [tokens, 256] × [256, 134656] alone through XLA and through numpy's BLAS (median of
``--repeats``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _config(kind: str):
  from mmada_jax.model import MMaDAConfig
  if kind == "100m":
    return MMaDAConfig(vocab_size=32768, d_model=640, n_heads=10, n_kv_heads=10, n_layers=12,
                       mlp_hidden_size=1728, mask_token_id=32767, eos_token_id=2, pad_token_id=2)
  if kind == "1b":
    return MMaDAConfig(vocab_size=32768, d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16,
                       mlp_hidden_size=5632, mask_token_id=32767, eos_token_id=2, pad_token_id=2)
  raise ValueError(kind)


def bench_forward(args) -> dict:
  import jax
  import jax.numpy as jnp
  from mmada_jax.model import transformer
  base = _config("100m")
  params = jax.jit(transformer.init_params, static_argnums=0)(base, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.length), 0, base.vocab_size)
  out = {"config": "100m", "params": base.num_params(), "batch": args.batch, "length": args.length,
         "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}
  for dt in args.dtypes.split(","):
    cfg = base.replace(dtype=dt)
    fn = jax.jit(lambda p, x: transformer.forward(p, cfg, x, return_hidden=True))   # hidden: no vocab matmul
    fn_logits = jax.jit(lambda p, x: transformer.forward(p, cfg, x).max())
    for name, f in (("hidden", fn), ("logits", fn_logits)):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, ids))
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, ids))
        times.append(time.perf_counter() - t0)
      best = min(times)
      out[f"{dt}.{name}.tokens_per_s"] = round(args.batch * args.length / best, 1)
      out[f"{dt}.{name}.step_s"] = round(best, 4)
      out[f"{dt}.{name}.first_call_s"] = round(compile_s, 2)
  return out


def bench_head_gemm(args) -> dict:
  import statistics
  import jax
  import jax.numpy as jnp
  from mmada_jax.model import MMaDAConfig, transformer
  from mmada_jax.train import metrics as metrics_lib
  cfg = MMaDAConfig(d_model=256, n_heads=8, n_kv_heads=8, n_layers=4, mlp_hidden_size=704)
  params = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.length), 0, 126000)
  tokens = args.batch * args.length

  def timed(f, *a):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  fwd = timed(jax.jit(lambda p, x: transformer.forward(p, cfg, x).max()), params, ids)
  h = jax.random.normal(jax.random.key(2), (tokens, cfg.d_model))
  xla = timed(jax.jit(lambda h, w: (h @ w).max()), h, params["lm_head"])
  hn, wn = np.asarray(h), np.asarray(params["lm_head"])
  blas = timed(lambda: (hn @ wn).max())
  gemm_flops = 2.0 * tokens * cfg.d_model * cfg.vocab_size
  fwd_flops = metrics_lib.flops_per_step(cfg, args.batch, args.length) / 3
  return {"batch": args.batch, "length": args.length, "params": cfg.num_params(),
          "forward_s": round(fwd, 4), "forward_gflops": round(fwd_flops / fwd / 1e9, 2),
          "head_gemm_flops": gemm_flops, "xla_gemm_s": round(xla, 4), "xla_gemm_gflops": round(gemm_flops / xla / 1e9, 2),
          "numpy_gemm_s": round(blas, 4), "numpy_gemm_gflops": round(gemm_flops / blas / 1e9, 2),
          "forward_flops": fwd_flops}


def _write_synthetic(path: str, n_params_target: float) -> tuple[int, int]:
  import ml_dtypes
  from mmada_jax.checkpoint import hf_mmada
  from mmada_jax.checkpoint.safetensors_io import write_safetensors
  cfg = _config("1b") if n_params_target >= 5e8 else _config("100m")
  shapes = hf_mmada.original_shapes(cfg)
  rng = np.random.default_rng(0)

  def tensors():
    for k, shape in shapes.items():
      yield k, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  write_safetensors(tensors(), path, "model.safetensors", max_shard_bytes=500 * 2**20)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.replace(param_dtype="bfloat16").to_hf_config(), f)
  return cfg.num_params(), cfg.num_params() * 2


def bench_convert_memory(args) -> dict:
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
    t0 = time.perf_counter()
    n, nbytes = _write_synthetic(src, args.params)
    write_s = time.perf_counter() - t0
    code = ("import resource,sys; from mmada_jax.convert import main; rc=main(['to-orbax', sys.argv[1], sys.argv[2]]);"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, src, dst], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    conv_s = time.perf_counter() - t0
    if proc.returncode:
      raise RuntimeError(proc.stderr[-2000:])
    peak = int([l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB")][0].split()[1]) * 1024
    base = subprocess.run([sys.executable, "-c", "import resource, jax, mmada_jax.convert; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True).stdout.strip()
    n_shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
    return {"params": n, "weights_bytes": nbytes, "shards": n_shards, "peak_rss_bytes": peak,
            "import_baseline_rss_bytes": int(base) * 1024,
            "peak_over_one_copy": round(peak / nbytes, 3),
            "peak_minus_baseline_over_one_copy": round((peak - int(base) * 1024) / nbytes, 3),
            "write_synthetic_s": round(write_s, 1), "convert_s": round(conv_s, 1)}


def main():
  p = argparse.ArgumentParser()
  sub = p.add_subparsers(dest="cmd", required=True)
  f = sub.add_parser("forward")
  f.add_argument("--batch", type=int, default=4)
  f.add_argument("--length", type=int, default=512)
  f.add_argument("--repeats", type=int, default=3)
  f.add_argument("--dtypes", default="float32,bfloat16")
  g = sub.add_parser("head-gemm")
  g.add_argument("--batch", type=int, default=4)
  g.add_argument("--length", type=int, default=291)
  g.add_argument("--repeats", type=int, default=5)
  c = sub.add_parser("convert-memory")
  c.add_argument("--params", type=float, default=1e9)
  c.add_argument("--tmp", default=None)
  args = p.parse_args()
  result = {"forward": bench_forward, "head-gemm": bench_head_gemm, "convert-memory": bench_convert_memory}[args.cmd](args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()

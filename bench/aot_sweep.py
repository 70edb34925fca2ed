"""Runs ``python -m mmada_jax.aot`` over the planning grid of docs/aot.md and prints its tables.

  python bench/aot_sweep.py --out=runs/aot [--jobs=2] [--only=v5p-64] [--grid=plan|tuning|kernels|long_cot|samplers|all]

Each entry compiles one 8B stage (``configs/mmada_8b.py``) for one TPU slice with the settings
given here (mesh, remat policy, gradient accumulation, LM-head chunking) and stores the report as
``OUT/NAME.json``; entries whose JSON exists are not recompiled, so an interrupted sweep resumes.
The global batch of every stage is the config's (the original's 64-device batch): on a slice
with fewer chips, gradient accumulation grows to keep rows per chip per micro-batch small.

v5e/v6e entries other than stage 1.3 compile the step only (``twins=False``: memory, no cost
figures): libtpu's cost model gives no step time for those generations (see mmada_jax/aot/__init__.py).

Grids:
  * ``plan``: the best settings found per (stage, slice), the docs/aot.md table;
  * ``tuning``: stage 1.3 on v5p-64 under each remat policy / accumulation / mesh tried;
  * ``grpo``: UniGRPO updates at the configs' accumulation of 4 (the plan uses less);
  * ``alternatives``: other meshes / remat policies tried for stage 1.3 on v5e-256 and v6e-64.
  * ``kernels``: stage 1.3 on v5p-64 with splash attention and the fused LM-head loss against einsum;
  * ``long_cot``: the long-CoT SFT step (lm_chat rows of L = 4096 / 8192) on v5p-64, einsum vs splash;
  * ``samplers``: the 8B text sampler (``--program=text_sampler``) at L = 4096 on v5p-64.

Needs the ``libtpu`` wheel (``pip install -r requirements-aot.txt``); every compile runs in its
own ``JAX_PLATFORMS=cpu`` process (about 1–4 minutes and 2–4 GB of host memory each).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30

DNB = "dots_with_no_batch_dims"


def _e(name: str, variant: str, topology: str, twins: bool = True, **overrides: Any) -> dict[str, Any]:
  return {"name": name, "variant": variant, "topology": topology, "overrides": overrides, "twins": twins}


# Best settings found per slice (global batch fixed by the config; see module docstring).
PLAN = [
    # v5p-32: 16 chips × 95 GiB
    _e("v5p32_s11", "stage1_1", "v5p-32", remat_policy=DNB, grad_accum=4),
    _e("v5p32_s12", "stage1_2", "v5p-32", remat_policy=DNB, grad_accum=4),
    _e("v5p32_s13", "stage1_3", "v5p-32", remat_policy=DNB, grad_accum=16),
    _e("v5p32_s21", "stage2_1", "v5p-32", remat_policy=DNB, grad_accum=8),
    _e("v5p32_grpo_A2", "stage3_grpo", "v5p-32", remat_policy=DNB, grad_accum=2),
    # v5p-64: 32 chips
    _e("v5p64_s11", "stage1_1", "v5p-64", remat_policy=DNB, grad_accum=2),
    _e("v5p64_s12", "stage1_2", "v5p-64", remat_policy=DNB, grad_accum=2),
    _e("v5p64_s13", "stage1_3", "v5p-64", remat_policy=DNB, grad_accum=8),
    _e("v5p64_s21", "stage2_1", "v5p-64", remat_policy=DNB, grad_accum=4),
    _e("v5p64_grpo_A1", "stage3_grpo", "v5p-64", remat_policy=DNB, grad_accum=1),
    _e("v5p64_grpo_mmu_A2", "stage3_grpo_mmu", "v5p-64", remat_policy=DNB, grad_accum=2),
    _e("v5p64_grpo_t2i_A2", "stage3_grpo_t2i", "v5p-64", remat_policy=DNB, grad_accum=2),
    # v5p-128: 64 chips
    _e("v5p128_s11", "stage1_1", "v5p-128", remat_policy=DNB, grad_accum=2),
    _e("v5p128_s12", "stage1_2", "v5p-128", remat_policy=DNB, grad_accum=2),
    _e("v5p128_s13", "stage1_3", "v5p-128", remat_policy=DNB, grad_accum=4),
    _e("v5p128_s21", "stage2_1", "v5p-128", remat_policy=DNB, grad_accum=4),
    _e("v5p128_grpo_A1", "stage3_grpo", "v5p-128", remat_policy=DNB, grad_accum=1),
    # v5e-256: 256 chips × 16 GiB: 8B weights + Adam state need tensor parallelism beside FSDP
    _e("v5e256_s11", "stage1_1", "v5e-256", twins=False, remat_policy="minimal", grad_accum=1, mesh_shape="fsdp=128,tensor=2"),
    _e("v5e256_s12", "stage1_2", "v5e-256", twins=False, remat_policy="minimal", grad_accum=1, mesh_shape="fsdp=128,tensor=2"),
    _e("v5e256_s13", "stage1_3", "v5e-256", remat_policy="minimal", grad_accum=2, mesh_shape="fsdp=128,tensor=2"),
    _e("v5e256_s21", "stage2_1", "v5e-256", twins=False, remat_policy="minimal", grad_accum=2, mesh_shape="fsdp=128,tensor=2"),
    _e("v5e256_grpo", "stage3_grpo", "v5e-256", twins=False, remat_policy="minimal", grad_accum=1, mesh_shape="fsdp=128,tensor=2"),
    # v6e-64: 64 chips × 32 GiB
    _e("v6e64_s11", "stage1_1", "v6e-64", twins=False, remat_policy="minimal", grad_accum=2),
    _e("v6e64_s12", "stage1_2", "v6e-64", twins=False, remat_policy="minimal", grad_accum=2),
    _e("v6e64_s13", "stage1_3", "v6e-64", remat_policy="minimal", grad_accum=4),
    _e("v6e64_s21", "stage2_1", "v6e-64", twins=False, remat_policy="minimal", grad_accum=4),
    _e("v6e64_grpo", "stage3_grpo", "v6e-64", twins=False, remat_policy="minimal", grad_accum=4),
]

# Stage 1.3 on v5p-64 (32 chips): what moved memory and the estimated MFU.
TUNING = [
    _e("tune_full_A4", "stage1_3", "v5p-64", remat_policy="full", grad_accum=4),
    _e("tune_minimal_A4", "stage1_3", "v5p-64", remat_policy="minimal", grad_accum=4),
    _e("tune_qkv_A4", "stage1_3", "v5p-64", remat_policy="save_qkv_out", grad_accum=4),
    _e("tune_dnb_A4", "stage1_3", "v5p-64", remat_policy=DNB, grad_accum=4),
    _e("tune_dnb_A4_chunk256", "stage1_3", "v5p-64", remat_policy=DNB, grad_accum=4, logits_chunk=256),
    _e("tune_dnb_A8", "stage1_3", "v5p-64", remat_policy=DNB, grad_accum=8),
    _e("tune_dnb_A8_data2", "stage1_3", "v5p-64", remat_policy=DNB, grad_accum=8, mesh_shape="data=2,fsdp=16"),
    _e("tune_none_A8", "stage1_3", "v5p-64", remat_policy="none", grad_accum=8),
]

# v5e / v6e alternatives for stage 1.3 (no cost-model time there: ranked by memory and the
# roofline bound).
ALTERNATIVES = [
    _e("v5e256_s13_full_fsdp256_A1_chunk256", "stage1_3", "v5e-256", twins=False, remat_policy="full",
       grad_accum=1, logits_chunk=256),
    _e("v5e256_s13_full_t2_A2", "stage1_3", "v5e-256", twins=False, remat_policy="full", grad_accum=2,
       mesh_shape="fsdp=128,tensor=2"),
    _e("v6e64_s13_dnb_A4", "stage1_3", "v6e-64", twins=False, remat_policy=DNB, grad_accum=4),
]

# UniGRPO: the policy update at the config's accumulation (4) against the plan's smaller one.
TUNING_GRPO = [
    _e("v5p32_grpo", "stage3_grpo", "v5p-32", remat_policy=DNB, grad_accum=4),
    _e("v5p64_grpo", "stage3_grpo", "v5p-64", remat_policy=DNB, grad_accum=4),
    _e("v5p64_grpo_mmu", "stage3_grpo_mmu", "v5p-64", remat_policy=DNB, grad_accum=4),
    _e("v5p64_grpo_t2i", "stage3_grpo_t2i", "v5p-64", remat_policy=DNB, grad_accum=4),
    _e("v5p128_grpo", "stage3_grpo", "v5p-128", remat_policy=DNB, grad_accum=4),
]

# Flash attention (splash) and the fused LM-head loss (issue 15): stage 1.3 on v5p-64, einsum
# attention (``attention_impl=xla``) against splash; the fused chunked loss in both.
KERNELS = [
    _e("k_s13_splash_A8_chunk512", "stage1_3", "v5p-64", attention_impl="splash", remat_policy=DNB, grad_accum=8,
       logits_chunk=512),
    _e("k_s13_xla_A8_chunk512", "stage1_3", "v5p-64", attention_impl="xla", remat_policy=DNB, grad_accum=8,
       logits_chunk=512),
    _e("k_s13_splash_A4_chunk512", "stage1_3", "v5p-64", attention_impl="splash", remat_policy=DNB, grad_accum=4,
       logits_chunk=512),
]

# Long-CoT SFT: stage 2.1's text (lm_chat) flow alone, rows of L = S + N + 3 tokens (S = L - 1027),
# its 512 rows per step; einsum attention against splash.
_LONG = dict(remat_policy=DNB, grad_accum=16, logits_chunk=512, t2i_rows=0, mmu_rows=0)
LONG_COT = [
    _e(f"cot{L}_{impl}", "stage2_1", "v5p-64", attention_impl=impl, max_text_len=L - 1027, **_LONG)
    for L in (4096, 8192) for impl in ("xla", "splash")
] + [   # memory only (one compile each, no cost twins)
    _e(f"cot{L}_{impl}_mem", "stage2_1", "v5p-64", twins=False, attention_impl=impl, max_text_len=L - 1027, **_LONG)
    for L in (8192, 4096) for impl in ("splash", "xla")
]

# Inference: the 8B text sampler (bfloat16 weights) at L = 4096 (3840 prompt + 256 generated,
# blocks of 32, 256 steps), full-sequence (cache=none) and prefix-cached; memory only.
SAMPLERS = [
    _e(f"sampler_text_L4096_{cache}", "stage2_1", "v5p-64", twins=False, program="text_sampler",
       sampler_shapes=f"prompt_len=3840,gen_length=256,block_length=32,steps=256,cache={cache}")
    for cache in ("none", "prefix")
]

_KEYS = {"remat_policy": "model.remat_policy", "grad_accum": "optimizer.grad_accum", "mesh_shape": "mesh_shape",
         "logits_chunk": "stage.logits_chunk", "attention_impl": "model.attention_impl",
         "max_text_len": "data.max_text_len", "t2i_rows": "data.t2i.batch_size", "mmu_rows": "data.mmu.batch_size"}
_FLAGS = ("program", "sampler_shapes")   # mmada_jax.aot flags rather than config overrides


def command(entry: dict[str, Any]) -> list[str]:
  """The ``mmada_jax.aot`` command line of one grid entry."""
  cmd = [sys.executable, "-m", "mmada_jax.aot", "--json", f"--config=configs/mmada_8b.py:{entry['variant']}",
         f"--topology={entry['topology']}"]
  for k, v in entry["overrides"].items():
    cmd.append(f"--{k}={v}" if k in _FLAGS else f"--config.{_KEYS[k]}={v}")
  if not entry.get("twins", True):
    cmd.append("--twins=false")
  return cmd


def run_entry(entry: dict[str, Any], out: pathlib.Path, retries: int = 1) -> dict[str, Any]:
  """Compiles one entry (or reads its stored report); returns the report or {"error": ...}."""
  path = out / f"{entry['name']}.json"
  if path.exists():
    return json.loads(path.read_text())
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  for attempt in range(retries + 1):
    proc = subprocess.run(command(entry), cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.strip().startswith("{")]
    if proc.returncode == 0 and lines:
      report = json.loads(lines[-1])
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(report, sort_keys=True, default=float))
      tmp.replace(path)
      return report
    # libtpu occasionally fails to describe a topology while another process initialises it.
    if "host bounds" not in proc.stderr or attempt == retries:
      return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
  return {"error": "unreachable"}


def _fmt_row(entry: dict[str, Any], r: dict[str, Any]) -> str:
  if "error" in r:
    return f"| {entry['variant']} | {entry['topology']} | – | – | – | – | error: {r['error'][:80]} | | | |"
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
  if "program" in r:   # a sampler program: memory only
    hbm, cap, sh = r["hbm_per_chip_bytes"], r["hbm_capacity_bytes"], r["shapes"]
    what = f"{r['program']} ({r['quantize']}, cache {sh['cache']}, batch {sh['batch']})"
    cell = f"{hbm / GIB:.1f} / {cap / GIB:.0f} ({100 * (1 - hbm / cap):.0f}% free)" if hbm else "does not fit"
    return (f"| {what} | {r['topology']} ({r['chips']}) | {mesh} | – | – | {r['seq_len']} | {cell} | "
            f"{'yes' if r['fits'] else 'NO'} | – | – | – |")
  hbm = r.get("hbm_per_chip_bytes")
  cap = r["hbm_capacity_bytes"]
  mem = f"{hbm / GIB:.1f} / {cap / GIB:.0f}" if hbm else "–"
  head = f"{100 * (1 - hbm / cap):.0f}%" if hbm else "–"
  secs = r.get("estimated_step_seconds")
  mfu = (f"{100 * r['estimated_mfu']:.1f}%" if r.get("estimated_mfu") else
         "n/a¹" if r.get("cost_model_note") else "–")
  cell = f"{mem} ({head} free)"
  if not r["fits"]:
    cell = f"needs {hbm / GIB:.1f} of {cap / GIB:.1f}" if hbm else "does not fit"
  roof = f"{100 * r['roofline_mfu_bound']:.0f}%" if r.get("roofline_mfu_bound") else "–"
  chunk = f", chunk {r['logits_chunk']}" if r.get("logits_chunk") else ""
  return (f"| {entry['variant']} | {r['topology']} ({r['chips']}) | {mesh} | {r['remat_policy']}{chunk} | "
          f"{r['grad_accum']} × {r['rows_per_shard_micro']:g} | {r['seq_len']} | {cell} | "
          f"{'yes' if r['fits'] else 'NO'} | {f'{secs:.2f}' if secs else '–'} | {mfu} | {roof} |")


HEADER = ("| stage | slice (chips) | mesh | remat | accum × rows/shard | L | HBM GiB/chip | fits | est. step s | "
          "est. MFU | roofline MFU bound |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/aot", help="Folder for the per-entry JSON reports.")
  ap.add_argument("--jobs", type=int, default=1, help="Compiles run in parallel (each ~1 core, 2-4 GB).")
  ap.add_argument("--only", default="", help="Comma-separated slice names or entry names to run.")
  ap.add_argument("--grid", choices=("plan", "tuning", "grpo", "alternatives", "kernels", "long_cot", "samplers",
                                     "all"), default="all")
  a = ap.parse_args(argv)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  grids = {"plan": PLAN, "tuning": TUNING, "grpo": TUNING_GRPO, "alternatives": ALTERNATIVES, "kernels": KERNELS,
           "long_cot": LONG_COT, "samplers": SAMPLERS}
  chosen = [(g, e) for g in (tuple(grids) if a.grid == "all" else (a.grid,)) for e in grids[g]]
  only = {s.strip() for s in a.only.split(",") if s.strip()}
  if only:
    chosen = [(g, e) for g, e in chosen if e["topology"] in only or e["name"] in only]
  with cf.ThreadPoolExecutor(max(1, a.jobs)) as pool:
    futures = {e["name"]: pool.submit(run_entry, e, out) for _, e in chosen}
    results = {}
    for name, fut in futures.items():
      results[name] = fut.result()
      print(f"[aot_sweep] {name}: {'error' if 'error' in results[name] else 'done'}", file=sys.stderr, flush=True)
  for g in dict.fromkeys(g for g, _ in chosen):
    print(f"\n### {g}\n\n{HEADER}")
    for gg, e in chosen:
      if gg == g:
        print(_fmt_row(e, results[e["name"]]))
  return 0


if __name__ == "__main__":
  sys.exit(main())

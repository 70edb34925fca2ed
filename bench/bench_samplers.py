"""Sampler throughput benchmark with random weights (prints JSON; not a test).

  python bench/bench_samplers.py [--batch 2 --prompt 64 --gen 64 --block 16 --steps 32 ...]
  python bench/bench_samplers.py --config=configs/mmada_8b.py:stage1_3 --param-dtype=bfloat16 --batch=1

The model is a small one built from ``--d-model/--layers/--heads`` or, with ``--config``, the
``model`` section of any training config (``path[:variant]``; e.g. the 8B architecture).

Reports text tokens/s of the plain sampler (full recompute every step), the prefix- and dual-cached
samplers, and cached + confidence-threshold decoding; the share of generated tokens identical to
the plain sampler's; model calls per run; T2I images/s of the plain MaskGIT sampler; peak device
memory where the backend reports it (GPU/TPU ``memory_stats``) and the host's peak RSS.

The model is random, so its softmax is nearly flat (top-1 probability ~ 1/V) and a 0.9
threshold would never fire; ``--head-scale`` multiplies the LM head to make the predictions
peaky enough for threshold decoding to commit several tokens per step (the figure is a property
of this synthetic model, not of a trained one). The real 134656-token vocabulary and special ids
are kept.
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def _timed(fn, repeats: int):
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return out, best, first


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="", help="Training config path[:variant]; its model section is benchmarked.")
  ap.add_argument("--param-dtype", default="", help="Parameter dtype override (e.g. bfloat16 for 8B inference).")
  ap.add_argument("--dtype", default="", help="Compute dtype override.")
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--gen", type=int, default=64)
  ap.add_argument("--block", type=int, default=16)
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--threshold", type=float, default=0.9)
  ap.add_argument("--head-scale", type=float, default=40.0)
  ap.add_argument("--t2i-text", type=int, default=32)
  ap.add_argument("--t2i-tokens", type=int, default=256)
  ap.add_argument("--t2i-steps", type=int, default=12)
  ap.add_argument("--t2i-guidance", type=float, default=3.5)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()

  import jax
  import numpy as np

  from mmada_jax.model import MMaDAConfig, transformer
  from mmada_jax.prompting.special_tokens import LLADA_RESERVED_IDS
  from mmada_jax.sampling.cache import generate_text_cached
  from mmada_jax.sampling.t2i import IMAGE_TOKEN_OFFSET, generate_image_tokens
  from mmada_jax.sampling.text import generate_text

  if args.config:
    from mmada_jax.train.config import model_config
    from mmada_jax.train.config_files import load_config_file
    cfg = model_config(load_config_file(args.config).model)
    args.t2i_tokens = cfg.num_vq_tokens
  else:
    cfg = MMaDAConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads,
                      n_layers=args.layers, mlp_hidden_size=int(args.d_model * 2.75) // 32 * 32,
                      num_vq_tokens=args.t2i_tokens)
  import dataclasses
  over = {k: v for k, v in (("param_dtype", args.param_dtype), ("dtype", args.dtype)) if v}
  if over:
    cfg = dataclasses.replace(cfg, **over)

  @jax.jit
  def init(key):
    p = transformer.init_params(cfg, key)
    return {**p, "lm_head": (p["lm_head"] * args.head_scale).astype(p["lm_head"].dtype)}

  params = init(jax.random.key(0))
  rng = np.random.default_rng(0)
  # Token ids: the real layout (image codes after the 126,349-token text vocabulary) when the
  # model has the real vocabulary; otherwise image codes in the last codebook_size rows.
  real = cfg.vocab_size >= IMAGE_TOKEN_OFFSET + cfg.codebook_size
  offset = IMAGE_TOKEN_OFFSET if real else cfg.vocab_size - cfg.codebook_size
  text_lo, text_hi = (200, 126000) if real else (4, offset - 3)
  reserved = LLADA_RESERVED_IDS
  soi, eoi, uncond_id = (reserved["soi"], reserved["eoi"], reserved["ipad"]) if real else (offset - 3, offset - 2, offset - 1)
  if text_hi - text_lo < 16:
    raise SystemExit(f"bench_samplers: vocabulary of {cfg.vocab_size} is too small for the benchmark's prompts")

  def text_ids(shape):
    x = rng.integers(text_lo, text_hi, shape)
    return np.where(x == cfg.mask_token_id, text_lo, x)

  prompt = text_ids((args.batch, args.prompt))
  b, g = args.batch, args.gen
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
         "config": {"source": args.config or "flags", "d_model": cfg.d_model, "layers": cfg.n_layers,
                    "heads": cfg.n_heads, "vocab": cfg.vocab_size, "params": cfg.num_params(),
                    "param_dtype": cfg.param_dtype, "dtype": cfg.dtype, "head_scale": args.head_scale},
         "text": {"batch": b, "prompt": args.prompt, "gen_length": g, "block_length": args.block,
                  "steps": args.steps, "threshold": args.threshold}}
  kw = dict(gen_length=g, block_length=args.block, steps=args.steps)

  plain, t_plain, c_plain = _timed(lambda: generate_text(params, cfg, prompt, **kw).tokens, args.repeats)
  plain = np.asarray(plain)[:, args.prompt:]
  res = {"plain": {"tokens_per_s": round(b * g / t_plain, 1), "run_s": round(t_plain, 3),
                   "first_call_s": round(c_plain, 2), "model_calls": args.steps}}
  variants = {
      "cached_prefix": dict(cache="prefix"),
      "cached_dual": dict(cache="dual"),
      "cached_prefix_threshold": dict(cache="prefix", threshold=args.threshold),
      "cached_dual_threshold": dict(cache="dual", threshold=args.threshold),
      "nocache_threshold": dict(cache="none", threshold=args.threshold),
  }
  for name, extra in variants.items():
    r, t, c = _timed(lambda extra=extra: generate_text_cached(params, cfg, prompt, **kw, **extra), args.repeats)
    toks = np.asarray(r.tokens)[:, args.prompt:]
    res[name] = {"tokens_per_s": round(b * g / t, 1), "run_s": round(t, 3), "first_call_s": round(c, 2),
                 "model_calls": int(r.n_forward), "agreement_with_plain": round(float(np.mean(toks == plain)), 4),
                 "speedup_vs_plain": round(t_plain / t, 2)}
  out["text"]["results"] = res

  n, s = args.t2i_tokens, args.t2i_text
  total = s + n + 3
  ids = np.full((b, total), cfg.mask_token_id, np.int64)
  ids[:, :s + 1] = text_ids((b, s + 1))
  ids[:, s + 1], ids[:, -1] = soi, eoi
  uncond = ids.copy()
  uncond[:, :s + 1] = uncond_id
  t2i_kw = dict(uncond_input_ids=uncond, steps=args.t2i_steps, guidance_scale=args.t2i_guidance,
                seed=1, image_token_offset=offset)
  r, t, c = _timed(lambda: generate_image_tokens(params, cfg, ids, **t2i_kw).codes, args.repeats)
  out["t2i"] = {"batch": b, "image_tokens": n, "text_len": s, "timesteps": args.t2i_steps,
                "guidance": args.t2i_guidance, "images_per_s": round(b / t, 3), "run_s": round(t, 3),
                "first_call_s": round(c, 2)}
  from mmada_jax.train.metrics import peak_device_memory_bytes
  out["peak_device_memory_bytes"] = peak_device_memory_bytes()
  out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()

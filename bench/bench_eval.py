"""Evaluation-harness benchmark on a finished demo run (prints JSON; not a test).

  python bench/bench_eval.py --run DIR [--repeats 5 --likelihood-n 32 --mc 8,32]

``DIR`` is a ``python -m mmada_jax.demo`` workdir (``model/``, ``text_tokenizer/``,
``eval/arithmetic.jsonl``). Generation: the ``demo_arithmetic`` preset of ``configs/eval.py``
run through :func:`mmada_jax.eval.runner.run` (what ``python -m mmada_jax.eval`` calls) with the
plain sampler, the prefix / dual KV caches, and each cache with confidence-threshold decoding;
reported: accuracy, examples/s and tokens/s, and each variant's examples/s over the plain one's.
Likelihood: the arithmetic answers in the model's own format (``<think> a + b = c </think> c``)
scored by :func:`mmada_jax.eval.likelihood.log_likelihood` after the chat-templated question
(as the harness's likelihood tasks score a choice), once per ``--mc`` value; reported:
examples/s, the mean estimate and its mean Monte-Carlo standard error, and the share of examples
whose correct answer outscores the same answer off by one.

Every timing excludes compilation: each variant first runs once over the same examples (every
prompt length compiled), then ``--repeats`` timed runs, each into a fresh workdir; the best is
reported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time
from typing import Any

VARIANTS = {"plain": "", "prefix": "cache=prefix", "dual": "cache=dual",
            "prefix_threshold": "cache=prefix,threshold={t}", "dual_threshold": "cache=dual,threshold={t}"}


def _eval_config(run_dir: str, overrides: str) -> Any:
  from mmada_jax.train.config_files import load_config_file
  c = load_config_file("configs/eval.py:demo_arithmetic" + (f",{overrides}" if overrides else ""))
  c.model = os.path.join(run_dir, "model")
  c.text_tokenizer = os.path.join(run_dir, "text_tokenizer")
  c.data = os.path.join(run_dir, "eval", "arithmetic.jsonl")
  return c


def _timed_run(ec: Any, loaded: Any, repeats: int) -> tuple[dict[str, Any], float, float]:
  """(result, best seconds, warm-up seconds) of ``runner.run``; every call gets a fresh workdir."""
  from mmada_jax.eval import runner
  times = []
  for _ in range(repeats + 1):
    with tempfile.TemporaryDirectory() as wd:
      t0 = time.perf_counter()
      result = runner.run(ec, wd, loaded=loaded)
      times.append(time.perf_counter() - t0)
  return result, min(times[1:]), times[0]


def _answer(question: str, target: str) -> str:
  """The answer as the demo model writes it, or the bare number when the question has no
  ``What is EXPR?`` form."""
  m = re.fullmatch(r"What is (.+)\?", question.strip())
  return f"<think> {m.group(1)} = {target} </think> {target}" if m else target


def _off_by_one(target: str) -> str:
  try:
    return str(int(target) + 1)
  except ValueError:
    return target + "0"


def _likelihood(loaded: Any, examples: list[Any], mc_num: int, batch_size: int, seed: int,
                repeats: int) -> dict[str, Any]:
  import jax
  import numpy as np

  from mmada_jax.eval import batching, likelihood
  tok = loaded.tokenizer
  items = []
  for ex in examples:
    ctx = batching.prompt_ids(tok, ex.question, chat=True)
    pair = [tok.encode(_answer(ex.question, t), add_special_tokens=False) for t in (ex.target, _off_by_one(ex.target))]
    items.append((ex.index, ctx, pair))

  def once() -> list[tuple[Any, Any]]:
    out = []
    for index, ctx, pair in items:
      ests = [likelihood.log_likelihood(loaded.model, ctx, cids, mc_num=mc_num, batch_size=batch_size,
                                        seed=jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), j))
              for j, cids in enumerate(pair)]
      out.append((ests[0], ests[1]))
    return out

  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    res = once()
    times.append(time.perf_counter() - t0)
  best, n = min(times[1:]), len(items)
  copies, rounds = likelihood.mc_layout(mc_num, batch_size)
  return {"mc_num": mc_num, "copies": copies, "rounds": rounds, "n": n, "estimates_per_example": 2,
          "examples_per_s": round(n / best, 2), "estimates_per_s": round(2 * n / best, 2),
          "run_s": round(best, 3), "warmup_s": round(times[0], 2),
          "mean_log_likelihood": round(float(np.mean([a.log_likelihood for a, _ in res])), 4),
          "mean_stderr": round(float(np.mean([a.stderr for a, _ in res])), 4),
          "correct_beats_off_by_one": round(float(np.mean([a.log_likelihood > b.log_likelihood for a, b in res])), 4),
          "mean_answer_tokens": round(float(np.mean([len(p[0]) for _, _, p in items])), 1)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="A finished demo workdir (model/, text_tokenizer/, eval/).")
  ap.add_argument("--threshold", type=float, default=0.9)
  ap.add_argument("--repeats", type=int, default=5, help="Timed runs after the warm-up (best reported).")
  ap.add_argument("--likelihood-n", type=int, default=32, help="Arithmetic examples scored by the estimator.")
  ap.add_argument("--mc", default="8,32", help="Comma-separated mc_num values of the estimator.")
  ap.add_argument("--mc-batch", type=int, default=8, help="Monte-Carlo copies per forward pass.")
  args = ap.parse_args()

  import jax

  from mmada_jax.eval import data, runner
  from mmada_jax.eval.config import EvalConfig
  from mmada_jax.config_schema import parse

  plain_ec = parse(EvalConfig, _eval_config(args.run, ""), "config")
  t0 = time.perf_counter()
  loaded = runner.load(plain_ec)
  out: dict[str, Any] = {
      "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "run": os.path.abspath(args.run),
      "params": int(sum(x.size for x in jax.tree_util.tree_leaves(loaded.model.params))),
      "load_s": round(time.perf_counter() - t0, 2), "repeats": args.repeats,
      "timing": "best of the timed runs after one untimed warm-up run (compilation excluded)"}

  gen: dict[str, Any] = {"preset": "demo_arithmetic", "gen_length": plain_ec.gen_length,
                         "block_length": plain_ec.block_length, "steps": plain_ec.steps,
                         "batch_size": plain_ec.batch_size, "results": {}}
  base = None
  for name, overrides in VARIANTS.items():
    ec = _eval_config(args.run, overrides.format(t=args.threshold))
    result, best, warm = _timed_run(ec, loaded, args.repeats)
    eps = result["n"] / best
    base = base or eps
    gen["results"][name] = {
        "overrides": overrides.format(t=args.threshold), "n": result["n"],
        "accuracy": round(result["metrics"]["accuracy"], 4), "stderr": round(result["stderr"]["accuracy"], 4),
        "examples_per_s": round(eps, 2), "tokens_per_s": round(result["tokens_per_s"], 1),
        "run_s": round(best, 3), "warmup_s": round(warm, 2), "speedup_vs_plain": round(eps / base, 2)}
  gen["n"] = gen["results"]["plain"]["n"]
  out["generation"] = gen

  examples = data.read_examples("gsm8k", plain_ec.data, args.likelihood_n)
  out["likelihood"] = [_likelihood(loaded, examples, int(m), args.mc_batch, plain_ec.seed, args.repeats)
                       for m in args.mc.split(",") if m]
  out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()

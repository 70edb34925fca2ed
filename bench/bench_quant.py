"""Quality of weight-only quantization (int8, int4) against the unquantized model (prints JSON).

  python bench/bench_quant.py [--fixtures /work/shared/fixtures] [--demo RUN] [--out DIR] [--lm_head]
  python bench/bench_quant.py --load-memory [--params 1e9]

* Fixtures: every ``tiny_mmada_*`` folder's ``logits`` and ``losses`` cases (the input ids of
  ``cases.npz``, as ``tests/test_parity.py`` loads them): the quantized model's full-vocabulary
  logits against the float model's: argmax agreement over all positions, mean KL(float ‖ quant)
  per position (nats) and the largest absolute logit difference.
* ``--demo RUN`` (a finished ``python -m mmada_jax.demo`` workdir: ``RUN/model``,
  ``RUN/text_tokenizer``, ``RUN/image_tokenizer``, ``RUN/data/classifier.pkl``, ``RUN/eval/*``):
  the demo's three scores through the evaluation harness (presets ``demo_arithmetic``,
  ``demo_mmu``, ``demo_t2i`` of ``configs/eval.py``, as ``mmada_jax.demo.evaluate`` runs them),
  plus the same logits comparison on the arithmetic prompts. Results go to ``--out``.

* ``--load-memory``: writes a synthetic bf16 checkpoint in the original layout (the ~1.1B config of
  ``bench_forward.py``) and reports the peak RSS of a process that loads it with
  ``MMaDA.from_pretrained(dir, quantize=q)`` for none / int8 / int4 (JAX on CPU, so the loaded
  model's "device" arrays are host memory too), against one bf16 copy of the weights.

Quantization: ``MMaDA.from_pretrained(path, quantize=...)`` (the LM head too with ``--lm_head``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

QTYPES = ("int8", "int4")


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
  """Logits float32 [..., V] of the float and the quantized model -> agreement figures."""
  import jax
  import jax.numpy as jnp
  lp = jax.nn.log_softmax(jnp.asarray(ref, jnp.float32), -1)
  lq = jax.nn.log_softmax(jnp.asarray(got, jnp.float32), -1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
  return {"argmax_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))), "mean_kl": float(jnp.mean(kl)),
          "max_kl": float(jnp.max(kl)), "max_abs_logit_diff": float(np.max(np.abs(ref - got))),
          "positions": int(np.prod(ref.shape[:-1]))}


def _logit_cases(path: str) -> list[np.ndarray]:
  from mmada_jax.parity.replay import load_cases
  cases = load_cases(os.path.join(path, "cases.npz"))
  return [np.asarray(cases[k]) for k in sorted(cases) if k.endswith("/in/input_ids") and
          k.split("/")[0] in ("logits", "losses")]


def bench_fixtures(root: str, lm_head: bool) -> dict:
  from mmada_jax import MMaDA
  out = {}
  dirs = sorted(glob.glob(os.path.join(root, "**", "tiny_mmada_*"), recursive=True))
  if not dirs:
    raise FileNotFoundError(f"no tiny_mmada_* fixture folder under {root}")
  for d in dirs:
    cases = _logit_cases(d)
    ref_model = MMaDA.from_pretrained(d)
    refs = [np.asarray(ref_model.logits(ids)) for ids in cases]
    row = {}
    for q in QTYPES:
      m = MMaDA.from_pretrained(d, quantize=q, quantize_lm_head=lm_head)
      got = np.concatenate([np.asarray(m.logits(ids)).reshape(-1, refs[0].shape[-1]) for ids in cases])
      row[q] = _compare(np.concatenate([r.reshape(-1, r.shape[-1]) for r in refs]), got)
      row[q]["spec"] = m.quantization.to_dict()
    out[os.path.basename(d)] = row
  return out


def _demo_prompts(run: str, tok, model, n: int = 32) -> np.ndarray:
  """Left-padded token ids int [n, P] of the demo's first ``n`` arithmetic questions."""
  from mmada_jax.demo.data import read_jsonl
  rows = read_jsonl(os.path.join(run, "eval", "arithmetic.jsonl"))[:n]
  ids = [tok.encode(r["question"]) for r in rows]
  width = max(len(x) for x in ids)
  pad = int(model.config.pad_token_id)
  return np.array([[pad] * (width - len(x)) + list(x) for x in ids], np.int64)


def bench_demo(run: str, out_dir: str, lm_head: bool, seed: int) -> dict:
  from mmada_jax import MMaDA
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.demo.data import read_jsonl
  from mmada_jax.demo import evaluate
  from mmada_jax.demo.classifier import DigitClassifier
  from mmada_jax.eval.runner import Loaded
  from mmada_jax.prompting import TextTokenizer
  model_dir = os.path.join(run, "model")
  paths = dict(text_tokenizer=os.path.join(run, "text_tokenizer"), image_tokenizer=os.path.join(run, "image_tokenizer"))
  for p in (model_dir, *paths.values(), os.path.join(run, "data", "classifier.pkl")):
    if not os.path.exists(p):
      raise FileNotFoundError(f"--demo {run}: {p} is missing (a finished demo workdir is needed)")
  tok = TextTokenizer.from_file(paths["text_tokenizer"])
  itok = ImageTokenizer.from_pretrained(paths["image_tokenizer"])
  clf = DigitClassifier.load(os.path.join(run, "data", "classifier.pkl"))
  files = {t: os.path.join(run, "eval", f) for t, f in evaluate.FILES.items()}
  labels = {e["prompt"]: e["label"] for e in read_jsonl(files["t2i"])}
  res: dict = {}
  ref_logits = None
  prompts = None
  for q in ("none", *QTYPES):
    t0 = time.time()
    m = MMaDA.from_pretrained(model_dir, quantize=None if q == "none" else q,
                              quantize_lm_head=lm_head and q != "none")
    lo = Loaded(m, tok, itok, evaluate.DigitScorer(clf, labels))
    scores = {}
    for task in ("arithmetic", "mmu", "t2i"):
      r = evaluate.run_eval(f"demo_{task}", out_dir, f"{task}_{q}", lo, data=files[task], model=model_dir,
                            seed=seed, **paths)
      scores[task] = {**r["metrics"], "n": r["n"]}
      print(f"  {q} {task}: {r['metrics']}", file=sys.stderr, flush=True)
    if prompts is None:
      prompts = _demo_prompts(run, tok, m)
    logits = np.asarray(m.logits(prompts, attention_mask=(prompts != m.config.pad_token_id).astype(np.int32)))
    if q == "none":
      ref_logits = logits
    else:
      scores["logits_vs_float"] = _compare(ref_logits, logits)
    scores["seconds"] = round(time.time() - t0, 1)
    res[q] = scores
  return res


def bench_load_memory(n_params: float) -> dict:
  import subprocess
  import tempfile
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bench_forward import _write_synthetic
  out: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    n, nbytes = _write_synthetic(tmp, n_params)
    out.update(params=n, bf16_bytes=nbytes)
    code = ("import resource, sys; from mmada_jax import MMaDA, quant; q = sys.argv[2]; "
            "m = MMaDA.from_pretrained(sys.argv[1], quantize=None if q == 'none' else q); "
            "print('HELD', quant.nbytes(m.params)); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    base = int(subprocess.run([sys.executable, "-c", "import resource, jax, mmada_jax.api.model; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout) * 1024
    out["import_baseline_rss_bytes"] = base
    for q in ("none", *QTYPES):
      t0 = time.perf_counter()
      p = subprocess.run([sys.executable, "-c", code, tmp, q], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
      vals = {l.split()[0]: int(l.split()[1]) for l in p.stdout.splitlines() if l.split()[:1] in (["HELD"], ["PEAK_KB"])}
      peak = vals["PEAK_KB"] * 1024
      out[q] = {"model_bytes": vals["HELD"], "peak_rss_bytes": peak,
                "peak_minus_baseline_over_bf16_copy": round((peak - base) / nbytes, 3),
                "seconds": round(time.perf_counter() - t0, 1)}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--fixtures", default="/work/shared/fixtures")
  ap.add_argument("--demo", default="", help="a finished demo workdir (RUN/model, RUN/eval, ...)")
  ap.add_argument("--out", default="/tmp/bench_quant", help="where the demo evaluations write their results")
  ap.add_argument("--lm_head", action="store_true", help="quantize the LM head too")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--load-memory", action="store_true", help="only the quantize-on-load peak memory")
  ap.add_argument("--params", type=float, default=1e9, help="--load-memory: synthetic checkpoint size")
  args = ap.parse_args(argv)
  if args.load_memory:
    print(json.dumps(bench_load_memory(args.params), indent=1))
    return 0
  report = {"lm_head_quantized": args.lm_head, "fixtures": bench_fixtures(args.fixtures, args.lm_head)}
  if args.demo:
    os.makedirs(args.out, exist_ok=True)
    report["demo"] = bench_demo(args.demo, args.out, args.lm_head, args.seed)
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The embedded default: MMaDA-mini trained end to end offline, then evaluated.

  python -m mmada_jax.demo --workdir runs/demo [--seed 0] [--preset full|smoke]

1. data: handwritten digits bundled with scikit-learn (upscaled), captions, synthetic arithmetic
   with chain-of-thought answers; a text tokenizer trained locally, a tiny MAGVIT-v2 trained on the
   digits (images become token sequences), a digit classifier (``mmada_jax.demo.data``);
2. the stages, each a config of ``configs/demo.py`` run by the one trainer: pretraining (t2i + lm
   + mmu), mixed-CoT SFT, UniGRPO on arithmetic (correctness + format), on image understanding
   (MMU correctness) and on text-to-image (the digit classifier as the image-text scorer);
3. evaluation by the harness (:mod:`mmada_jax.eval`, presets ``demo_*`` of ``configs/eval.py``) on
   the files it writes in ``WORKDIR/eval`` (``mmada_jax.demo.evaluate``) after every stage, results in
   ``eval/<task>_<stage>/`` and, for the final model, ``eval/{arithmetic,mmu,t2i}/``
   (``results.json``, ``samples.jsonl``);
4. artefacts in WORKDIR: ``model/`` (Orbax), ``text_tokenizer/``, ``image_tokenizer/``, each stage's folder (checkpoints, TensorBoard, metrics.jsonl),
   ``samples.png`` (the generated digits, a row and legend per prompted digit, and one image's denoising steps),
   ``samples.npz`` (images uint8 [n, R, R, 3], labels int [n]), ``summary.json`` (scores after
   each stage, time per part, the machine's GEMM GFLOP/s) and ``report.md`` (scores, the loss and
   reward curves ``curves_<stage>.png``, the sample sheet); each stage's trainer log in
   ``<stage>/train.log``. The console shows one progress line (part, its ETA, the total ETA).
Re-running the same command resumes: finished data and stages are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

PRESETS = {
    # stage -> steps; eval sizes.
    "full": {"pretrain": 0, "sft": 0, "grpo": 0, "t2i_eval_per_digit": 12,
             "mmu_eval": 359, "text_eval": 0},
    "smoke": {"pretrain": 6, "sft": 4, "grpo": 2, "t2i_eval_per_digit": 1,
              "mmu_eval": 16, "text_eval": 16},
}
# One unified UniGRPO stage (arithmetic, digit MMU and digit t2i together: configs/demo.py:grpo).
STAGES = ("pretrain", "sft", "grpo")
CONFIG_NAME = "demo.py"   # in the installed mmada_jax.configs (the checkout's configs/ when editable)


def _log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage_config(stage: str, data_json: str, steps: int, seed: int):
  from mmada_jax.train.config_files import load_config_file, packaged_config_dir
  arg = f"{stage},data={data_json},seed={seed}" + (f",steps={steps}" if steps else "")
  return load_config_file(f"{os.path.join(packaged_config_dir(), CONFIG_NAME)}:{arg}")


def _load_params(stage_dir: str, model_cfg):
  import jax
  from mmada_jax.train import checkpointing
  from mmada_jax.train.state import abstract_params
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_params(model_cfg))
  return checkpointing.load_init_params(stage_dir, model_cfg, abstract, None)


# Seconds per part measured on the development machine, idle (2 cores, 385 fp32 GEMM GFLOP/s;
# seed 0, full preset, 6 min 33 s wall): the total ETA before a part has started, scaled by how
# fast the finished parts ran against these.
EXPECTED_S = {"data": 42.0, "pretrain": 236.0, "sft": 45.0, "grpo": 48.5, "eval": 5.1, "final": 1.7}
TIMING_KEYS = ("steps_per_sec", "tokens_per_sec", "mfu", "time/")   # metrics.jsonl keys (prefixes) that time the machine


def _stage_phases(stage_dir: str) -> dict[str, float]:
  """A finished stage's wall seconds per trainer phase (``status.json``'s ``timings_s``: setup,
  compile, data, pre_step, step, checkpoint, sampling); {} for a stage finished by an older
  version (no timings recorded)."""
  try:
    with open(os.path.join(stage_dir, "status.json"), encoding="utf-8") as f:
      return {k: round(float(v), 1) for k, v in json.load(f).get("timings_s", {}).items()}
  except (OSError, ValueError):
    return {}


def gemm_gflops(n: int = 512, seconds: float = 1.5) -> float:
  """fp32 GEMM throughput of this machine through XLA (``n``×``n`` matmuls for about
  ``seconds``), GFLOP/s: the yardstick that makes wall times of different machines comparable."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x * (1.0 / n))
  f(a).block_until_ready()
  reps, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    a = f(a)
    reps += 1
  a.block_until_ready()
  return 2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


class Progress:
  """The run's one progress line: current part, its step and ETA, total elapsed and ETA.

  ``begin(part, steps, metrics_path)`` starts a part (``steps`` 0: no step count); a thread
  reads the part's ``metrics.jsonl`` (written every ``log_every`` steps) and redraws the line
  every ``every`` seconds (in place on a terminal, else a log line every ``15·every`` s).
  """

  def __init__(self, parts: list[str], stream=None, every: float = 2.0):
    import threading
    self.parts, self.stream, self.every = list(parts), stream or sys.stderr, every
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.t_start = time.time()
    self.done: dict[str, float] = {}
    self.part, self.steps, self.path, self.t_part = "", 0, "", time.time()
    self._first = None
    self._stop = threading.Event()
    self._last_print = 0.0
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def begin(self, part: str, steps: int = 0, metrics_path: str = "") -> None:
    self.part, self.steps, self.path, self.t_part = part, int(steps), metrics_path, time.time()
    self._first: tuple[float, int] | None = None    # (time, step) of the first metrics row seen

  def end(self) -> None:
    if self.part:
      self.done[self.part] = time.time() - self.t_part
    self.part = ""

  def _scale(self) -> float:
    ref = sum(EXPECTED_S.get(self._kind(k), 0.0) for k in self.done)
    return sum(self.done.values()) / ref if ref > 0 else 1.0

  @staticmethod
  def _kind(part: str) -> str:
    return "eval" if part.startswith("eval") else part

  def _step(self) -> int:
    try:
      with open(self.path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        last = [l for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()][-1]
      return int(json.loads(last)["step"])
    except (OSError, IndexError, ValueError, KeyError):
      return 0

  def line(self) -> str:
    now, scale = time.time(), self._scale()
    elapsed = now - self.t_part
    stage_eta = EXPECTED_S.get(self._kind(self.part), 0.0) * scale - elapsed
    where = self.part
    if self.steps and self.path:
      step = self._step()
      where += f" step {step}/{self.steps}"
      if step > 0 and self._first is None:
        self._first = (now, step)
      if self._first is not None and step > self._first[1]:   # the rate after start-up and compiling
        stage_eta = (now - self._first[0]) / (step - self._first[1]) * (self.steps - step)
    later = sum(EXPECTED_S.get(self._kind(k), 0.0) for k in self.parts if k not in self.done and k != self.part)
    total_eta = max(0.0, stage_eta) + later * scale
    fmt = lambda t: f"{int(max(0, t)) // 60}:{int(max(0, t)) % 60:02d}"  # noqa: E731
    i = self.parts.index(self.part) + 1 if self.part in self.parts else len(self.done)
    return (f"[demo] {i}/{len(self.parts)} {where} | stage ETA {fmt(stage_eta)} | total {fmt(now - self.t_start)} "
            f"elapsed, ETA {fmt(total_eta)}")

  def _loop(self) -> None:
    while not self._stop.wait(self.every):
      if not self.part:
        continue
      if self.tty:
        self.stream.write("\r\033[K" + self.line())
        self.stream.flush()
      elif time.time() - self._last_print >= 15 * self.every:
        self._last_print = time.time()
        print(self.line(), file=self.stream, flush=True)

  def clear(self) -> None:
    """Erases the in-place line before a log line is printed."""
    if self.tty:
      self.stream.write("\r\033[K")
      self.stream.flush()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
    self.clear()


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--preset", choices=sorted(PRESETS), default="full")
  args = p.parse_args(argv)
  preset = PRESETS[args.preset]
  t_start = time.time()
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)

  import contextlib
  import jax
  import numpy as np
  from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
  from mmada_jax.demo import data as demo_data, evaluate
  from mmada_jax.demo.classifier import DigitClassifier
  from mmada_jax.demo.report import write_report
  from mmada_jax.demo.samples import save_samples_png
  from mmada_jax.eval.runner import Loaded
  from mmada_jax.prompting import TextTokenizer
  from mmada_jax.train.trainer import model_config, run

  gflops = gemm_gflops()
  _log(f"this machine: {gflops:.0f} fp32 GEMM GFLOP/s (XLA, {os.cpu_count()} CPUs); the development machine "
       f"runs the full demo in about {sum(EXPECTED_S.values()) / 60:.0f} min idle")
  parts = ["data"] + [p for st in STAGES for p in (st, f"eval_{st}")] + ["final"]
  progress = Progress(parts)
  say = lambda msg: (progress.clear(), _log(msg))  # noqa: E731
  timings: dict[str, float] = {}
  say(f"1/4 building the data, tokenizers and classifier in {workdir}/data")
  progress.begin("data")
  t0 = time.time()
  data_cfg = demo_data.DemoDataConfig(t2i_eval_per_digit=preset["t2i_eval_per_digit"])
  if args.preset == "smoke":      # a quick end-to-end run for tests: tiny data, a few MAGVIT steps
    import dataclasses
    from mmada_jax.demo.tokenizers import MagvitTrainConfig
    data_cfg = dataclasses.replace(data_cfg, magvit=MagvitTrainConfig(steps=5, batch_size=32, lr=3e-3),
                                   lm_rows=64, mmu_augment_copies=0, grpo_mmu_images=16, classifier_kind="logreg")
  built = demo_data.build_demo_data(os.path.join(workdir, "data"), seed=args.seed, config=data_cfg, log=say)
  timings["data"] = time.time() - t0
  progress.end()
  data_json = os.path.join(workdir, "data", demo_data.RESULT_NAME)
  paths = built["paths"]
  tok = TextTokenizer.from_file(paths["text_tokenizer"])
  itok = ImageTokenizer.from_pretrained(paths["image_tokenizer"])
  clf = DigitClassifier.load(paths["classifier"])
  files = evaluate.write_eval_data(workdir, paths, preset["text_eval"] or None, preset["mmu_eval"])
  tok_paths = dict(text_tokenizer=paths["text_tokenizer"], image_tokenizer=paths["image_tokenizer"])
  t2i_prompts = demo_data.read_jsonl(files["t2i"])
  labels = np.array([int(e["label"]) for e in t2i_prompts])
  scorer = evaluate.DigitScorer(clf, {e["prompt"]: e["label"] for e in t2i_prompts})
  s = int(built["model"]["max_text_len"])

  def evaluate_model(model, stage: str, final: bool) -> dict[str, dict]:
    """The three harness evaluations of one stage's model, into eval/<task>_<stage> (the final
    model's into eval/<task>)."""
    lo = Loaded(model, tok, itok, scorer)
    out = {}
    with open(os.path.join(workdir, evaluate.EVAL_DIR, "eval.log"), "a", encoding="utf-8") as logf, \
        contextlib.redirect_stderr(logf):
      for task in ("arithmetic", "mmu", "t2i"):
        name = task if final else f"{task}_{stage}"
        out[task] = evaluate.run_eval(f"demo_{task}", workdir, name, lo, data=files[task],
                                      model=os.path.join(workdir, stage), seed=args.seed, **tok_paths)
    return out

  def score(res: dict[str, dict]) -> dict[str, float]:
    return {"arithmetic": res["arithmetic"]["metrics"]["accuracy"], "mmu": res["mmu"]["metrics"]["accuracy"],
            "t2i": res["t2i"]["metrics"]["classifier_accuracy"]}

  scores: dict[str, dict[str, float]] = {}
  evals: dict[str, dict[str, dict]] = {}
  prev = ""
  model_cfg = cfg = None
  for i, stage in enumerate(STAGES):
    cfg = _stage_config(stage, data_json, preset[stage], args.seed)
    if prev:
      cfg.init_from = os.path.join(workdir, prev)
    cfg.progress_bar = False          # the demo draws one progress line; the trainer's log goes to train.log
    model_cfg = model_config(cfg.model)
    stage_dir = os.path.join(workdir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    say(f"2/4 stage {i + 1}/{len(STAGES)}: {stage} ({cfg.steps} steps) -> {stage_dir} (log: train.log)")
    progress.begin(stage, int(cfg.steps), os.path.join(stage_dir, "metrics.jsonl"))
    t0 = time.time()
    with open(os.path.join(stage_dir, "train.log"), "a", encoding="utf-8") as logf, \
        contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
      code = run(cfg, stage_dir)
    timings[stage] = time.time() - t0
    progress.end()
    if code != 0:
      say(f"stage {stage} failed with exit code {code}; see {stage_dir}/status.json and train.log")
      progress.close()
      return code
    prev = stage
    final = i == len(STAGES) - 1
    progress.begin(f"eval_{stage}")
    t0 = time.time()
    # Saved with the model: the data's prompt layout, the stage's sampler settings, text decoded
    # in blocks of 4 as the evaluation and the text GRPO stage do.
    gen_cfg = GenerationConfig.from_stage_config(cfg).replace(max_text_len=s, block_length=4)
    model = MMaDA(_load_params(stage_dir, model_cfg), model_cfg, generation_config=gen_cfg)
    evals[stage] = evaluate_model(model, stage, final)
    scores[stage] = score(evals[stage])
    timings[f"eval_{stage}"] = time.time() - t0
    progress.end()
    sc = scores[stage]
    say(f"   after {stage}: arithmetic {sc['arithmetic']:.3f}, image understanding {sc['mmu']:.3f}, "
        f"text-to-image {sc['t2i']:.3f} ({timings[f'eval_{stage}']:.0f}s to evaluate)")

  say("3/4 writing the model and artefacts")
  progress.begin("final")
  t0 = time.time()
  ev = evals[prev]
  model_dir = os.path.join(workdir, "model")
  model.save_pretrained(model_dir, overwrite=True)
  for name, src in (("text_tokenizer", paths["text_tokenizer"]), ("image_tokenizer", paths["image_tokenizer"])):
    dst = os.path.join(workdir, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
  # samples.png: the harness's images, and one image's denoising steps (regenerated with the
  # harness's seed for that prompt, so it is the same image).
  images = evaluate.t2i_images(os.path.join(workdir, evaluate.EVAL_DIR, "t2i"))
  index = int(np.argmax(labels == 3)) if (labels == 3).any() else 0
  one = model.generate_images([t2i_prompts[index]["prompt"]], image_tokenizer=itok,
                              tokenizer=tok, guidance_scale=ev["t2i"]["settings"]["cfg"],
                              steps=ev["t2i"]["settings"]["steps"], noise_schedule=ev["t2i"]["settings"]["noise_schedule"],
                              seed=jax.random.fold_in(jax.random.key(args.seed), index), return_trajectory=True)
  np.savez(os.path.join(workdir, "samples.npz"), images=images, labels=labels)
  sc = scores[prev]
  save_samples_png(os.path.join(workdir, "samples.png"), images, labels, one.trajectory, one.codes, itok, index=0,
                   predicted=clf.predict(images), prompts=[t2i_prompts[index]["prompt"]],
                   title=f"MMaDA-mini, seed {args.seed}: text-to-image classifier accuracy {sc['t2i']:.3f}")
  timings["final"] = time.time() - t0
  progress.end()
  progress.close()
  wall = time.time() - t_start
  summary = {
      "t2i": {"classifier_accuracy": ev["t2i"]["metrics"]["classifier_accuracy"], "n_images": ev["t2i"]["images"]},
      "mmu": {"accuracy": ev["mmu"]["metrics"]["accuracy"], "n": ev["mmu"]["n"]},
      "text": {"accuracy_before_grpo": scores["sft"]["arithmetic"],
               "accuracy_after_grpo": ev["arithmetic"]["metrics"]["accuracy"], "n": ev["arithmetic"]["n"],
               "samples": [json.loads(line)["output"] for line in open(os.path.join(
                   workdir, evaluate.EVAL_DIR, "arithmetic", "samples.jsonl"), encoding="utf-8")][:5]},
      "scores_by_stage": scores,
      "eval": {name: os.path.join(evaluate.EVAL_DIR, name, "results.json")
               for name in sorted(os.listdir(os.path.join(workdir, evaluate.EVAL_DIR)))
               if os.path.isfile(os.path.join(workdir, evaluate.EVAL_DIR, name, "results.json"))},
      "data": built.get("stats", {}),
      "model": {"params": model.num_params, **{k: v for k, v in built["model"].items()}},
      "preset": args.preset, "seed": args.seed,
      "gemm_gflops": round(gflops, 1),
      "timings_s": {k: round(v, 1) for k, v in timings.items()},
      "stage_phases_s": {st: _stage_phases(os.path.join(workdir, st)) for st in STAGES},
      "wall_time_s": round(wall, 1),
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  report = write_report(workdir, summary, STAGES)
  _log(f"done in {wall / 60:.1f} min ({gflops:.0f} GEMM GFLOP/s): arithmetic {scores['sft']['arithmetic']:.3f} "
       f"after SFT -> {summary['text']['accuracy_after_grpo']:.3f} after UniGRPO, image understanding "
       f"{summary['mmu']['accuracy']:.3f}, text-to-image {summary['t2i']['classifier_accuracy']:.3f}; see {report}, "
       f"{workdir}/samples.png and summary.json")
  return 0


if __name__ == "__main__":
  from mmada_jax.host import reexec_with_huge_pages
  reexec_with_huge_pages()   # XLA:CPU temporaries on huge pages (mmada_jax/host.py)
  sys.exit(main())

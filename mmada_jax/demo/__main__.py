"""The embedded default: MMaDA-mini trained end to end offline, then evaluated.

  python -m mmada_jax.demo --workdir runs/demo [--seed 0] [--preset full|smoke]

1. data: handwritten digits bundled with scikit-learn (upscaled), captions, synthetic arithmetic
   with chain-of-thought answers; a text tokenizer trained locally, a tiny MAGVIT-v2 trained on the
   digits (images become token sequences), a digit classifier (``mmada_jax.demo.data``);
2. the stages, each a config of ``configs/demo.py`` run by the one trainer: pretraining (t2i + lm
   + mmu), mixed-CoT SFT, UniGRPO on arithmetic (correctness + format), on image understanding
   (MMU correctness) and on text-to-image (the digit classifier as the image-text scorer);
3. evaluation by the harness (:mod:`mmada_jax.eval`, presets ``demo_*`` of ``configs/eval.py``) on
   the files it writes in ``WORKDIR/eval`` (``mmada_jax.demo.evaluate``), results in
   ``eval/{arithmetic_sft,arithmetic,mmu,t2i}/`` (``results.json``, ``samples.jsonl``);
4. artefacts in WORKDIR: ``model/`` (Orbax), ``text_tokenizer/``, ``image_tokenizer/``, each stage's folder (checkpoints, TensorBoard, metrics.jsonl),
   ``samples.png`` (a generated digit grid per prompt with one image's denoising steps beside it),
   ``samples.npz`` (images uint8 [n, R, R, 3], labels int [n]) and ``summary.json``.
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
    "full": {"pretrain": 0, "sft": 0, "grpo_text": 0, "grpo_mmu": 0, "grpo_t2i": 0, "t2i_eval_per_digit": 12,
             "mmu_eval": 359, "text_eval": 0},
    "smoke": {"pretrain": 6, "sft": 4, "grpo_text": 2, "grpo_mmu": 2, "grpo_t2i": 2, "t2i_eval_per_digit": 1,
              "mmu_eval": 16, "text_eval": 16},
}
# UniGRPO on text runs last, so the final model is the one whose arithmetic is measured "after GRPO".
STAGES = ("pretrain", "sft", "grpo_mmu", "grpo_t2i", "grpo_text")
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

  import jax
  import numpy as np
  from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
  from mmada_jax.demo import data as demo_data, evaluate
  from mmada_jax.demo.classifier import DigitClassifier
  from mmada_jax.demo.samples import save_samples_png
  from mmada_jax.eval.runner import Loaded
  from mmada_jax.prompting import TextTokenizer
  from mmada_jax.train.trainer import model_config, run

  timings: dict[str, float] = {}
  _log(f"1/4 building the data, tokenizers and classifier in {workdir}/data")
  t0 = time.time()
  data_cfg = demo_data.DemoDataConfig(t2i_eval_per_digit=preset["t2i_eval_per_digit"])
  if args.preset == "smoke":      # a quick end-to-end run for tests: tiny data, a few MAGVIT steps
    import dataclasses
    from mmada_jax.demo.tokenizers import MagvitTrainConfig
    data_cfg = dataclasses.replace(data_cfg, magvit=MagvitTrainConfig(steps=5, batch_size=32, lr=3e-3),
                                   lm_rows=64, mmu_augment_copies=0, grpo_mmu_images=16, classifier_kind="logreg")
  built = demo_data.build_demo_data(os.path.join(workdir, "data"), seed=args.seed, config=data_cfg, log=_log)
  timings["data"] = time.time() - t0
  data_json = os.path.join(workdir, "data", demo_data.RESULT_NAME)
  paths = built["paths"]
  tok = TextTokenizer.from_file(paths["text_tokenizer"])
  itok = ImageTokenizer.from_pretrained(paths["image_tokenizer"])
  clf = DigitClassifier.load(paths["classifier"])
  files = evaluate.write_eval_data(workdir, paths, preset["text_eval"] or None, preset["mmu_eval"])
  tok_paths = dict(text_tokenizer=paths["text_tokenizer"], image_tokenizer=paths["image_tokenizer"])

  results: dict[str, object] = {}
  prev = ""
  model_cfg = None
  for i, stage in enumerate(STAGES):
    cfg = _stage_config(stage, data_json, preset[stage], args.seed)
    if prev:
      cfg.init_from = os.path.join(workdir, prev)
    model_cfg = model_config(cfg.model)
    _log(f"2/4 stage {i + 1}/{len(STAGES)}: {stage} ({cfg.steps} steps) -> {workdir}/{stage}")
    t0 = time.time()
    code = run(cfg, os.path.join(workdir, stage))
    timings[stage] = time.time() - t0
    if code != 0:
      _log(f"stage {stage} failed with exit code {code}; see {workdir}/{stage}/status.json")
      return code
    prev = stage
    if stage == "sft":
      sft = MMaDA(_load_params(os.path.join(workdir, "sft"), model_cfg), model_cfg,
                  generation_config=GenerationConfig.from_stage_config(cfg))
      t0 = time.time()
      # Arithmetic decoding in blocks of 4 (measured on two seeds' SFT models: 0.40–0.46 where one
      # block of 16 gives 0.11–0.42, because the trailing EOS padding is the most confident and
      # gets committed before the answer).
      results["text_before"] = evaluate.run_eval("demo_arithmetic", workdir, "arithmetic_sft", Loaded(sft, tok),
                                                 data=files["arithmetic"], model=os.path.join(workdir, "sft"),
                                                 seed=args.seed, **tok_paths)
      timings["eval_text_before"] = time.time() - t0
      _log(f"   arithmetic accuracy after SFT (before GRPO): {results['text_before']['metrics']['accuracy']:.3f}")

  _log("3/4 evaluating the final model")
  t0 = time.time()
  s = int(built["model"]["max_text_len"])
  # Saved with the model: the data's prompt layout, the stage's sampler settings, text decoded
  # in blocks of 4 as the evaluation and the text GRPO stage do.
  gen_cfg = GenerationConfig.from_stage_config(cfg).replace(max_text_len=s, block_length=4)
  final = MMaDA(_load_params(os.path.join(workdir, prev), model_cfg), model_cfg, generation_config=gen_cfg)
  model_dir = os.path.join(workdir, "model")
  final.save_pretrained(model_dir, overwrite=True)
  t2i_prompts = demo_data.read_jsonl(files["t2i"])
  labels = np.array([int(e["label"]) for e in t2i_prompts])
  lo = Loaded(final, tok, itok, evaluate.DigitScorer(clf, {e["prompt"]: e["label"] for e in t2i_prompts}))
  ev = {name: evaluate.run_eval(f"demo_{task}", workdir, name, lo, data=files[task], model=model_dir, seed=args.seed,
                                **tok_paths)
        for name, task in (("arithmetic", "arithmetic"), ("t2i", "t2i"), ("mmu", "mmu"))}
  timings["evaluation"] = time.time() - t0

  _log("4/4 writing artefacts")
  for name, src in (("text_tokenizer", paths["text_tokenizer"]), ("image_tokenizer", paths["image_tokenizer"])):
    dst = os.path.join(workdir, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
  # samples.png: the harness's images, and one image's denoising steps (regenerated with the
  # harness's seed for that prompt, so it is the same image).
  images = evaluate.t2i_images(os.path.join(workdir, evaluate.EVAL_DIR, "t2i"))
  index = int(np.argmax(labels == 3)) if (labels == 3).any() else 0
  one = final.generate_images([t2i_prompts[index]["prompt"]], image_tokenizer=itok,
                              tokenizer=tok, guidance_scale=ev["t2i"]["settings"]["cfg"],
                              steps=ev["t2i"]["settings"]["steps"], noise_schedule=ev["t2i"]["settings"]["noise_schedule"],
                              seed=jax.random.fold_in(jax.random.key(args.seed), index), return_trajectory=True)
  np.savez(os.path.join(workdir, "samples.npz"), images=images, labels=labels)
  save_samples_png(os.path.join(workdir, "samples.png"), images, labels, one.trajectory, one.codes, itok, index=0)
  wall = time.time() - t_start
  summary = {
      "t2i": {"classifier_accuracy": ev["t2i"]["metrics"]["classifier_accuracy"], "n_images": ev["t2i"]["images"]},
      "mmu": {"accuracy": ev["mmu"]["metrics"]["accuracy"], "n": ev["mmu"]["n"]},
      "text": {"accuracy_before_grpo": results["text_before"]["metrics"]["accuracy"],
               "accuracy_after_grpo": ev["arithmetic"]["metrics"]["accuracy"], "n": ev["arithmetic"]["n"],
               "samples": [json.loads(line)["output"] for line in open(os.path.join(
                   workdir, evaluate.EVAL_DIR, "arithmetic", "samples.jsonl"), encoding="utf-8")][:5]},
      "eval": {name: os.path.join(evaluate.EVAL_DIR, name, "results.json") for name in ("arithmetic_sft", *ev)},
      "data": built.get("stats", {}),
      "model": {"params": final.num_params, **{k: v for k, v in built["model"].items()}},
      "preset": args.preset, "seed": args.seed,
      "timings_s": {k: round(v, 1) for k, v in timings.items()},
      "wall_time_s": round(wall, 1),
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  t, m = summary["t2i"]["classifier_accuracy"], summary["mmu"]["accuracy"]
  _log(f"done in {wall / 60:.1f} min: t2i classifier accuracy {t:.3f}, MMU accuracy {m:.3f}, arithmetic "
       f"{summary['text']['accuracy_before_grpo']:.3f} -> {summary['text']['accuracy_after_grpo']:.3f} "
       f"(GRPO); see {workdir}/summary.json, samples.png and eval/")
  return 0


if __name__ == "__main__":
  sys.exit(main())

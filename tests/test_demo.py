"""The embedded demo end to end (smoke preset: every stage, a few steps) and the Colab notebook on it."""
import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from mmada_jax.demo.__main__ import STAGES, TIMING_KEYS, main as demo_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow   # the whole demo (smoke preset) and the notebook on it


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  assert demo_main(["--workdir", str(workdir), "--preset", "smoke"]) == 0
  return workdir


def test_demo_artefacts(demo_run):
  for name in ("model/mmada_jax.json", "model/generation_config.json", "text_tokenizer/tokenizer.json",
               "image_tokenizer/config.json", "samples.png", "samples.npz", "summary.json",
               "pretrain/metrics.jsonl", "sft/metrics.jsonl", "report.md", "pretrain/train.log"):
    assert (demo_run / name).exists(), name
  grpo = sorted(p.name for p in demo_run.iterdir() if p.name.startswith("grpo") and (p / "metrics.jsonl").exists())
  assert grpo == ["grpo"]                                      # one unified UniGRPO stage
  row = json.loads((demo_run / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
  for key in ("reward_mean", "reward_std", "kl", "clip_frac", "response_length", "entropy", "time/rollout",
              *(f"{m}/{t}" for m in ("reward_mean", "kl", "clip_frac", "response_length") for t in ("text", "mmu", "t2i")),
              "reward/text/correctness", "reward/mmu/mmu_correctness", "reward/t2i/digit_classifier"):
    assert key in row, key
  row = json.loads((demo_run / "pretrain" / "metrics.jsonl").read_text().splitlines()[-1])
  for key in ("step", "loss", "loss_t2i", "loss_lm", "loss_mmu", "lr"):
    assert key in row, key
  summary = json.loads((demo_run / "summary.json").read_text())
  for path in (("t2i", "classifier_accuracy"), ("mmu", "accuracy"), ("text", "accuracy_before_grpo"),
               ("text", "accuracy_after_grpo"), ("wall_time_s",)):
    node = summary
    for k in path:
      node = node[k]
    assert isinstance(node, (int, float)), path
  for name in ("arithmetic_sft", "arithmetic", "mmu", "t2i"):       # the harness's runs
    result = json.loads((demo_run / "eval" / name / "results.json").read_text())
    assert (demo_run / "eval" / name / "samples.jsonl").exists() and summary["eval"][name] == f"eval/{name}/results.json"
    assert result["settings"]["data"].startswith(str(demo_run / "eval"))
  assert summary["text"]["accuracy_after_grpo"] == result_metric(demo_run, "arithmetic", "accuracy")
  assert summary["mmu"]["accuracy"] == result_metric(demo_run, "mmu", "accuracy")
  assert summary["t2i"]["classifier_accuracy"] == result_metric(demo_run, "t2i", "classifier_accuracy")
  assert list(summary["scores_by_stage"]) == list(STAGES) and summary["gemm_gflops"] > 0
  for stage in STAGES:                       # scores after each stage, each a harness run
    assert set(summary["scores_by_stage"][stage]) == {"arithmetic", "mmu", "t2i"}
    assert (demo_run / f"curves_{stage}.png").exists()
    phases = summary["stage_phases_s"][stage]  # where each stage's time went (trainer phases)
    assert phases["compile"] > 0 and phases["step"] > 0
    assert sum(phases.values()) <= summary["timings_s"][stage] + 0.5
  assert summary["stage_phases_s"]["grpo"]["pre_step"] > 0    # UniGRPO's rollouts
  report = (demo_run / "report.md").read_text()
  assert "samples.png" in report and "curves_pretrain.png" in report and "| sft |" in report
  assert "| stage | setup | compile | data | pre_step | step | checkpoint | sampling |" in report
  from PIL import Image
  assert Image.open(demo_run / "samples.png").size[1] >= 10 * 48   # a row of >= 48 px digits per prompted digit
  samples = np.load(demo_run / "samples.npz")
  assert samples["images"].dtype == np.uint8 and samples["images"].ndim == 4
  assert samples["labels"].shape == (samples["images"].shape[0],)
  assert sorted(set(samples["labels"].tolist())) == list(range(10))
  assert list((demo_run / "pretrain" / "tensorboard").glob("events.*")), "TensorBoard event files"


def result_metric(run, name: str, metric: str) -> float:
  return json.loads((run / "eval" / name / "results.json").read_text())["metrics"][metric]


def test_rerun_resumes_without_retraining(demo_run):
  before = (demo_run / "pretrain" / "metrics.jsonl").read_text()
  assert demo_main(["--workdir", str(demo_run), "--preset", "smoke"]) == 0
  assert (demo_run / "pretrain" / "metrics.jsonl").read_text() == before


def test_notebook_runs_on_the_demo(demo_run, monkeypatch):
  monkeypatch.setenv("MMADA_RUN_DIR", str(demo_run))
  nb = nbformat.read(os.path.join(REPO, "notebooks", "mmada_colab.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "total parameters" in outputs


def _metric_rows(path) -> list[dict]:
  """metrics.jsonl rows without the keys that measure the machine's speed."""
  return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_KEYS)}
          for line in path.read_text().splitlines() if line.strip()]


def test_same_seed_same_metrics(demo_run, tmp_path):
  """Reproducible: a second smoke run of the same seed writes the same metrics and scores."""
  again = tmp_path / "again"
  assert demo_main(["--workdir", str(again), "--preset", "smoke"]) == 0
  for stage in STAGES:
    assert _metric_rows(again / stage / "metrics.jsonl") == _metric_rows(demo_run / stage / "metrics.jsonl"), stage
  a, b = (json.loads((d / "summary.json").read_text()) for d in (demo_run, again))
  assert a["scores_by_stage"] == b["scores_by_stage"]
  assert np.array_equal(np.load(demo_run / "samples.npz")["images"], np.load(again / "samples.npz")["images"])

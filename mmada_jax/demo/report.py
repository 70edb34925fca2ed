"""``report.md`` of a demo run: scores after each stage, loss and reward curves, the sample sheet.

:func:`write_report` reads the run's ``summary.json`` fields (passed in) and each stage's
``metrics.jsonl``; it draws ``curves_<stage>.png`` (matplotlib, Agg) and writes ``report.md``
beside ``samples.png`` in the workdir, so the result reads without the notebook.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

LOSS_KEYS = ("loss", "loss_t2i", "loss_lm", "loss_mmu")
REWARD_PREFIX = ("reward_mean", "reward/")


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a stage's ``metrics.jsonl`` (missing file: [])."""
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_stage(rows: Sequence[Mapping[str, Any]], stage: str, path: str) -> str | None:
  """Loss curves (and reward curves where the rows have rewards) of one stage to ``path``;
  None when there is nothing to plot."""
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [r["step"] for r in rows]
  losses = [k for k in LOSS_KEYS if any(k in r for r in rows)]
  rewards = sorted({k for r in rows for k in r if k.startswith(REWARD_PREFIX)})
  n = 1 + bool(rewards)
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.4), squeeze=False)
  ax = axes[0][0]
  for k in losses:
    ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
  ax.set_xlabel("step"), ax.set_title(f"{stage}: loss"), ax.grid(alpha=0.3)
  if losses:
    ax.legend(fontsize=8)
  if rewards:
    ax = axes[0][1]
    for k in rewards:
      ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
    ax.set_xlabel("step"), ax.set_title(f"{stage}: reward"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _fmt(v: Any) -> str:
  return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))


def write_report(workdir: str, summary: Mapping[str, Any], stages: Sequence[str]) -> str:
  """Writes ``WORKDIR/report.md`` (and ``curves_<stage>.png``) from ``summary`` (the dict written
  to ``summary.json``: ``scores_by_stage`` {stage: {task: score}}, ``timings_s``, ``wall_time_s``,
  ``gemm_gflops``, ``text.samples``, ...). Returns the report's path."""
  scores: Mapping[str, Mapping[str, Any]] = summary.get("scores_by_stage", {})
  tasks = ("arithmetic", "mmu", "t2i")
  lines = [f"# MMaDA-mini demo run (seed {summary.get('seed')}, preset {summary.get('preset')})", "",
           f"{summary.get('model', {}).get('params', '?')} parameters; wall time "
           f"{summary.get('wall_time_s', 0) / 60:.1f} min on a machine measured at "
           f"{summary.get('gemm_gflops', float('nan')):.0f} fp32 GEMM GFLOP/s.", "",
           "## Scores after each stage", "",
           "| after | arithmetic accuracy | image understanding accuracy | text-to-image classifier accuracy |",
           "|---|---|---|---|"]
  for stage, s in scores.items():
    lines.append(f"| {stage} | " + " | ".join(_fmt(s.get(t)) for t in tasks) + " |")
  lines += ["", "Arithmetic: every problem of the space, greedy decoding in blocks of 4; image understanding: "
            "held-out test digits; text-to-image: the digit classifier reading the generated images "
            "(harness results in `eval/`).", "", "## Samples", "", "![samples](samples.png)", ""]
  for out in summary.get("text", {}).get("samples", [])[:5]:
    lines.append(f"    {out}")
  lines += ["", "## Training curves", ""]
  for stage in stages:
    png = plot_stage(read_metrics(os.path.join(workdir, stage, "metrics.jsonl")), stage,
                     os.path.join(workdir, f"curves_{stage}.png"))
    if png:
      lines += [f"![{stage}]({os.path.basename(png)})", ""]
  lines += ["## Time per part (s)", "", "| part | seconds |", "|---|---|"]
  for k, v in summary.get("timings_s", {}).items():
    lines.append(f"| {k} | {v} |")
  phases = {st: p for st, p in summary.get("stage_phases_s", {}).items() if p}
  if phases:
    names = [k for k in next(iter(phases.values()))]
    lines += ["", "Each stage's time by trainer phase (s; `status.json`; device work is asynchronous, so a "
              "phase counts where the trainer's thread waited):", "",
              "| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for st, p in phases.items():
      lines.append(f"| {st} | " + " | ".join(f"{float(p.get(k, 0.0)):.1f}" for k in names) + " |")
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path

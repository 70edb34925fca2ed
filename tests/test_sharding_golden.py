"""Golden sharding dumps: every parameter's and forward activation's PartitionSpec, by config.

Shapes only (``jax.eval_shape`` on an ``AbstractMesh``), so the 8B on 256 chips takes seconds.
A rules, preset, model or layer change that moves a sharding fails here with the list of what
moved. When the change is intended, regenerate the files and review their diff:

    MMADA_WRITE_GOLDEN=1 python -m pytest -q tests/test_sharding_golden.py

Cases: the tiny pretraining model on ``fsdp=4,tensor=2`` (the test suite's 8-device mesh); MMaDA-8B
stage 1.3 on the two layouts docs/aot.md recommends: v5e-256 ``fsdp=128,tensor=2`` (FSDP + tensor
parallelism) and v5p-64 ``fsdp=32`` under the pure-FSDP preset; each traced at its training
sequence length (text + image tokens + 3).
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest

from mmada_jax.model.sharding_report import diff_reports, dumps_report, sharding_report

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
REGENERATE = "MMADA_WRITE_GOLDEN=1 python -m pytest -q tests/test_sharding_golden.py"

CASES = {
    "sharding_tiny_pretrain_fsdp4_tensor2": ("tiny", "pretrain", {"fsdp": 4, "tensor": 2}, "fsdp_tp"),
    "sharding_8b_stage1_3_fsdp128_tensor2": ("mmada_8b", "stage1_3", {"fsdp": 128, "tensor": 2}, "fsdp_tp"),
    "sharding_8b_stage1_3_fsdp32_preset_fsdp": ("mmada_8b", "stage1_3", {"fsdp": 32}, "fsdp"),
}


def _report(file: str, variant: str, mesh_shape: dict, preset: str) -> dict:
  import importlib
  from mmada_jax.train.trainer import model_config
  config = importlib.import_module(f"mmada_jax.configs.{file}").get_config(variant)
  length = int(config.data.max_text_len) + int(config.data.num_image_tokens) + 3
  report = sharding_report(model_config(config.model), mesh_shape, preset, str(config.sharding_rules),
                           length=length)
  report["case"]["config"] = f"configs/{file}.py:{variant}"
  return report


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharding_matches_golden(name):
  got = _report(*CASES[name])
  path = GOLDEN / f"{name}.json"
  if os.environ.get("MMADA_WRITE_GOLDEN"):
    GOLDEN.mkdir(exist_ok=True)
    path.write_text(dumps_report(got))
  assert path.is_file(), f"{path} is missing; write it with: {REGENERATE}"
  want = json.loads(path.read_text())
  diff = diff_reports(want, json.loads(json.dumps(got)))
  assert not diff, (f"shardings of {name} differ from {path.name} ({len(diff)} changes):\n  "
                    + "\n  ".join(diff[:40]) + f"\nif intended, regenerate with: {REGENERATE}")


def test_golden_diff_names_what_moved():
  a = {"params": {"wte": {"spec": ["tensor", "fsdp"]}}, "activations": [{"names": ["batch"], "spec": [None]}]}
  b = {"params": {"wte": {"spec": [None, "fsdp"]}}, "activations": [{"names": ["batch"], "spec": ["fsdp"]}]}
  assert diff_reports(a, b) == ["activations[0]/spec: [None] → ['fsdp']",
                                "params/wte/spec: ['tensor', 'fsdp'] → [None, 'fsdp']"]
  assert diff_reports(a, a) == []

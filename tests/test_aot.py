"""AOT compilation for abstract TPU topologies (needs the libtpu wheel; skipped without it).

* The cost estimate of a scanned model (1-/2-layer twins, extrapolated) matches a direct count of
  its fully unrolled twin within 10%.
* ``python -m mmada_jax.aot --json`` on the tiny config for v5p:2x2x1 prints one JSON line with
  the documented fields.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install libtpu==0.0.42.1 for jax 0.10.2): "
                                       "AOT compilation for TPU topologies needs it")


@pytest.fixture(scope="module")
def topo_devices():
  from mmada_jax import aot
  topo = aot.parse_topology("v5p:2x2x1")
  try:
    devices = topo.devices()
  except Exception as e:  # noqa: BLE001 - libtpu present but unusable on this host
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")
  return topo, devices


def _tiny(**model):
  from mmada_jax.configs import tiny
  c = tiny.get_config("pretrain")
  for k, v in model.items():
    c.model[k] = v
  return c


def test_topology_names():
  from mmada_jax import aot
  assert aot.parse_topology("v5p-128").name == "v5p:4x4x4"          # v5p-N counts TensorCores
  assert aot.parse_topology("v5p-64").chips == 32
  assert aot.parse_topology("v5e-256").name == "v5e:16x16"
  assert aot.parse_topology("v5litepod-16").name == "v5e:4x4"
  assert aot.parse_topology("v6e-64").name == "v6e:8x8"
  assert aot.parse_topology("v6e:2x4").chips_per_host_bounds == (2, 4, 1)
  assert aot.parse_topology("v5p:4x4x4").chips_per_host_bounds == (2, 2, 1)
  with pytest.raises(ValueError, match="dimensions"):
    aot.parse_topology("v5p:4x4")
  with pytest.raises(ValueError, match="generation"):
    aot.parse_topology("v9z-8")


@pytest.mark.slow
@needs_libtpu
def test_scanned_estimate_matches_unrolled_twin(topo_devices):
  from mmada_jax import aot
  topo, devices = topo_devices
  cfg = _tiny(n_layers=4, scan_layers=True, remat_policy="full")
  est = aot.estimate(cfg, topo, devices=devices)
  direct = aot.direct_cost(_tiny(n_layers=4, scan_layers=False, remat_policy="full"), topo, devices)
  flops, secs = est["xla_step_flops"] / topo.chips, est["estimated_step_seconds"]
  assert flops == pytest.approx(direct["flops"], rel=0.10)
  assert secs == pytest.approx(direct["optimal_seconds"], rel=0.10)
  # The real (scanned) step alone counts its layer loop once: far below the full count.
  assert est["xla_raw"]["step_as_counted"]["flops"] * cfg.optimizer.grad_accum < 0.8 * direct["flops"]


@pytest.mark.slow
@needs_libtpu
def test_chunked_lm_head_flops_are_counted(topo_devices):
  """stage.logits_chunk's scanned chunk loop is unrolled in the cost twins: the FLOP estimate
  keeps every chunk (full logits + the backward's recompute), while the real step counts one."""
  from mmada_jax import aot
  topo, devices = topo_devices
  full = aot.estimate(_tiny(), topo, devices=devices)
  chunked_cfg = _tiny()
  chunked_cfg.stage.logits_chunk = 8
  chunked = aot.estimate(chunked_cfg, topo, devices=devices)
  assert chunked["xla_step_flops"] == pytest.approx(full["xla_step_flops"], rel=0.05)
  assert chunked["xla_step_flops"] >= full["xla_step_flops"]
  assert chunked["xla_raw"]["step_as_counted"]["flops"] < full["xla_raw"]["step_as_counted"]["flops"]


@pytest.mark.slow
@needs_libtpu
def test_cli_json_fields(topo_devices):
  # This process holds libtpu's lockfile (the fixture loaded it): let the child load it too.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "mmada_jax.aot", "--config=configs/tiny.py:pretrain",
                         "--topology=v5p:2x2x1", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  r = json.loads(lines[0])
  for key in ("fits", "hbm_per_chip_bytes", "hbm_capacity_bytes", "step_flops", "estimated_step_seconds",
              "estimated_mfu", "xla_step_flops", "mesh", "topology", "chips"):
    assert key in r, key
  assert r["topology"] == "v5p:2x2x1" and r["chips"] == 4 and r["mesh"]["fsdp"] == 4
  assert r["fits"] is True and 0 < r["hbm_per_chip_bytes"] < r["hbm_capacity_bytes"] == 95 * 2 ** 30
  m = r["memory"]
  assert r["hbm_per_chip_bytes"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
  assert r["step_flops"] > 0 and r["xla_step_flops"] > 0.5 * r["step_flops"]
  assert r["estimated_step_seconds"] > 0 and 0 < r["estimated_mfu"] < 1


def test_out_of_memory_messages_are_read():
  from mmada_jax import aot
  gib = 2 ** 30
  a = aot.parse_oom("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
                     "Used 101.25G of 95.74G hbm. Exceeded hbm capacity by 5.51G.")
  assert a == {"used_bytes": 101.25 * gib, "capacity_bytes": 95.74 * gib}
  b = aot.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                     "(176.97G) exceeds available HBM (95.74G).")
  assert b == {"used_bytes": 176.97 * gib, "capacity_bytes": 95.74 * gib}
  assert aot.parse_oom("INVALID_ARGUMENT: something else") is None

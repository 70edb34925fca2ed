"""Multi-process training on CPU: 2 processes × 4 devices (jax.distributed, explicit coordinator).

* The 2-process run gives bit-identical losses to a 1-process run on the same 8-device mesh that
  also uses the distributed runtime (both reduce with gloo). A plain single-process run (XLA's
  in-process collectives) matches at step 1 exactly and afterwards to float rounding.
* SIGTERM to one process: JAX's preemption sync point makes every process save the same step and
  exit 0; rerunning the same commands resumes and reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # several multi-process trainer runs
# data=4 × fsdp=2: FSDP inside each process, data parallel across them (CPU gloo collectives are
# slow, so the mesh keeps them few; the single-process tests cover other meshes).
ARGS = ("--config.steps=8", "--config.checkpoint_every=4", "--config.log_every=1", "--config.progress_bar=False",
        "--config.mesh_shape=data=4,fsdp=2")
COMPARED = ("loss", "loss_t2i", "loss_lm", "loss_mmu", "grad_norm", "lr")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("jax_cache_mp")


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache, devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(REPO))
  return env


def _launch(cache, workdir, n_proc: int, port: int | None, log_dir: pathlib.Path) -> list[subprocess.Popen]:
  procs = []
  for i in range(n_proc):
    cmd = [sys.executable, "-m", "mmada_jax.train", "--config=configs/tiny.py:pretrain", f"--workdir={workdir}", *ARGS]
    if port is not None:
      cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              f"--config.distributed.num_processes={n_proc}", f"--config.distributed.process_id={i}"]
    log = open(log_dir / f"p{i}_{time.time_ns()}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(cache, 8 // n_proc), stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, timeout=300) -> list[int]:
  t0 = time.time()
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1, timeout - (time.time() - t0))))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return codes


def _metrics(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in (json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")))}


def _logs(log_dir: pathlib.Path) -> str:
  return "\n".join(p.read_text()[-2000:] for p in sorted(log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, pathlib.Path]:
  """Uninterrupted 8-step runs: 2 processes × 4 devices, and 1 distributed process × 8 devices."""
  out = {}
  for name, n in (("two", 2), ("one", 1)):
    wd = tmp_path_factory.mktemp(name)
    logs = tmp_path_factory.mktemp(name + "_logs")
    codes = _wait(_launch(cache, wd, n, _port(), logs))
    assert codes == [0] * n, _logs(logs)
    out[name] = wd
  return out


def test_two_processes_match_one_process(runs, cache, tmp_path):
  two, one = _metrics(runs["two"]), _metrics(runs["one"])
  assert sorted(two) == sorted(one) == list(range(1, 9))
  for s in one:
    for k in COMPARED:
      assert two[s][k] == one[s][k], f"step {s} {k}: {two[s][k]!r} != {one[s][k]!r}"
  files = sorted(p.name for p in (runs["two"] / "checkpoints" / "8" / "data").glob("process_*.json"))
  assert files == ["process_0-of-2.json", "process_1-of-2.json"]
  # A plain single-process run (no distributed runtime): same data, init and masks, so step 1 is
  # identical; later steps differ only by the collectives' summation order.
  codes = _wait(_launch(cache, tmp_path / "plain", 1, None, tmp_path))
  assert codes == [0], _logs(tmp_path)
  plain = _metrics(tmp_path / "plain")
  assert plain[1]["loss"] == one[1]["loss"] and plain[1]["grad_norm"] == one[1]["grad_norm"]
  np.testing.assert_allclose([plain[s]["loss"] for s in one], [one[s]["loss"] for s in one], rtol=1e-3)


def test_sigterm_to_one_process_saves_everywhere_and_resumes_exactly(runs, cache, tmp_path):
  wd = tmp_path / "pre"
  port = _port()
  procs = _launch(cache, wd, 2, port, tmp_path)
  t0 = time.time()
  while not ((wd / "metrics.jsonl").exists() and len(open(wd / "metrics.jsonl").readlines()) >= 1):
    assert all(p.poll() is None for p in procs), _logs(tmp_path)
    assert time.time() - t0 < 240, "timed out"
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  assert _wait(procs, 120) == [0, 0], _logs(tmp_path)
  status = json.load(open(wd / "status.json"))
  assert status["status"] == "preempted" and status["step"] < 8, status
  data = wd / "checkpoints" / str(status["step"]) / "data"
  assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert _wait(_launch(cache, wd, 2, _port(), tmp_path)) == [0, 0], _logs(tmp_path)
  got, want = _metrics(wd), _metrics(runs["two"])
  assert sorted(got) == sorted(want)
  for s in want:
    for k in COMPARED:
      assert got[s][k] == want[s][k], f"step {s} {k}"

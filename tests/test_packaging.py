"""A wheel of this checkout, installed into a fresh virtual environment outside it, runs from a
directory with no ``configs/``: the demo's smoke preset, the trainer on a packaged preset
(``--config=configs/tiny.py:pretrain`` resolves to ``mmada_jax.configs``), and the notebook.

Offline: the wheel is built without build isolation and installed with ``--no-deps``; the fresh
environment sees this environment's dependencies through a ``.pth`` line naming its
site-packages (a path line, so this environment's editable-install hook is not run there).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import venv

import nbformat
import pytest

pytestmark = pytest.mark.slow   # builds and installs a wheel, then runs the demo

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "README.md", "mmada_jax", "configs")


def _run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
  proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
  """(python, env, cwd) of a fresh venv with the wheel installed; cwd is an empty directory."""
  root = tmp_path_factory.mktemp("packaging")
  src = root / "src"   # a copy, so the build's build/ and egg-info stay out of the checkout
  src.mkdir()
  for name in SOURCES:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
      shutil.copy2(REPO / name, src / name)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  wheels = root / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
       root, env, 600)
  (wheel,) = wheels.glob("mmada_jax-*.whl")

  env_dir = root / "venv"
  venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
  python = env_dir / "bin" / "python"
  purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env, 60)
  fresh_site = pathlib.Path(purelib.stdout.strip())
  _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
       root, env, 600)
  ours = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if os.path.isdir(p)]
  (fresh_site / "_dependencies_from_test_env.pth").write_text("\n".join(ours) + "\n")

  env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"   # the notebook kernel's "python"
  cwd = root / "elsewhere"
  cwd.mkdir()
  return {"python": python, "env": env, "cwd": cwd, "prefix": env_dir.resolve()}


def test_installed_package_is_the_wheel(installed):
  probe = _run([installed["python"], "-c", "import json, mmada_jax, mmada_jax.configs.tiny as t; "
                "print(json.dumps([mmada_jax.__file__, t.__file__]))"],
               installed["cwd"], installed["env"], 120)
  for f in json.loads(probe.stdout.strip().splitlines()[-1]):
    assert pathlib.Path(f).resolve().is_relative_to(installed["prefix"]), f
    assert not pathlib.Path(f).resolve().is_relative_to(REPO), f


def test_trainer_runs_a_packaged_preset(installed):
  wd = installed["cwd"] / "tiny"
  proc = _run([installed["python"], "-m", "mmada_jax.train", "--config=configs/tiny.py:pretrain", f"--workdir={wd}",
               "--config.steps=2", "--config.progress_bar=False", "--config.tensorboard=False"],
              installed["cwd"], installed["env"], 600)
  assert (wd / "checkpoints" / "2" / "state").is_dir(), proc.stderr[-3000:]
  assert len((wd / "metrics.jsonl").read_text().splitlines()) >= 1
  bad = subprocess.run([str(installed["python"]), "-m", "mmada_jax.train", "--config=configs/nope.py:pretrain",
                        f"--workdir={wd}_bad"], cwd=installed["cwd"], env=installed["env"], capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "config file not found: 'configs/nope.py'" in bad.stderr, bad.stderr[-2000:]
  assert str(installed["cwd"] / "configs" / "nope.py") in bad.stderr and "packaged presets" in bad.stderr


def test_demo_and_notebook_run_from_any_directory(installed):
  wd = installed["cwd"] / "demo"
  _run([installed["python"], "-m", "mmada_jax.demo", "--workdir", wd, "--preset", "smoke"],
       installed["cwd"], installed["env"], 1200)
  for name in ("summary.json", "samples.png", "samples.npz", "model/mmada_jax.json", "text_tokenizer/tokenizer.json",
               "grpo/metrics.jsonl", "report.md"):
    assert (wd / name).exists(), name
  assert json.loads((wd / "summary.json").read_text())["preset"] == "smoke"

  nb_in, nb_out = REPO / "notebooks" / "mmada_colab.ipynb", installed["cwd"] / "executed.ipynb"
  script = (
      "import sys, nbformat\n"
      "from nbclient import NotebookClient\n"
      "nb = nbformat.read(sys.argv[1], as_version=4)\n"
      "nb.cells.append(nbformat.v4.new_code_cell('import mmada_jax; print(\"PACKAGE\", mmada_jax.__file__)'))\n"
      "NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': sys.argv[3]}}).execute()\n"
      "nbformat.write(nb, sys.argv[2])\n")
  env = dict(installed["env"], MMADA_RUN_DIR=str(wd))
  _run([installed["python"], "-c", script, nb_in, nb_out, installed["cwd"]], installed["cwd"], env, 900)
  nb = nbformat.read(nb_out, as_version=4)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "total parameters" in text
  package = [l.split(" ", 1)[1] for l in text.splitlines() if l.startswith("PACKAGE ")]
  assert package and pathlib.Path(package[0]).resolve().is_relative_to(installed["prefix"]), package

"""``--config=PATH[:ARG]``: the working directory's file, else the preset shipped as
``mmada_jax.configs``; a missing file names every place tried."""
from __future__ import annotations

import os
import pathlib

import pytest

from mmada_jax.train import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_packaged_configs_are_the_checkouts_configs():
  """In a checkout (editable install or the package imported from it) the packaged presets are
  the top-level configs/ files, not copies."""
  import mmada_jax.configs.tiny as tiny
  assert pathlib.Path(config_files.packaged_config_dir()) == REPO / "configs"
  assert pathlib.Path(tiny.__file__) == REPO / "configs" / "tiny.py"
  assert config_files.packaged_presets() == ["configs/demo.py", "configs/eval.py", "configs/mmada_1b.py",
                                             "configs/mmada_8b.py", "configs/tiny.py"]


def test_working_directory_first_then_the_packaged_preset(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = os.path.join(config_files.packaged_config_dir(), "tiny.py")
  assert config_files.resolve_config_path("configs/tiny.py") == packaged
  assert config_files.resolve_config_path("tiny.py") == packaged
  assert config_files.resolve_config_spec("configs/tiny.py:sft,steps=3") == f"{packaged}:sft,steps=3"
  cfg = config_files.load_config_file("configs/tiny.py:pretrain")
  assert cfg.stage.name == "pretrain"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("def get_config(arg=None):\n  return {'mine': arg}\n")
  assert config_files.resolve_config_path("configs/tiny.py") == "configs/tiny.py"
  assert config_files.load_config_file("configs/tiny.py:x") == {"mine": "x"}


def test_argv_rewrite_touches_only_the_config_flag(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = os.path.join(config_files.packaged_config_dir(), "tiny.py")
  argv = ["prog", "--config=configs/tiny.py:pretrain", "--config.steps=3", "--workdir=w"]
  assert config_files.resolve_config_argv(argv) == ["prog", f"--config={packaged}:pretrain", "--config.steps=3",
                                                    "--workdir=w"]
  assert config_files.resolve_config_argv(["prog", "--config", "tiny.py"]) == ["prog", "--config", packaged]


def test_missing_config_names_every_place_tried(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    config_files.load_config_file("configs/nope.py:pretrain")
  text = str(e.value)
  assert "config file not found: 'configs/nope.py'" in text
  assert str(tmp_path / "configs" / "nope.py") in text
  assert os.path.join(config_files.packaged_config_dir(), "nope.py") in text and "configs/tiny.py" in text
  with pytest.raises(FileNotFoundError, match="tried /nonexistent/tiny.py$"):   # absolute: no packaged lookup
    config_files.resolve_config_path("/nonexistent/tiny.py")
  with pytest.raises(FileNotFoundError, match="other/tiny.py"):
    config_files.resolve_config_path("other/tiny.py")

"""The parity command over the reference fixture folders."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmada_jax.parity import main as parity_main


def test_all_public_cases_pass(tiny_mmada_dir, tiny_magvit_dir, capsys):
  assert parity_main([str(tiny_mmada_dir), str(tiny_magvit_dir), "--json"]) == 0
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  names = {r["name"] for r in rows}
  for expected in ("logits/nomask", "logits/boolbias", "logits/floatbias", "losses/lm", "losses/lm_chat",
                   "text_gen/g8_b4_s4_random", "text_gen/mmu_g8_b4_s4", "t2i_gen/cfg2_t6", "magvit/encode",
                   "magvit/decoded"):
    assert expected in names, expected
  assert all(r["ok"] for r in rows)


def _perturbed_copy(src, dst, file_name, key_part):
  shutil.copytree(src, dst)
  tensors = load_file(str(dst / file_name))
  key = next(k for k in tensors if key_part in k)
  t = tensors[key].copy()
  t.reshape(-1)[::7] += np.asarray(0.05, t.dtype)
  tensors[key] = t
  save_file(tensors, str(dst / file_name))


def test_fails_when_mmada_weights_change(tiny_mmada_dir, tmp_path, capsys):
  _perturbed_copy(tiny_mmada_dir, tmp_path / "m", "model.safetensors", "blocks.1.ff_out")
  assert parity_main([str(tmp_path / "m")]) == 1
  assert "FAIL  logits/nomask" in capsys.readouterr().out


def test_fails_when_tokenizer_weights_change(tiny_magvit_dir, tmp_path, capsys):
  _perturbed_copy(tiny_magvit_dir, tmp_path / "v", "pytorch_model.safetensors", "decoder.conv_out.weight")
  assert parity_main([str(tmp_path / "v")]) == 1
  assert "FAIL  magvit/decoded" in capsys.readouterr().out


def test_not_a_fixture_folder(tmp_path):
  assert parity_main([str(tmp_path)]) == 1


def test_a_folder_of_fixture_folders_expands(tiny_mmada_dir, tiny_magvit_dir, tmp_path):
  from mmada_jax.parity import expand_dirs
  assert expand_dirs(str(tiny_mmada_dir.parent)) == sorted([str(tiny_magvit_dir), str(tiny_mmada_dir)])
  assert expand_dirs(str(tiny_mmada_dir)) == [str(tiny_mmada_dir)]
  assert expand_dirs(str(tmp_path)) == [str(tmp_path)]      # then reported as not a fixture folder

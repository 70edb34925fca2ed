"""Checkpoint conversion: original layout ⇄ ours, bit-exact, with clear errors."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmada_jax import MMaDA
from mmada_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader
from mmada_jax.convert import main as convert_main


def _tensors(directory):
  with SafetensorsReader(str(directory)) as r:
    return {k: r[k] for k in r.keys()}


def test_hf_orbax_hf_round_trip_is_bit_exact(tiny_mmada_dir, tmp_path):
  assert convert_main(["to-orbax", str(tiny_mmada_dir), str(tmp_path / "orbax")]) == 0
  assert convert_main(["to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--max-shard-size", "8MB"]) == 0
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()   # sharded output
  src, out = _tensors(tiny_mmada_dir), _tensors(tmp_path / "hf")
  assert src.keys() == out.keys()
  for k in src:
    assert src[k].dtype == out[k].dtype and src[k].shape == out[k].shape, k
    assert src[k].tobytes() == out[k].tobytes(), k
  # The sharded export loads back and computes the same logits as the original files.
  ids = np.arange(10, 40).reshape(2, 15)
  a = MMaDA.from_pretrained(tiny_mmada_dir).logits(ids)
  b = MMaDA.from_pretrained(tmp_path / "hf").logits(ids)
  c = MMaDA.from_pretrained(tmp_path / "orbax").logits(ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert cfg["n_layers"] == 2 and cfg["block_type"] == "llama"


def test_bf16_round_trip(tiny_mmada_dir, tmp_path):
  src = _tensors(tiny_mmada_dir)
  bf = tmp_path / "bf16"
  bf.mkdir()
  shutil.copy(tiny_mmada_dir / "config.json", bf / "config.json")
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in src.items()}, str(bf / "model.safetensors"))
  assert convert_main(["to-orbax", str(bf), str(tmp_path / "o")]) == 0      # keeps bf16
  model = MMaDA.from_pretrained(tmp_path / "o")
  assert model.config.param_dtype == "bfloat16"
  model.save_pretrained(tmp_path / "back", format="hf")
  back = load_file(str(tmp_path / "back" / "model.safetensors"))
  for k, v in src.items():
    assert back[k].dtype == ml_dtypes.bfloat16
    assert back[k].tobytes() == v.astype(ml_dtypes.bfloat16).tobytes(), k


def _copy_with(tiny_mmada_dir, dst, edit):
  dst.mkdir()
  shutil.copy(tiny_mmada_dir / "config.json", dst / "config.json")
  t = _tensors(tiny_mmada_dir)
  edit(t)
  save_file(t, str(dst / "model.safetensors"))


def test_missing_tensor_is_named(tiny_mmada_dir, tmp_path):
  _copy_with(tiny_mmada_dir, tmp_path / "m", lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
  with pytest.raises(CheckpointError, match="blocks.1.up_proj"):
    MMaDA.from_pretrained(tmp_path / "m")
  assert convert_main(["to-orbax", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
  assert not (tmp_path / "out").exists()          # nothing half-written


def test_misshaped_tensor_is_named(tiny_mmada_dir, tmp_path):
  def edit(t):
    t["model.transformer.blocks.0.q_proj.weight"] = np.zeros((32, 16), np.float32)
  _copy_with(tiny_mmada_dir, tmp_path / "m", edit)
  with pytest.raises(CheckpointError, match=r"blocks.0.q_proj.weight has shape \(32, 16\), expected \(32, 32\)"):
    MMaDA.from_pretrained(tmp_path / "m")


def test_unexpected_tensor_is_named(tiny_mmada_dir, tmp_path):
  _copy_with(tiny_mmada_dir, tmp_path / "m",
             lambda t: t.update({"model.transformer.blocks.2.q_proj.weight": np.zeros((32, 32), np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected tensors"):
    MMaDA.from_pretrained(tmp_path / "m")


def test_corrupt_file(tiny_mmada_dir, tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(tiny_mmada_dir / "config.json", d / "config.json")
  (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(CheckpointError, match="cannot read safetensors"):
    MMaDA.from_pretrained(d)


def test_missing_weights_and_shards(tiny_mmada_dir, tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(tiny_mmada_dir / "config.json", d / "config.json")
  with pytest.raises(CheckpointError, match="no safetensors weights"):
    MMaDA.from_pretrained(d)
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
    MMaDA.from_pretrained(d)


def test_incomplete_orbax_dir_is_refused(tiny_mmada_dir, tmp_path):
  model = MMaDA.from_pretrained(tiny_mmada_dir)
  model.save_pretrained(tmp_path / "o")
  os.remove(tmp_path / "o" / "mmada_jax.json")
  with pytest.raises(CheckpointError, match="not a complete"):
    MMaDA.from_pretrained(tmp_path / "o")
  with pytest.raises(FileExistsError):
    model.save_pretrained(tmp_path / "o")


def test_export_refuses_to_overwrite(tiny_mmada_dir, tmp_path):
  (tmp_path / "dst").mkdir()
  (tmp_path / "dst" / "keep.txt").write_text("user data")
  assert convert_main(["to-hf", str(tiny_mmada_dir), str(tmp_path / "dst")]) == 2
  assert (tmp_path / "dst" / "keep.txt").read_text() == "user data"


def test_converter_carries_the_generation_config(tiny_mmada_dir, tmp_path):
  from mmada_jax import GenerationConfig
  model = MMaDA.from_pretrained(tiny_mmada_dir)
  gc = GenerationConfig(max_text_len=14, num_vq_tokens=16, t2i_steps=4)
  MMaDA(model.params, model.config, hf_config=model.hf_config, generation_config=gc).save_pretrained(tmp_path / "o")
  assert convert_main(["to-hf", str(tmp_path / "o"), str(tmp_path / "hf")]) == 0
  assert convert_main(["to-orbax", str(tmp_path / "hf"), str(tmp_path / "o2")]) == 0
  for d in ("hf", "o2"):
    assert MMaDA.from_pretrained(tmp_path / d).generation_config == gc
  # An original directory has none (only transformers' fields): none is invented on conversion.
  assert convert_main(["to-orbax", str(tiny_mmada_dir), str(tmp_path / "o3")]) == 0
  assert not (tmp_path / "o3" / "generation_config.json").exists()

"""The forward pass sharded over 8 simulated CPU devices equals the single-device one."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmada_jax import MMaDA
from mmada_jax.model import transformer
from mmada_jax.sharding import logical_to_spec, make_mesh, parse_mesh_shape


@pytest.fixture(scope="module")
def cases(tiny_mmada_dir):
  return dict(np.load(tiny_mmada_dir / "cases.npz"))


@pytest.fixture(scope="module")
def reference(tiny_mmada_dir, cases):
  model = MMaDA.from_pretrained(tiny_mmada_dir)
  ids = cases["logits/in/input_ids"]
  return {"nomask": np.asarray(model.logits(ids)),
          "mask": np.asarray(model.logits(ids, attention_mask=cases["logits/in/attention_mask"]))}


@pytest.mark.parametrize("shape", ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_sharded_forward_equals_single_device(tiny_mmada_dir, cases, reference, shape):
  assert jax.device_count() == 8
  mesh = make_mesh(shape)
  model = MMaDA.from_pretrained(tiny_mmada_dir, mesh=mesh)
  q = model.params["blocks"]["q_proj"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert model.params["wte"].sharding.spec == P("tensor", "fsdp")
  ids = np.concatenate([cases["logits/in/input_ids"]] * 2)[:4]     # batch divisible by data×fsdp
  mask = np.concatenate([cases["logits/in/attention_mask"]] * 2)[:4]
  got = np.asarray(model.logits(ids))
  np.testing.assert_allclose(got[:3], reference["nomask"], rtol=1e-5, atol=1e-5)
  got = np.asarray(model.logits(ids, attention_mask=mask))
  np.testing.assert_allclose(got[:3], reference["mask"], rtol=1e-5, atol=1e-5)


def test_indivisible_dims_fall_back_to_replication():
  spec = logical_to_spec(("embed", "kv_heads", "head_dim"), None, {"data": 1, "fsdp": 4, "tensor": 8}, (32, 4, 8))
  assert spec == P("fsdp", None, None)
  spec = logical_to_spec(("batch", "length"), None, {"data": 2, "fsdp": 4, "tensor": 1}, (4, 7))
  assert spec == P("data", None)


def test_every_parameter_has_rules(tiny_mmada_dir):
  model = MMaDA.from_pretrained(tiny_mmada_dir)
  for path, shape, dtype, axes in model.param_summary():
    assert len(axes) == len(shape), path
    logical_to_spec(axes)          # raises on an unknown logical name


def test_mesh_shape_parsing():
  assert parse_mesh_shape("fsdp=4,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert parse_mesh_shape("data=-1,tensor=2", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert parse_mesh_shape(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="unknown mesh axis"):
    parse_mesh_shape("model=2", 8)
  with pytest.raises(ValueError, match="uses 6 devices"):
    parse_mesh_shape("fsdp=3,tensor=2", 8)

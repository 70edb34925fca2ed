"""The sharding context (mesh + rules), presets, replication warnings and host ↔ global transfer."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import (DEFAULT_RULES, PRESETS, ShardingContext, constrain, current, make_mesh,
                                parse_rules, place_batch, record_constraints, rules as rules_lib, to_global,
                                to_host, use_sharding)

TINY = MMaDAConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=64,
                   mask_token_id=63, eos_token_id=62, pad_token_id=62, llm_vocab_size=48)


def _forward_constraints(ctx: ShardingContext) -> dict[tuple, P]:
  """names -> spec of every constrain call in a trace of the forward under ``ctx``."""
  params = jax.eval_shape(lambda k: transformer.init_params(TINY, k), jax.random.key(0))
  ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  with use_sharding(ctx), record_constraints() as log:
    jax.jit(lambda p, x: transformer.forward(p, TINY, x)).trace(params, ids)
  return {names: spec for names, _, spec in log}


def test_overrides_reach_activation_constraints():
  mesh = make_mesh("fsdp=4,tensor=2")
  default = _forward_constraints(ShardingContext.create(mesh))
  assert default[("batch", "length", "act_mlp")] == P(("data", "fsdp"), None, "tensor")
  assert default[("batch", "length", "act_vocab")] == P(("data", "fsdp"), None, "tensor")
  moved = _forward_constraints(ShardingContext.create(mesh, overrides="act_mlp=none,batch=fsdp"))
  assert moved[("batch", "length", "act_mlp")] == P("fsdp", None, None)
  assert moved[("batch", "length", "act_vocab")] == P("fsdp", None, "tensor")
  # a bare jax.set_mesh (no context) keeps the default rules
  with jax.set_mesh(mesh), record_constraints() as log:
    jax.eval_shape(lambda x: constrain(x, ("batch", "act_mlp")), jax.ShapeDtypeStruct((8, 64), jnp.float32))
  assert log == [(("batch", "act_mlp"), (8, 64), P(("data", "fsdp"), "tensor"))]


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((3, 5))
  with record_constraints() as log:
    assert constrain(x, ("batch", "act_embed")) is x
  assert log == []


def test_use_sharding_installs_mesh_and_rules_and_restores():
  mesh = make_mesh("fsdp=4,tensor=2")
  assert current().mesh is None and current().rules == DEFAULT_RULES
  assert jax.sharding.get_abstract_mesh().empty
  outer = ShardingContext.create(mesh, "fsdp")
  inner = ShardingContext.create(mesh, "fsdp_tp", "vocab=none")
  with use_sharding(outer):
    assert current() is outer and dict(jax.sharding.get_abstract_mesh().shape) == dict(mesh.shape)
    with use_sharding(inner):
      assert current() is inner
    assert current() is outer
  assert current().mesh is None and jax.sharding.get_abstract_mesh().empty
  with pytest.raises(TypeError, match="ShardingContext"):
    with use_sharding(mesh):
      pass


def test_presets_differ_as_documented():
  assert PRESETS["fsdp_tp"] == DEFAULT_RULES
  fsdp, hsdp = dict(PRESETS["fsdp"]), dict(PRESETS["hsdp"])
  assert all(v is None or "tensor" not in (v if isinstance(v, tuple) else (v,)) for v in fsdp.values())
  assert fsdp["batch"] == ("data", "fsdp") and fsdp["embed"] == "fsdp"
  assert hsdp["batch"] == ("data", "fsdp", "tensor") and hsdp["embed"] == ("fsdp", "tensor")
  assert hsdp["vocab"] is None and hsdp["act_mlp"] is None
  mesh = make_mesh("data=2,fsdp=2,tensor=2")
  q = ("layers", "embed", "heads", "head_dim")
  shape = (2, 32, 4, 8)
  assert ShardingContext.create(mesh, "fsdp_tp").spec(q, shape) == P(None, "fsdp", "tensor", None)
  assert ShardingContext.create(mesh, "fsdp").spec(q, shape) == P(None, "fsdp", None, None)
  assert ShardingContext.create(mesh, "hsdp").spec(q, shape) == P(None, ("fsdp", "tensor"), None, None)
  assert ShardingContext.create(mesh, "hsdp").ways("batch") == 8
  assert ShardingContext.create(mesh, "fsdp").ways("batch") == 4
  with pytest.raises(ValueError, match="unknown sharding preset 'zero3'"):
    ShardingContext.create(mesh, "zero3")


def test_parse_rules_applies_overrides_to_the_preset():
  got = dict(parse_rules("vocab=none,batch=data+fsdp+tensor", "fsdp_tp"))
  assert got["vocab"] is None and got["batch"] == ("data", "fsdp", "tensor")
  assert dict(parse_rules("mlp=tensor", "fsdp"))["mlp"] == "tensor"
  assert parse_rules("") == DEFAULT_RULES
  with pytest.raises(ValueError, match="expected logical=axis"):
    parse_rules("bogus=fsdp")
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parse_rules("vocab=model")


def test_describe_lists_the_resolved_table():
  text = ShardingContext.create(make_mesh("fsdp=4,tensor=2"), overrides="vocab=none").describe()
  lines = text.splitlines()
  assert lines[0] == "sharding: mesh data=1 fsdp=4 tensor=2"
  assert any(line.split() == ["vocab", "->", "replicated"] for line in lines)
  assert any(line.split() == ["batch", "->", "data+fsdp", "(4-way)"] for line in lines)
  assert len(lines) == 1 + len(DEFAULT_RULES)


def test_indivisible_dim_replication_is_logged_once(caplog):
  rules_lib._warned.clear()
  ctx = ShardingContext.create(make_mesh("fsdp=4,tensor=2"))
  with caplog.at_level(logging.WARNING, logger="mmada_jax.sharding"):
    assert ctx.spec(("embed", "kv_heads", "head_dim"), (32, 3, 8)) == P("fsdp", None, None)
    assert ctx.spec(("embed", "kv_heads", "head_dim"), (32, 3, 8)) == P("fsdp", None, None)
    assert ctx.spec(("batch", "length"), (6, 7)) == P("data", None)     # data=1 divides; fsdp=4 not
  msgs = [r.getMessage() for r in caplog.records if r.name == "mmada_jax.sharding"]
  assert len(msgs) == 2, msgs
  assert "'kv_heads' of size 3" in msgs[0] and "tensor" in msgs[0]
  assert "'batch' of size 6" in msgs[1] and "fsdp" in msgs[1]


@pytest.mark.parametrize("shape", ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_transfer_round_trip_on_8_devices(shape):
  assert jax.device_count() == 8
  ctx = ShardingContext.create(make_mesh(shape))
  x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  tree = {"a": x, "b": {"c": x.astype(np.float32) / 7}}
  g = to_global(tree, ctx)
  assert g["a"].shape == (16, 3) and g["a"].sharding.spec == P(("data", "fsdp"), None)
  back = to_host(g, ctx)
  np.testing.assert_array_equal(back["a"], x)
  np.testing.assert_array_equal(back["b"]["c"], tree["b"]["c"])
  # gradient accumulation: [A, B/A, ...], micro-batch a = rows a, a+A, ... (the step's layout)
  m = to_global(tree, ctx, micro=2)
  assert m["a"].shape == (2, 8, 3) and m["a"].sharding.spec == P(None, ("data", "fsdp"), None)
  ref = np.ascontiguousarray(x.reshape(8, 2, 3).swapaxes(0, 1))
  np.testing.assert_array_equal(np.asarray(m["a"]), ref)
  np.testing.assert_array_equal(to_host(m["a"], ctx, names=(None, "batch")), ref)
  assert to_global({"d": m["a"]}, ctx, micro=2)["d"] is m["a"]        # device arrays pass through
  with pytest.raises(ValueError, match="step layout"):
    to_global({"d": g["a"]}, ctx, micro=2)
  with pytest.raises(ValueError, match="cannot be split over the 4 batch shards"):
    to_global({"ids": np.zeros((4, 3))}, ctx, micro=2)
  with pytest.raises(ValueError, match="not divisible by optimizer.grad_accum=3"):
    to_global({"ids": np.zeros((16, 3))}, ctx, micro=3)


def test_transfer_follows_the_rules_and_passes_none():
  mesh = make_mesh("fsdp=4,tensor=2")
  ctx = ShardingContext.create(mesh, overrides="batch=fsdp+tensor")
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  assert to_global(x, ctx).sharding.spec == P(("fsdp", "tensor"), None)
  assert place_batch(None, ctx) is None
  assert place_batch(x, ctx).sharding.spec == P(("fsdp", "tensor"), None)
  assert place_batch(x[:3], ctx).sharding.spec == P(None, None)       # 3 rows: replicated
  with use_sharding(ctx):                                              # ctx=None: the current one
    assert place_batch(x).sharding.spec == P(("fsdp", "tensor"), None)
  assert place_batch(x) is x                                           # no mesh: as given
  plain = to_global(x, ShardingContext(None))
  assert isinstance(plain, jax.Array) and np.array_equal(np.asarray(plain), x)
  np.testing.assert_array_equal(to_host(jnp.asarray(x), names=None), x)


def test_context_places_parameters_by_logical_axes():
  mesh = make_mesh("fsdp=4,tensor=2")
  ctx = ShardingContext.create(mesh, "fsdp")
  params = jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))
  placed = ctx.place(params, transformer.param_axes(TINY))
  assert placed["wte"].sharding.spec == P(None, "fsdp")
  assert placed["blocks"]["q_proj"].sharding.spec == P(None, "fsdp", None, None)
  sh = ctx.param_shardings(transformer.param_axes(TINY), params)
  assert sh["lm_head"].spec == P("fsdp", None)
  with pytest.raises(ValueError, match="needs a mesh"):
    ShardingContext(None).place(params, transformer.param_axes(TINY))

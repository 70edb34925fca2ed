"""LoRA / QLoRA fine-tuning (``config.lora``, :mod:`mmada_jax.train.lora`): adapters only in the
optimizer, the base bit-unchanged, merged logits = adapted logits, QLoRA trains, exact resume,
a different base is refused, and ``convert to-hf --merge-lora`` exports the merged model."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from mmada_jax.configs import common, tiny
from mmada_jax.model import transformer
from mmada_jax.sharding import ShardingContext, to_global, use_sharding
from mmada_jax.sharding.rules import make_mesh
from mmada_jax.train import lora, run_setup
from mmada_jax.train.config import model_config, parse_config
from mmada_jax.train.step import jit_step, make_step_fn


def _tiny_cfg(dtype: str = "float32"):
  return dataclasses.replace(model_config(tiny.get_config("sft").model), dtype=dtype, param_dtype="float32")


def _random_adapters(plan: lora.LoraPlan, seed: int, b_zero: bool = False) -> dict:
  """Adapters with B != 0 (a trained state), or B = 0 (a fresh one); numpy draws (fast)."""
  rng = np.random.default_rng(seed)
  return {"blocks": {k: jnp.zeros(s) if b_zero and k.endswith("_lora_b") else jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                     for k, s in sorted(plan.adapter_shapes()["blocks"].items())}}


def _base(mcfg, seed: int = 0) -> dict:
  """Random float32 params of the model's layout (numpy draws: no random-kernel compiles)."""
  rng = np.random.default_rng(seed)

  def one(path, shape):
    name = jax.tree_util.keystr(path)
    if "norm" in name or "ln_f" in name:
      return jnp.ones(shape, jnp.float32)
    fan_in = shape[0] if "lm_head" in name else (1 if "wte" in name else shape[1])
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(one, transformer.param_shapes(mcfg), is_leaf=lambda x: isinstance(x, tuple))


_forward = jax.jit(transformer.forward, static_argnums=1)


def _logits(params, mcfg, ids):
  return _forward(params, mcfg, ids)


def test_config_defaults_off_and_bad_values_are_named():
  c = tiny.get_config("sft")
  assert parse_config(c).lora == lora.LoraConfig() and lora.plan_from_config(c, model_config(c.model)) is None
  assert common.lora_config(rank=8).rank == 8
  with pytest.raises(ValueError, match="matches no block matrix"):
    lora.match_targets("wte|lm_head")
  with pytest.raises(ValueError, match="not a regular expression"):
    lora.match_targets("q_proj(")
  with pytest.raises(ValueError, match="lora.rank=-1"):
    lora.LoraConfig(rank=-1)
  assert lora.match_targets("q_proj|v_proj") == ("q_proj", "v_proj")
  assert lora.match_targets(".*_proj") == ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")


def test_merged_logits_equal_adapted_and_zero_b_is_the_base():
  mcfg = _tiny_cfg()
  base = _base(mcfg)
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, mcfg.vocab_size)
  want_base = _logits(base, mcfg, ids)
  # a subset of targets: one input axis (q_proj, ff_out), two (attn_out); the others stay plain
  plan = lora.LoraPlan.create(lora.LoraConfig(rank=4, alpha=8.0, targets="q_proj|attn_out|ff_out"), mcfg)
  fresh = _random_adapters(plan, 2, b_zero=True)
  np.testing.assert_array_equal(_logits(plan.compose(base, fresh), mcfg, ids), want_base)  # B = 0
  adapters = _random_adapters(plan, 3)
  adapted = _logits(plan.compose(base, adapters), mcfg, ids)
  merged = _logits(plan.merge(base, adapters), mcfg, ids)
  assert float(jnp.max(jnp.abs(adapted - want_base))) > 1e-2            # the adapters do something
  np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4)


def test_qlora_merge_dequantizes_the_base_it_was_trained_on():
  mcfg = _tiny_cfg()
  base = _base(mcfg)
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, mcfg.vocab_size)
  plan = lora.LoraPlan.create(lora.LoraConfig(rank=4, targets="q_proj|attn_out|ff_out", base_qtype="int8"), mcfg)
  adapters = _random_adapters(plan, 4)
  qbase = jax.jit(plan.quantize_base)(base)
  assert isinstance(qbase["blocks"]["ff_out"], qwix.QArray) and qbase["blocks"]["ff_out"].qvalue.dtype == jnp.int8
  np.testing.assert_allclose(_logits(plan.merge(qbase, adapters), mcfg, ids),
                             _logits(plan.compose(qbase, adapters), mcfg, ids), rtol=1e-4, atol=1e-4)


def test_adapter_axes_follow_the_base_and_8b_layout():
  from mmada_jax.configs import mmada_8b
  mcfg = model_config(mmada_8b.get_config("stage2_1").model)
  plan = lora.LoraPlan.create(lora.LoraConfig(rank=16), mcfg)
  shapes, axes = plan.adapter_shapes()["blocks"], plan.adapter_axes()["blocks"]
  assert shapes["q_proj_lora_a"] == (32, 4096, 16) and shapes["q_proj_lora_b"] == (32, 16, 32, 128)
  assert shapes["attn_out_lora_a"] == (32, 32, 128, 16) and shapes["ff_out_lora_b"] == (32, 16, 4096)
  assert axes["q_proj_lora_a"] == ("layers", "embed", None) and axes["q_proj_lora_b"] == ("layers", None, "heads", "head_dim")
  assert axes["ff_out_lora_a"] == ("layers", "mlp", None) and axes["ff_out_lora_b"] == ("layers", None, "embed")
  ctx = ShardingContext.create(make_mesh("fsdp=4,tensor=2"))
  sh = ctx.param_shardings(plan.adapter_axes(), plan.abstract_adapters())["blocks"]
  assert sh["ff_proj_lora_a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert sh["ff_proj_lora_b"].spec == jax.sharding.PartitionSpec(None, None, "tensor")
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert 40e6 < n < 45e6          # rank 16 on all seven matrices of the 8B: ~42M trained parameters
  qplan = lora.LoraPlan.create(lora.LoraConfig(rank=16, base_qtype="int4"), mcfg)
  qb = qplan.abstract_base(ctx)["blocks"]
  assert qb["ff_proj"].qvalue.dtype == jnp.int4 and qb["ff_proj"].scale.shape == (32, 32, 12288)
  assert qb["attn_out"].scale.shape == (32, 32, 1, 4096)


def test_fingerprint_sees_one_bit_and_ignores_the_placement():
  mcfg = _tiny_cfg("bfloat16")
  full = _base(mcfg)
  p = {"wte": full["wte"].astype(jnp.bfloat16), "blocks": {"v_proj": full["blocks"]["v_proj"].astype(jnp.bfloat16)}}
  axes = transformer.param_axes(mcfg)
  h = lora.fingerprint(p)
  placed = ShardingContext.create(make_mesh("fsdp=4,tensor=2")).place(
      p, {"wte": axes["wte"], "blocks": {"v_proj": axes["blocks"]["v_proj"]}})
  assert lora.fingerprint(placed) == h
  w = np.asarray(p["blocks"]["v_proj"]).copy()
  w.view(np.uint16).reshape(-1)[7] ^= 1                 # one bit of one weight
  assert lora.fingerprint({"wte": p["wte"], "blocks": {"v_proj": jnp.asarray(w)}}) != h


def _train(qtype: str, steps: int, tmp_path):
  cfg = tiny.get_config("sft")
  cfg.lora = common.lora_config(rank=4, alpha=8.0, base_qtype=qtype)
  cfg.optimizer.warmup_steps, cfg.progress_bar, cfg.tensorboard = 0, False, False
  r = run_setup.setup(cfg, str(tmp_path / qtype))
  start = run_setup.restore_or_init(r)
  before = jax.device_get(start.frozen["base"])
  step_fn = make_step_fn(r.stage, r.tx, r.schedule, r.shardings.params)
  state, losses, jitted = start.state, [], None
  with use_sharding(r.shard_ctx):
    for _ in range(steps):
      batch = to_global(next(r.data_iter), r.shard_ctx, micro=r.grad_accum)
      jitted = jitted or jit_step(step_fn, r.shardings, batch, start.frozen, r.mesh)
      state, m = jitted(state, batch, start.frozen)
      losses.append(float(m["loss"]))
  return r, start, before, state, losses


@pytest.mark.slow  # ~15 s each on 2 shared CPU cores (compiles the tiny step)
@pytest.mark.parametrize("qtype", ["none", "int4"])
def test_lora_sft_trains_adapters_only_and_leaves_the_base_bit_unchanged(qtype, tmp_path):
  r, start, before, state, losses = _train(qtype, 10, tmp_path)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
  after = jax.device_get(start.frozen["base"])          # not donated, not updated
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  if qtype == "int4":
    assert after["blocks"]["q_proj"].qvalue.dtype == jnp.int4
  names = set(state.params["blocks"])
  assert names == {f"{n}_{ab}" for n in lora.ADAPTABLE for ab in ("lora_a", "lora_b")}
  moments = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if x.ndim]
  assert len(moments) == 2 * len(names) and all("_lora_" in m for m in moments)   # AdamW mu, nu of adapters only


def _save_base(mcfg, seed: int, path) -> str:
  from mmada_jax.checkpoint import orbax_io
  orbax_io.save_params(transformer.init_params(mcfg, jax.random.key(seed)), mcfg, str(path))
  return str(path)


@pytest.mark.slow  # whole trainer runs + an export (~1 min)
def test_resume_is_exact_other_base_is_refused_and_merge_lora_exports(tmp_path):
  from mmada_jax.checkpoint import hf_mmada
  from mmada_jax import convert
  from mmada_jax.train import checkpointing, trainer
  cfg = tiny.get_config("sft")
  cfg.model.dtype = "float32"
  mcfg = model_config(cfg.model)
  base_dir = _save_base(mcfg, 5, tmp_path / "base")
  cfg.init_from = base_dir
  cfg.lora = common.lora_config(rank=4, alpha=8.0, targets="q_proj|v_proj|ff_out")
  cfg.steps, cfg.checkpoint_every, cfg.progress_bar, cfg.tensorboard = 6, 3, False, False
  cfg.optimizer.warmup_steps = 0
  wd = tmp_path / "run"
  assert trainer.run(cfg, str(wd)) == 0
  meta = json.load(open(wd / "checkpoints" / "6" / "meta" / "metadata"))
  assert meta["lora"]["base_path"] == base_dir and len(meta["lora"]["base_hash"]) == 64

  def adapters(step_dir):
    plan = lora.LoraPlan.create(lora.LoraConfig(rank=4, alpha=8.0, targets="q_proj|v_proj|ff_out"), mcfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), plan.abstract_adapters())
    return jax.device_get(checkpointing.load_init_params(str(step_dir), mcfg, abstract, None))

  want = adapters(wd / "checkpoints" / "6")
  shutil.rmtree(wd / "checkpoints" / "6")               # resume from step 3 and redo 4..6
  assert trainer.run(cfg, str(wd)) == 0
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(adapters(wd / "checkpoints" / "6"))):
    np.testing.assert_array_equal(a, b)

  other = tmp_path / "other"
  cfg.init_from = _save_base(mcfg, 6, other)
  cfg.steps = 9
  with pytest.raises(lora.BaseMismatch, match="content hash"):
    trainer.run(cfg, str(wd))

  dst = tmp_path / "merged"
  assert convert.main(["to-hf", str(other), str(tmp_path / "bad"), "--merge-lora", str(wd)]) == 2
  assert convert.main(["to-hf", base_dir, str(dst), "--merge-lora", str(wd)]) == 0
  merged, _ = hf_mmada.load_hf_checkpoint(str(dst), "float32")
  plan, ad, _ = lora.load_adapters(str(wd), mcfg)
  from mmada_jax.checkpoint import orbax_io
  base, _ = orbax_io.load_params(base_dir, "float32")
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, mcfg.vocab_size)
  adapted = _logits(plan.compose(base, ad), mcfg, ids)
  assert float(jnp.max(jnp.abs(adapted - _logits(base, mcfg, ids)))) > 1e-4
  np.testing.assert_allclose(_logits(merged, mcfg, ids), adapted, rtol=1e-4, atol=1e-4)
  assert os.path.isfile(dst / "config.json")


@pytest.mark.slow  # libtpu compiles (~1 min on 2 CPU cores)
def test_aot_step_trains_adapters_only_and_the_int4_base_is_smaller():
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: AOT compilation for TPU topologies needs it")
  from mmada_jax import aot
  from mmada_jax.aot.programs import compile_step
  topo = aot.parse_topology("v5p:2x2x1")
  try:
    devices = topo.devices()
  except Exception as e:  # noqa: BLE001 - libtpu present but unusable on this host
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")
  args = {}
  for qtype in ("none", "int4"):
    c = tiny.get_config("sft")
    c.model.d_model, c.model.mlp_hidden_size = 256, 512          # int4 tiles of 128 on the inputs
    c.lora = common.lora_config(rank=8, base_qtype=qtype)
    prog = compile_step(c, model_config(c.model), make_mesh("fsdp=4", devices))
    assert prog.compiled.memory is not None, prog.compiled.error
    assert set(prog.abstract.params["blocks"]) == {f"{n}_{ab}" for n in lora.ADAPTABLE for ab in ("lora_a", "lora_b")}
    args[qtype] = prog.compiled.memory["argument"]
  assert args["int4"] < args["none"]

"""The trainer on 8 simulated CPU devices: loss falls, exact resume after SIGKILL and SIGTERM,
restore onto another mesh, non-finite loss handling, init_from, clear config/data errors.

Whole runs are subprocesses of ``python -m mmada_jax.train`` with the tiny config; they share a
persistent compilation cache, so the train step compiles once per mesh for the module.
"""
from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

REPO = pathlib.Path(__file__).resolve().parents[1]

from mmada_jax.configs import common, tiny  # noqa: E402  (configs/, installed as mmada_jax.configs)
from mmada_jax.diffusion import objectives
from mmada_jax.prompting.special_tokens import IGNORE_ID
from mmada_jax.sharding import ShardingContext, parse_rules, to_global
from mmada_jax.sharding.rules import make_mesh, param_shardings
from mmada_jax.train import checkpointing, optim, stages, state as state_lib
from mmada_jax.train.toy_data import TOY_SPECIALS, make_toy_iterator
from mmada_jax.train.trainer import model_config

REF = ("--config.steps=24", "--config.checkpoint_every=4", "--config.log_every=1")
COMPARED = ("loss", "loss_t2i", "loss_lm", "loss_mmu", "grad_norm", "lr")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache: pathlib.Path, devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(REPO))
  return env


def _cmd(workdir, *overrides, variant: str = "pretrain") -> list[str]:
  return [sys.executable, "-m", "mmada_jax.train", f"--config=configs/tiny.py:{variant}",
          f"--workdir={workdir}", "--config.progress_bar=False", *overrides]


def _run(cache, workdir, *overrides, variant="pretrain", timeout=240) -> subprocess.CompletedProcess:
  return subprocess.run(_cmd(workdir, *overrides, variant=variant), cwd=REPO, env=_env(cache),
                        capture_output=True, text=True, timeout=timeout)


def _metrics(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"metrics.jsonl steps not unique/increasing: {steps}"
  return {r["step"]: r for r in rows}


def _assert_identical(got: dict[int, dict], want: dict[int, dict]) -> None:
  assert sorted(got) == sorted(want)
  for s in want:
    for k in COMPARED:
      assert got[s][k] == want[s][k], f"step {s} {k}: {got[s][k]!r} != {want[s][k]!r}"


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240.0) -> None:
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc={proc.returncode}) before the expected event")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> pathlib.Path:
  """An uninterrupted 24-step run (checkpoints every 4 steps, keep 3)."""
  wd = tmp_path_factory.mktemp("reference")
  r = _run(cache, wd, *REF)
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


# ----------------------------------------------------------------------------- whole runs

def test_tiny_trains_and_reports(reference):
  m = _metrics(reference)
  assert sorted(m) == list(range(1, 25))
  first, last = m[1]["loss"], np.mean([m[s]["loss"] for s in range(21, 25)])
  assert last < 0.6 * first, (first, last)
  for key in ("step", "loss", "loss_t2i", "loss_lm", "loss_mmu", "lr", "grad_norm"):
    assert key in m[5], key
  assert m[5]["tokens_per_sec"] > 0 and m[5]["steps_per_sec"] > 0
  assert m[1]["lr"] == 0.0 and m[10]["lr"] > m[2]["lr"]                      # linear warm-up from 0
  assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [16, 20, 24]  # max_to_keep=3
  status = json.load(open(reference / "status.json"))
  assert status["status"] == "finished"
  times = status["timings_s"]           # where the run's wall time went (train.metrics.PhaseTimes)
  assert sorted(times) == sorted(("setup", "compile", "data", "pre_step", "step", "checkpoint", "sampling"))
  assert times["setup"] > 0 and times["compile"] > 0 and times["step"] > 0 and times["checkpoint"] > 0
  assert times["pre_step"] == 0.0       # a mixed stage has no pre-step
  meta = json.load(open(reference / "config.json"))
  assert meta["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and meta["config"]["steps"] == 24


def test_sigkill_then_rerun_is_bit_identical(cache, reference, tmp_path):
  wd = tmp_path / "killed"
  log = open(tmp_path / "log.txt", "w")
  proc = subprocess.Popen(_cmd(wd, *REF), cwd=REPO, env=_env(cache), stdout=log, stderr=subprocess.STDOUT)
  _wait_for(lambda: (wd / "checkpoints" / "8").is_dir(), proc)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  logged = max(_metrics(wd)) if (wd / "metrics.jsonl").exists() else 0
  r = _run(cache, wd, *REF)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr
  resumed_at = int(r.stderr.split("resumed from")[1].split("step")[1].split()[0])
  assert 8 <= resumed_at < 24 and resumed_at % 4 == 0, (resumed_at, logged)
  _assert_identical(_metrics(wd), _metrics(reference))


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(cache, reference, tmp_path):
  wd = tmp_path / "preempted"
  log = open(tmp_path / "log.txt", "w")
  proc = subprocess.Popen(_cmd(wd, *REF), cwd=REPO, env=_env(cache), stdout=log, stderr=subprocess.STDOUT)
  _wait_for(lambda: (wd / "metrics.jsonl").exists() and len(open(wd / "metrics.jsonl").readlines()) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  status = json.load(open(wd / "status.json"))
  assert status["status"] == "preempted", status
  step = status["step"]
  assert 2 <= step < 24
  assert (wd / "checkpoints" / str(step) / "state").is_dir()
  assert "preemption signal: saved a checkpoint at step" in open(tmp_path / "log.txt").read()
  r = _run(cache, wd, *REF)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"step {step}" in r.stderr
  _assert_identical(_metrics(wd), _metrics(reference))


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_restore_onto_another_mesh(cache, reference, tmp_path):
  cfg = tiny.get_config("pretrain")
  mcfg = model_config(cfg.model)
  tx, _ = optim.make_optimizer(cfg.optimizer, state_lib.abstract_params(mcfg), 24)
  ckpt = checkpointing.Checkpointer(str(reference / "checkpoints"), cfg.checkpoint)
  restored = {}
  for shape in ("fsdp=8", "fsdp=2,tensor=4"):
    mesh = make_mesh(shape)
    abstract, _ = state_lib.state_shardings(mcfg, tx, mesh)
    with jax.set_mesh(mesh):
      step, state, data, meta = ckpt.restore_latest(abstract)
    assert step == 24 and int(state.step) == 24 and data["step"] == 24 and meta["step"] == 24
    restored[shape] = state
  ckpt.close()
  new = restored["fsdp=2,tensor=4"]
  assert new.params["lm_head"].sharding.spec == P("fsdp", "tensor")
  assert new.params["blocks"]["ff_proj"].sharding.spec == P(None, "fsdp", "tensor")
  adam = [x for x in jax.tree.leaves(new.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")][0]
  assert adam.mu["lm_head"].sharding.spec == P("fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(restored["fsdp=8"]), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and training continues on that mesh.
  wd = tmp_path / "continued"
  shutil.copytree(reference, wd)
  r = _run(cache, wd, "--config.steps=26", "--config.checkpoint_every=4", "--config.mesh_shape=fsdp=2,tensor=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr and "'tensor': 4" in r.stderr
  m = _metrics(wd)
  assert sorted(m)[-2:] == [25, 26] and all(np.isfinite(m[s]["loss"]) for s in (25, 26))


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_nonfinite_loss_stops_with_last_good_checkpoint(cache, tmp_path):
  wd = tmp_path / "nan"
  r = _run(cache, wd, "--config.steps=12", "--config.checkpoint_every=1", "--config.optimizer.lr=1e30",
           "--config.optimizer.warmup_steps=0")
  assert r.returncode == 3, r.stderr[-3000:]
  assert "non-finite loss at step" in r.stderr and "last good checkpoint is step" in r.stderr
  bad = int(r.stderr.split("non-finite loss at step ")[1].split(":")[0])
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == bad - 1
  cfg = tiny.get_config("pretrain")
  mcfg = model_config(cfg.model)
  tx, _ = optim.make_optimizer(cfg.optimizer, state_lib.abstract_params(mcfg), 12)
  abstract, _ = state_lib.state_shardings(mcfg, tx, make_mesh("fsdp=8"))
  ckpt = checkpointing.Checkpointer(str(wd / "checkpoints"), cfg.checkpoint)
  _, state, _, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert json.load(open(wd / "status.json"))["status"] == "nonfinite"


def test_unknown_config_key_fails_at_once(cache, tmp_path):
  t0 = time.time()
  r = _run(cache, tmp_path / "x", "--config.nonexistent=1")
  assert r.returncode == 2 and "nonexistent" in r.stderr, r.stderr[-2000:]
  r = _run(cache, tmp_path / "x", "--config.optimizer.lrr=1")
  assert r.returncode == 2 and "config.optimizer.lrr" in r.stderr, r.stderr[-2000:]
  assert time.time() - t0 < 60
  assert not (tmp_path / "x").exists()


def test_missing_data_paths_are_named(cache, tmp_path):
  r = subprocess.run(_cmd(tmp_path / "x", "--config.data.text_tokenizer=/nonexistent/tokenizer.json",
                          variant="pretrain,records"), cwd=REPO, env=_env(cache), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "config.data.text_tokenizer='/nonexistent/tokenizer.json' does not exist" in r.stderr
  for task in ("t2i", "lm", "mmu"):
    assert f"config.data.{task}.path is empty" in r.stderr
  r = subprocess.run(_cmd(tmp_path / "y", "--config.init_from=/nonexistent/ckpt"), cwd=REPO, env=_env(cache),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "config.init_from='/nonexistent/ckpt' does not exist" in r.stderr


@pytest.mark.slow   # three trainer subprocesses (the demo, also slow, runs records + init_from too)
def test_records_source_sft_and_init_from_workdir(cache, tmp_path):
  """The grain pipeline over synthetic files feeds the same trainer (SFT, lm_chat rows), and
  init_from loads the pre-training workdir's newest params (vocabularies differ, so only when
  shapes match: here a fresh tiny model with the tokenizer's vocabulary)."""
  from mmada_jax.data import synthetic
  tok = synthetic.tiny_tokenizer(vocab_size=300)
  tok_dir = tok.save(str(tmp_path / "tok"))
  d = tmp_path / "data"
  synthetic.write_token_shards(str(d / "t2i"), 32, num_tokens=16, codebook_size=64)
  synthetic.write_token_shards(str(d / "mmu"), 32, num_tokens=16, codebook_size=64, kind="messages")
  synthetic.write_chat_jsonl(str(d / "chat.jsonl"), 32)
  from mmada_jax.prompting.special_tokens import SpecialTokens
  sp = SpecialTokens.from_tokenizer(tok)
  over = ["--config.steps=6", "--config.checkpoint_every=3", f"--config.data.text_tokenizer={tok_dir}",
          f"--config.data.t2i.path={d / 't2i'}", f"--config.data.mmu.path={d / 'mmu'}",
          f"--config.data.lm.path={d / 'chat.jsonl'}", f"--config.model.vocab_size={sp.image_offset + 64}",
          f"--config.model.mask_token_id={sp.mask}", f"--config.model.llm_vocab_size={sp.image_offset}",
          "--config.optimizer.lr=1e-2", "--config.optimizer.schedule_steps=6"]
  wd = tmp_path / "sft"
  r = subprocess.run(_cmd(wd, *over, variant="sft,records"), cwd=REPO, env=_env(cache),
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  m = _metrics(wd)
  assert sorted(m) == list(range(1, 7)) and m[6]["loss"] < m[1]["loss"]
  for key in ("data/t2i/t2i", "data/lm/chat", "data/mmu/mmu"):  # rows per source so far, every step
    assert m[1][key] > 0 and all(m[k][key] == k * m[1][key] for k in m), key
  assert (wd / "checkpoints" / "6" / "data" / "process_0-of-1.json").is_file()
  # init_from this workdir: params only, optimizer fresh, step 0.
  wd2 = tmp_path / "sft2"
  r = subprocess.run(_cmd(wd2, *over, f"--config.init_from={wd}", "--config.steps=1", variant="sft,records"),
                     cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"initialised parameters from {wd}" in r.stderr
  assert _metrics(wd2)[1]["loss"] < m[1]["loss"]
  # A vocabulary mismatch with the data is caught before training.
  r = subprocess.run(_cmd(tmp_path / "bad", *over, "--config.model.mask_token_id=5", variant="sft,records"),
                     cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=240)
  assert r.returncode == 2 and "mask_token_id=5" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- units

def test_lr_schedule_and_quirks():
  o = common.optimizer_config(lr=1.0, warmup_steps=10)
  f = optim.lr_schedule(o, 110)
  np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 60, 110, 200)], [0, 0.5, 1, 0.5, 0, 0], atol=1e-6)
  o.honour_min_lr_scale = True
  f = optim.lr_schedule(o, 110)
  np.testing.assert_allclose([float(f(s)) for s in (10, 60, 110)], [1, 0.55, 0.1], atol=1e-6)
  params = {"wte": jnp.zeros((4, 2)), "ln_f": jnp.zeros(2), "blocks": {"attn_norm": jnp.zeros((2, 2)),
                                                                      "q_proj": jnp.zeros((2, 2, 2))}}
  assert all(jax.tree.leaves(optim.weight_decay_mask("all", params)))
  m = optim.weight_decay_mask("matrices", params)
  assert m["blocks"]["q_proj"] and not m["wte"] and not m["ln_f"] and not m["blocks"]["attn_norm"]


def test_adamw_matches_torch_formula():
  o = common.optimizer_config(lr=0.1, warmup_steps=0, clip_grad_norm=0.0)
  p = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  tx, _ = optim.make_optimizer(o, p, 100)
  upd, _ = tx.update(g, tx.init(p), p)
  new = np.asarray(p["w"] + upd["w"])
  # torch AdamW step 1: p -= lr*wd*p; m̂ = g, v̂ = g²; p -= lr * m̂/(sqrt(v̂)+eps)
  want = np.array([1.0, -2.0]) * (1 - 0.1 * 0.01) - 0.1 * np.array([0.5, 0.25]) / (np.array([0.5, 0.25]) + 1e-8)
  np.testing.assert_allclose(new, want, rtol=1e-6)


def test_state_shardings_follow_params():
  cfg = tiny.get_config("pretrain")
  mcfg = model_config(cfg.model)
  tx, _ = optim.make_optimizer(cfg.optimizer, state_lib.abstract_params(mcfg), 10)
  mesh = make_mesh("fsdp=4,tensor=2")
  _, default = state_lib.state_shardings(mcfg, tx, mesh, parse_rules(""))
  assert default.params["lm_head"].spec == P("fsdp", "tensor")
  abstract, shard = state_lib.state_shardings(mcfg, tx, mesh, parse_rules("vocab=none"))  # not the default
  adam = [s for s in jax.tree.leaves(shard.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
  assert adam.mu["lm_head"].spec == shard.params["lm_head"].spec == P("fsdp", None)
  assert adam.nu["blocks"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
  assert shard.step.spec == P() and abstract.rng.shape == (2,)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parse_rules("vocab=model")


def test_micro_batches_interleave_rows():
  mesh = make_mesh("fsdp=4,tensor=2")
  x = np.arange(16 * 3).reshape(16, 3)
  ctx = ShardingContext.create(mesh)
  g = to_global({"a": {"ids": x}}, ctx, micro=2)["a"]["ids"]
  assert g.shape == (2, 8, 3) and g.sharding.spec == P(None, ("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(g)[0], x[0::2])
  np.testing.assert_array_equal(np.asarray(g)[1], x[1::2])
  with pytest.raises(ValueError, match="cannot be split"):
    to_global({"ids": np.zeros((4, 3))}, ctx, micro=2)


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_mixed_noising_semantics():
  cfg = tiny.get_config("pretrain")
  it = make_toy_iterator(cfg.data, cfg.toy, 0, 1, 0)
  batch = jax.tree.map(jnp.asarray, next(it))
  spec = objectives.MixedSpec.from_config(cfg, model_config(cfg.model))
  lb, sizes = objectives.noise_mixed_batch(batch, jax.random.PRNGKey(3), spec)
  s, n, mask = cfg.data.max_text_len, cfg.data.num_image_tokens, TOY_SPECIALS.mask
  assert sizes == (16, 16, 16) and lb["input_ids"].shape == (48, s + n + 3)
  ids, labels = np.asarray(lb["input_ids"]), np.asarray(lb["labels"])
  t_ids, t_lab = ids[:16], labels[:16]
  clean = np.asarray(batch["t2i"]["input_ids"])
  img = slice(s + 2, s + 2 + n)
  masked = t_ids[:, img] == mask
  assert (t_lab[:, :s + 1] == IGNORE_ID).all()                                  # text never in the loss
  assert (t_lab[:, s + 1] == TOY_SPECIALS.soi).all() and (t_lab[:, -1] == TOY_SPECIALS.eoi).all()
  np.testing.assert_array_equal(np.where(masked, clean[:, img], IGNORE_ID), t_lab[:, img])
  assert (masked.sum(1) >= 1).all() and set(np.unique(masked.sum(1))) <= set(range(1, n + 1))
  np.testing.assert_array_equal(t_ids[:, :s + 2], clean[:, :s + 2])
  mmu_clean, mmu_pm = np.asarray(batch["mmu"]["input_ids"]), np.asarray(batch["mmu"]["prompt_mask"])
  np.testing.assert_array_equal(ids[32:][mmu_pm > 0], mmu_clean[mmu_pm > 0])       # prompt never noised
  assert (labels[32:, :n + 3] == IGNORE_ID).all()
  np.testing.assert_array_equal(np.asarray(lb["answer_lengths"]), (mmu_pm == 0).sum(1))
  np.testing.assert_array_equal(labels[16:32], np.asarray(batch["lm"]["input_ids"]))
  assert "answer_lengths_lm" not in lb                                           # lm pre-training formula
  p = np.asarray(lb["p_mask_lm"])
  assert ((p >= 1e-3) & (p <= 1.0)).all()
  # Both t2i attention options train; they differ only through the t2i rows' padding.
  import dataclasses
  from mmada_jax.model import transformer
  mcfg = model_config(cfg.model)
  params = transformer.init_params(mcfg, jax.random.PRNGKey(0))
  out = {}
  for mode in ("hard", "original_additive"):
    sp = dataclasses.replace(spec, t2i_attention=mode)
    loss, parts = jax.jit(lambda pr, b: objectives.mixed_loss_fn(pr, b, jax.random.PRNGKey(3), None, model_cfg=mcfg,
                                                             spec=sp))(params, batch)
    out[mode] = {k: float(v) for k, v in parts.items()}
    assert np.isfinite(float(loss))
  assert out["hard"]["loss_lm"] == pytest.approx(out["original_additive"]["loss_lm"], rel=1e-4)  # +1 on every key: softmax-invariant
  assert out["hard"]["loss_t2i"] != out["original_additive"]["loss_t2i"]


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_chunked_lm_head_loss_equals_full_logits():
  """stage.logits_chunk > 0 (LM head + CE per chunk of positions) gives the trainer's loss and
  gradient, on one device and sharded over fsdp=4 × tensor=2."""
  import dataclasses
  from mmada_jax.model import transformer
  cfg = tiny.get_config("pretrain")
  cfg.model.dtype = "float32"   # fp32 compute: chunk sums agree to rounding (bf16 differs ~0.3%)
  mcfg = model_config(cfg.model)
  spec = objectives.MixedSpec.from_config(cfg, mcfg)
  params = transformer.init_params(mcfg, jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, next(make_toy_iterator(cfg.data, cfg.toy, 0, 1, 0)))

  def grad_fn(chunk):
    sp = dataclasses.replace(spec, logits_chunk=chunk)
    return jax.jit(jax.value_and_grad(
        lambda p: objectives.mixed_loss_fn(p, batch, jax.random.key(3), None, model_cfg=mcfg, spec=sp), has_aux=True))

  (l_full, m_full), g_full = grad_fn(0)(params)
  assert batch["t2i"]["input_ids"].shape[1] % 10 != 0          # 39 positions: the last chunk is padded
  (l_chunk, m_chunk), g_chunk = grad_fn(10)(params)
  np.testing.assert_allclose(l_chunk, l_full, rtol=1e-5)
  for k in m_full:
    np.testing.assert_allclose(m_chunk[k], m_full[k], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  mesh = make_mesh("fsdp=4,tensor=2")
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, param_shardings(transformer.param_axes(mcfg), params, mesh,
                                                     parse_rules(cfg.sharding_rules)))
    (l_sh, _), _ = grad_fn(16)(sharded)
  np.testing.assert_allclose(l_sh, l_full, rtol=1e-5)
  with pytest.raises(ValueError, match="logits_chunk"):
    bad = tiny.get_config("pretrain")
    bad.stage.logits_chunk = -1
    objectives.MixedSpec.from_config(bad, mcfg)


def _two_checkpoints(directory: pathlib.Path, mesh, step8_holds: int = 8):
  """A Checkpointer over ``directory`` with steps 4 and 8 of the tiny model saved (step 8's
  directory holding ``state.step == step8_holds``); returns (ckpt, abstract state, saved state)."""
  cfg = tiny.get_config("pretrain")
  mcfg = model_config(cfg.model)
  tx, _ = optim.make_optimizer(cfg.optimizer, state_lib.abstract_params(mcfg), 10)
  abstract, shard = state_lib.state_shardings(mcfg, tx, mesh)
  ckpt = checkpointing.Checkpointer(str(directory), common.checkpoint_config(max_to_keep=5))
  with jax.set_mesh(mesh):
    state = state_lib.init_state(mcfg, tx, shard, 0)
    ckpt.save(4, state.replace(step=jnp.int32(4)), {"step": 4}, {"step": 4})
    ckpt.save(8, state.replace(step=jnp.int32(step8_holds)), {"step": 8}, {"step": 8})
    ckpt.wait()
  return ckpt, abstract, state


@pytest.mark.parametrize("damage", ["array_data", "commit_marker", "meta_item"])
def test_checkpoint_falls_back_past_an_incomplete_step(tmp_path, caplog, damage):
  """A newest step with files missing (array data, Orbax's commit marker, a whole item) is
  provably incomplete: skipped with a warning naming it and why, the previous step restored."""
  mesh = make_mesh("fsdp=8")
  ckpt, abstract, state = _two_checkpoints(tmp_path / "ck", mesh)
  step8 = tmp_path / "ck" / "8"
  if damage == "array_data":
    for sub in ("d", "ocdbt.process_0"):
      shutil.rmtree(step8 / "state" / sub)
  elif damage == "commit_marker":
    (step8 / "state" / checkpointing.COMMIT_MARKER).unlink()
  else:
    shutil.rmtree(step8 / "meta")
  assert ckpt.incomplete_reason(4) is None and ckpt.incomplete_reason(8) is not None
  with jax.set_mesh(mesh), caplog.at_level("WARNING", logger="mmada_jax.train.checkpointing"):
    step, restored, data, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 4 and data == {"step": 4}
  want = {"array_data": "ocdbt.process_", "commit_marker": "commit marker", "meta_item": "['meta']"}[damage]
  assert "checkpoint step 8" in caplog.text and "incomplete" in caplog.text and want in caplog.text, caplog.text
  np.testing.assert_array_equal(np.asarray(restored.params["wte"]), np.asarray(state.params["wte"]))


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # TensorStore's failed reads
def test_checkpoint_that_is_complete_but_unreadable_raises_naming_the_step(tmp_path, caplog):
  """Corrupt array bytes, a shape mismatch, a wrong step inside: an error naming step 8 and the
  cause, never a silent rewind to step 4."""
  mesh = make_mesh("fsdp=8")
  ckpt, abstract, _ = _two_checkpoints(tmp_path / "ck", mesh)
  other = tiny.get_config("pretrain")
  other.model.d_model = 32
  mcfg = model_config(other.model)
  small, _ = state_lib.state_shardings(mcfg, optim.make_optimizer(other.optimizer, state_lib.abstract_params(mcfg),
                                                                  10)[0], mesh)
  with jax.set_mesh(mesh):
    with pytest.raises(checkpointing.RestoreError, match=r"checkpoint step 8 in .* cannot be restored .*shape"):
      ckpt.restore_latest(small)
    data_files = list((tmp_path / "ck" / "8" / "state").glob("ocdbt.process_*/d/*"))
    assert data_files
    for f in data_files:
      f.write_bytes(b"not an ocdbt data file" * 8)
    assert ckpt.incomplete_reason(8) is None
    with pytest.raises(checkpointing.RestoreError, match=r"checkpoint step 8 in .* cannot be restored"):
      ckpt.restore_latest(abstract)
  ckpt.close()
  gc.collect()   # Orbax's abandoned TensorStore reads end here, inside the test's warning filter
  assert "trying the previous one" not in caplog.text
  ckpt, abstract, _ = _two_checkpoints(tmp_path / "ck2", mesh, step8_holds=5)
  with jax.set_mesh(mesh), pytest.raises(checkpointing.RestoreError, match="step 8 .* holds state.step=5"):
    ckpt.restore_latest(abstract)
  ckpt.close()


def test_only_incomplete_checkpoints_is_an_error(tmp_path):
  mesh = make_mesh("fsdp=8")
  ckpt, abstract, _ = _two_checkpoints(tmp_path / "ck", mesh)
  for step in (4, 8):
    (tmp_path / "ck" / str(step) / checkpointing.COMMIT_MARKER).unlink()
  with jax.set_mesh(mesh), pytest.raises(checkpointing.RestoreError, match=r"every step is incomplete:\n  step 8: .*\n  step 4"):
    ckpt.restore_latest(abstract)
  ckpt.close()


def test_preemption_sync_decided_once_at_start_up(monkeypatch):
  """Multi-process: an unavailable preemption sync point is said once at start-up and never
  called; an available one is called every step and its errors propagate."""
  from jax.experimental import multihost_utils
  from mmada_jax.train import trainer
  calls = []

  def sync_point(step):
    calls.append(step)
    raise RuntimeError("sync point broke")

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  said = []
  monkeypatch.setattr(trainer, "preemption_sync_unavailable", lambda: "the jax_enable_preemption_service option is off")
  p = trainer._Preemption(said.append)
  assert len(said) == 1 and said[0].startswith("preemption handling is off: the jax_enable_preemption_service")
  assert not p.reached(0) and not p.reached(1) and calls == [] and len(said) == 1
  monkeypatch.setattr(trainer, "preemption_sync_unavailable", lambda: None)
  p = trainer._Preemption(said.append)
  assert len(said) == 1
  with pytest.raises(RuntimeError, match="sync point broke"):
    p.reached(3)
  assert calls == [3]
  monkeypatch.undo()
  assert trainer.preemption_sync_unavailable() is not None   # single process: no sync manager


def test_init_from_original_checkpoint(tiny_mmada_dir):
  from mmada_jax.checkpoint import hf_mmada
  want, hf_cfg = hf_mmada.load_hf_checkpoint(str(tiny_mmada_dir))
  cfg = tiny.get_config("pretrain")
  mesh = make_mesh("fsdp=4,tensor=2")
  arch = {k: getattr(hf_cfg, k) for k in checkpointing.ARCH_FIELDS}
  mcfg = model_config(common.model_config(**arch))
  abstract, _ = state_lib.state_shardings(mcfg, optim.make_optimizer(cfg.optimizer, state_lib.abstract_params(mcfg), 10)[0], mesh)
  got = checkpointing.load_init_params(str(tiny_mmada_dir), mcfg, abstract.params, mesh)
  assert got["lm_head"].sharding.spec == P("fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="d_model: checkpoint 32 vs config 64"):
    checkpointing.load_init_params(str(tiny_mmada_dir), model_config(cfg.model), None, mesh)


def test_grpo_variant_parses_and_unknown_stages_fail_clearly():
  cfg = tiny.get_config("grpo")
  assert cfg.stage.name == "unigrpo" and "module" not in cfg.stage and cfg.rl.group_size == 4
  assert {"pretrain", "sft", "unigrpo", "grpo"} <= set(stages.STAGES)     # the registry's own stages
  cfg.stage.name = "no_such_stage"
  with pytest.raises(ValueError, match="training stage 'no_such_stage' is not registered; registered stages: "):
    stages.get_stage(cfg, model_config(cfg.model))


def test_stage_batch_specs_and_the_first_batch_check():
  """Each stage declares its global batch; a host batch that differs fails naming the leaf."""
  cfg = tiny.get_config("pretrain")
  mcfg = model_config(cfg.model)
  stage = stages.get_stage(cfg, mcfg)
  spec = stage.batch_spec()
  length = cfg.data.max_text_len + cfg.data.num_image_tokens + 3
  assert {t: {k: (v.shape, v.dtype) for k, v in d.items()} for t, d in spec.items()} == {
      t: {k: ((cfg.data[t].batch_size, length), np.int32) for k in keys}
      for t, keys in (("t2i", ("input_ids", "attention_mask")), ("lm", ("input_ids", "prompt_mask")),
                      ("mmu", ("input_ids", "prompt_mask")))}
  assert stage.sequences(spec) == (48, length) and stage.logit_shape is None
  host = next(make_toy_iterator(cfg.data, cfg.toy, 0, 2, 0))      # process 0 of 2: half the rows
  stages.check_batch(host, spec, 2)
  with pytest.raises(ValueError, match=r"leaf \['lm'\]\['input_ids'\]: got int32 \(8, 39\), .* wants int32 \(16, 39\)"):
    stages.check_batch(host, spec, 1)
  bad = {**host, "lm": {**host["lm"], "prompt_mask": host["lm"]["prompt_mask"].astype(np.int64)}}
  with pytest.raises(ValueError, match=r"leaf \['lm'\]\['prompt_mask'\]: got int64"):
    stages.check_batch(bad, spec, 2)
  with pytest.raises(ValueError, match=r"missing leaves \[\"\['mmu'\]\['input_ids'\]\", \"\['mmu'\]\['prompt_mask'\]\"\]"):
    stages.check_batch({k: v for k, v in host.items() if k != "mmu"}, spec, 2)
  # Abstract stages (AOT): from the config alone; a factory without ``abstract`` cannot.
  grpo = tiny.get_config("grpo")
  abstract = stages.get_stage(grpo, model_config(grpo.model), abstract=True)
  assert "reward/digit_match" not in abstract.batch_spec() and abstract.batch_spec()["targets"].shape == (16, 8)
  with pytest.raises(RuntimeError, match="abstract"):
    abstract.make_batches(0, 1)
  stages.register_stage("plain_test")(lambda config, model_cfg: stage)
  try:
    cfg.stage.name = "plain_test"
    with pytest.raises(ValueError, match="takes no 'abstract' argument"):
      stages.get_stage(cfg, mcfg, abstract=True)
  finally:
    del stages.STAGES["plain_test"]


def test_8b_stage_configs():
  """The original's stage table, and the 8B state's shardings (abstract: nothing allocated)."""
  from mmada_jax.configs import mmada_8b
  want = {"stage1_1": (387, (7, 2, 6), 2, 1e-4, 500_000, (1.0, 0.1, 1.0), ""),
          "stage1_2": (515, (7, 2, 3), 2, 5e-5, 1_000_000, (1.0, 0.1, 0.5), "stage1_1"),
          "stage1_3": (1539, (4, 1, 1), 4, 5e-5, 1_000_000, (1.0, 0.4, 0.5), "stage1_2"),
          "stage2_1": (1539, (1, 2, 1), 4, 5e-5, 1_000_000, (1.0, 0.5, 0.5), "stage1_3"),
          "stage2_2": (1539, (1, 2, 1), 4, 5e-5, 1_000_000, (0.05, 0.6, 0.4), "stage2_1/checkpoints/210000")}
  for variant, (length, per_dev, acc, lr, steps, coeffs, prev) in want.items():
    c = mmada_8b.get_config(f"{variant},root=/r,devices=64")
    assert c.data.max_text_len + c.data.num_image_tokens + 3 == length
    assert tuple(c.data[t].batch_size for t in ("t2i", "lm", "mmu")) == tuple(b * 64 * acc for b in per_dev)
    assert (c.optimizer.grad_accum, c.optimizer.lr, c.optimizer.warmup_steps, c.steps) == (acc, lr, 5000, steps)
    assert (c.stage.coeff_t2i, c.stage.coeff_lm, c.stage.coeff_mmu) == coeffs
    assert c.optimizer.weight_decay == 0.01 and c.optimizer.weight_decay_mask == "all"
    assert not c.optimizer.honour_min_lr_scale and c.optimizer.clip_grad_norm == 1.0
    if prev:
      assert c.init_from == f"/r/{prev}"
  mcfg = model_config(mmada_8b.get_config("stage1_3").model)
  assert abs(mcfg.num_params() - 8.08e9) < 0.01e9
  assert (mcfg.param_dtype, mcfg.dtype) == ("float32", "bfloat16")
  c = mmada_8b.get_config("stage1_3")
  tx, _ = optim.make_optimizer(c.optimizer, state_lib.abstract_params(mcfg), c.steps)
  abstract, shard = state_lib.state_shardings(mcfg, tx, make_mesh("fsdp=4,tensor=2"))
  assert shard.params["wte"].spec == P("tensor", "fsdp")
  assert abstract.params["blocks"]["ff_out"].shape == (32, 12288, 4096)
  from mmada_jax.configs import mmada_1b   # the ~1B benchmark model: the 8B recipes, a smaller transformer
  c1 = mmada_1b.get_config("stage1_3,devices=8")
  assert abs(model_config(c1.model).num_params() - 1.09e9) < 0.01e9 and c1.init_from == ""
  assert c1.data.t2i.batch_size == c.data.t2i.batch_size // 8


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_stage_hooks_pre_step_and_frozen_params(tmp_path):
  """A stage defined outside the trainer (as UniGRPO will be) plugs in through the registry: its
  host-side pre_step runs before every step with the live state, and its frozen params (a
  reference policy) reach the loss without being trained."""
  import dataclasses
  from mmada_jax.train import trainer
  calls = []

  def factory(config, mcfg):
    base = stages.STAGES["pretrain"](config, mcfg)

    def pre_step(ctx, batch):
      calls.append((ctx.step, int(ctx.state.step)))
      return batch

    def loss_fn(params, batch, rng, frozen):
      loss, metrics = base.loss_fn(params, batch, rng, None)
      drift = sum(jnp.sum(jnp.square(p - f)) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)))
      return loss + 0.0 * drift, {**metrics, "drift": drift}

    return dataclasses.replace(base, name="hooked", loss_fn=loss_fn, pre_step=pre_step,
                               init_frozen=lambda params: jax.tree.map(jnp.copy, params))

  stages.register_stage("hooked_test")(factory)
  try:
    cfg = tiny.get_config("pretrain")
    cfg.stage.name = "hooked_test"
    cfg.steps, cfg.checkpoint_every, cfg.progress_bar, cfg.tensorboard = 3, 0, False, False
    assert trainer.run(cfg, str(tmp_path / "hooked")) == 0
  finally:
    del stages.STAGES["hooked_test"]
  assert calls == [(0, 0), (1, 1), (2, 2)]
  m = _metrics(tmp_path / "hooked")
  # lr(0) = 0 (warm-up from 0), so the first update leaves the params unchanged.
  assert m[1]["drift"] == m[2]["drift"] == 0.0 < m[3]["drift"]

"""Unified UniGRPO: the task mixture, one loss over mixed batches, on-device rewards, exact resume."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax.rl import rewards as rw
from mmada_jax.rl.config import GRPOConfig, TaskConfig
from mmada_jax.rl.loss import LossConfig, grpo_rows, reduce_rows
from mmada_jax.rl.prompts import PromptIterator, list_source, mixture_counts, mixture_source, toy_digit_records
from test_rl import TOY_CFG, TOY_SP, _toy_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

T2I_RECORDS = [{"prompt_ids": [3, 4], "prompt": "three four", "label": 0},
               {"prompt_ids": [5], "prompt": "five", "label": 1}]


def _decoder(codes):
  return jnp.repeat((jnp.asarray(codes)[:, :, None, None] * 30).astype(jnp.uint8), 3, -1)   # [B, N, 1, 3]


def _classifier(im):
  m = im.mean((1, 2, 3)) / 255
  return np.stack([m, 1 - m], 1)


def _mixed_cfg(**kw):
  tasks = (TaskConfig(name="copy", weight=2.0, task="text", max_prompt_len=2, gen_length=4, block_length=4,
                      gen_steps=4, temperature=1.0),
           TaskConfig(name="draw", weight=1.0, task="t2i", max_text_len=4, t2i_steps=3, t2i_guidance_scale=1.0))
  base = dict(group_size=2, prompts_per_step=3, inner_updates=2, kl_beta=0.04, tasks=tasks)
  base.update(kw)
  return GRPOConfig(**base)


def _mixed_stage(cfg=None):
  from mmada_jax.rl.stage import GRPOStage
  cfg = cfg or _mixed_cfg()
  counts = mixture_counts([t.weight for t in cfg.tasks], cfg.prompts_per_step)
  sources = {"copy": list_source(toy_digit_records(TOY_SP, 10), counts[0], 0),
             "draw": list_source(T2I_RECORDS, counts[1], 1)}
  rewards = {"copy": [rw.toy_digit_reward()], "draw": [rw.ClassifierReward(_classifier)]}
  return GRPOStage.mixture(TOY_CFG, cfg, sources, rewards, specials=TOY_SP, image_decoders={"draw": _decoder})


# ------------------------------------------------------------------ the mixture

def test_task_share_follows_weight():
  assert mixture_counts([2, 1, 1], 8) == [4, 2, 2]
  assert mixture_counts([1, 1, 1], 4) == [2, 1, 1]              # largest remainder, ties to the earlier task
  assert mixture_counts([0.5, 0.3, 0.2], 10) == [5, 3, 2]
  with pytest.raises(ValueError, match="no prompt"):
    mixture_counts([10, 1], 4)
  with pytest.raises(ValueError, match="positive"):
    mixture_counts([1, 0], 4)
  counts = mixture_counts([3, 1], 8)
  src = mixture_source({"a": list_source([{"id": i} for i in range(5)], counts[0], 0),
                        "b": list_source([{"id": i} for i in range(7)], counts[1], 1)})
  it = PromptIterator(src, inner_updates=2, process_index=1, process_count=2)
  seen = {"a": 0, "b": 0}
  for _ in range(20):
    b = next(it)
    for k, v in b["records"].items():
      seen[k] += len(v)
  assert seen == {"a": 60, "b": 20}                             # 3 : 1 on every process, every step
  again = PromptIterator(src, inner_updates=2, process_index=1, process_count=2)
  again.set_state(json.loads(json.dumps(it.get_state())))
  assert next(again) == next(it)                                # the mixture resumes exactly


def test_task_config_resolution_and_errors():
  cfg = _mixed_cfg()
  (n1, w1, c1), (n2, w2, c2) = cfg.task_list()
  assert (n1, w1, c1.task, c1.gen_length, c1.group_size) == ("copy", 2.0, "text", 4, 2)
  assert (n2, c2.task, c2.max_text_len, c2.kl_beta) == ("draw", "t2i", 4, 0.04) and not c2.tasks
  assert GRPOConfig().task_list()[0][0] == "text"                # the flat keys are the one task
  from mmada_jax.config_schema import to_config_dict
  assert GRPOConfig.from_config(to_config_dict(cfg)) == cfg     # rl.tasks round-trips through a ConfigDict
  with pytest.raises(ValueError, match="unique"):
    _mixed_cfg(tasks=(TaskConfig(name="a"), TaskConfig(name="a")))
  with pytest.raises(ValueError, match=r"rl.tasks\['d'\].*max_text_len"):
    _mixed_cfg(tasks=(TaskConfig(name="d", task="t2i"),))
  with pytest.raises(ValueError, match="weight"):
    TaskConfig(name="x", weight=0.0)


# ------------------------------------------------------------------ one loss over the mixed batch

@pytest.mark.slow   # compiles both tasks' samplers, π_old/π_ref passes and the mixed loss
def test_mixed_batch_and_loss():
  from mmada_jax.train.stages import check_batch
  stage = _mixed_stage()
  params = _toy_params(0)
  frozen = stage.init_frozen(params)
  host = next(stage.make_batches(0, 1))
  assert {k: len(v) for k, v in host["records"].items()} == {"copy": 2, "draw": 1}
  stepped = stage.batch_for(params, frozen, host, micro=1)
  check_batch(stepped, stage.batch_spec(), 1)
  assert set(stepped) == {"copy", "draw"} and stepped["copy"]["input_ids"].shape == (1, 4, 6)
  assert stepped["draw"]["targets"].shape == (1, 2, 4)
  batch = jax.tree.map(lambda x: x[0], stepped)
  assert set(stage.metrics()) >= {"time/rollout", "time/reward", "time/old_ref", "time/update",
                                  "time/rollout/copy", "time/rollout/draw"}
  loss, m = jax.jit(stage.loss_fn)(params, batch, jax.random.key(0), frozen)
  for k in ("reward_mean/copy", "reward_mean/draw", "kl/copy", "clip_frac/draw", "response_length/copy",
            "reward/copy/digit_match", "reward/draw/classifier", "entropy/draw"):
    assert k in m, k
  # by hand: per-row terms of each task (its own vocabulary), then one mean over all rows
  from mmada_jax.rl.loss import response_logprobs
  cfg = LossConfig(epsilon=0.2, beta=0.04)
  rows = []
  for name, vr in (("copy", None), ("draw", (16, 24))):
    b = batch[name]
    lp, _ = response_logprobs(params, TOY_CFG, b["input_ids"], b["response_start"], b["targets"],
                              attention_mask=b["attention_mask"], vocab_range=vr)
    rows.append(grpo_rows(lp, b["old_logp"], b["ref_logp"], b["advantages"], b["loss_mask"], cfg))
  obj = np.concatenate([np.asarray(r["objective"]) for r in rows])
  np.testing.assert_allclose(float(loss), -obj.mean(), rtol=1e-5, atol=1e-7)
  reward = np.concatenate([np.asarray(batch[t]["reward"]) for t in ("copy", "draw")])
  assert float(m["reward_mean"]) == pytest.approx(reward.mean(), abs=1e-6)
  assert float(m["reward_mean/draw"]) == pytest.approx(float(np.mean(batch["draw"]["reward"])), abs=1e-6)


def test_single_task_rows_reduce_like_the_objective():
  from mmada_jax.rl.loss import grpo_objective
  rng = np.random.default_rng(0)
  lp, old, ref = (jnp.asarray(rng.normal(-1, 0.3, (3, 5)), jnp.float32) for _ in range(3))
  adv, mask = jnp.asarray([1.0, -0.5, 0.2]), jnp.asarray(rng.random((3, 5)) > 0.4)
  cfg = LossConfig(epsilon=0.2, beta=0.04)
  a = grpo_objective(lp, old, ref, adv, mask, cfg, jnp.asarray([1.0, 0.0, 1.0]))
  b = reduce_rows(grpo_rows(lp, old, ref, adv, mask, cfg), jnp.asarray([1.0, 0.0, 1.0]))
  assert float(a[0]) == float(b[0]) and all(float(a[1][k]) == float(b[1][k]) for k in a[1])


# ------------------------------------------------------------------ exact resume in mid-cycle

@pytest.mark.slow   # compiles both tasks' samplers and π_old/π_ref passes
def test_mid_cycle_resume_gives_the_same_batches():
  """A checkpoint after inner step 0 (iterator state, JSON) restores the rollout that the updated
  params cannot recompute: inner step 1's batch is identical to the uninterrupted one."""
  stage = _mixed_stage()
  params = _toy_params(0)
  frozen = stage.init_frozen(params)
  it = stage.make_batches(0, 1)
  stage.batch_for(params, frozen, next(it), micro=1)
  state = json.loads(json.dumps(it.get_state()))              # what the trainer saves
  assert "cycle" in state
  want = stage.batch_for(params, frozen, next(it), micro=1)
  moved = jax.tree.map(lambda x: x + 0.01, params)             # the params after the first update
  fresh = _mixed_stage()
  it2 = fresh.make_batches(0, 1)
  it2.set_state(state)
  got = fresh.batch_for(moved, fresh.init_frozen(params), next(it2), micro=1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
  records = next(_mixed_stage().make_batches(0, 1))["records"]
  redo = _mixed_stage().batch_for(moved, frozen, {"index": 0, "inner": 1, "records": records}, micro=1)
  assert not np.array_equal(np.asarray(redo["copy"]["old_logp"]), np.asarray(want["copy"]["old_logp"]))


# ------------------------------------------------------------------ image rewards on the devices

def test_clip_and_preference_rewards_on_device(tmp_path):
  from test_eval_clip import P, write_clip
  from mmada_jax.scorers.clip import CLIP
  from mmada_jax.scorers.preference import PreferenceScorer, save_preference_head
  write_clip(tmp_path / "clip")
  rng = np.random.default_rng(0)
  save_preference_head(tmp_path / "head.safetensors", [(rng.normal(0, 0.5, (3 * P, 8)), np.zeros(8)),
                                                       (rng.normal(0, 0.5, (8, 1)), np.zeros(1))], mean=0.1, std=2.0)
  cfg = GRPOConfig(clip_model=str(tmp_path / "clip"), preference_head=str(tmp_path / "head.safetensors"))
  assert rw.default_reward_spec("t2i", "jsonl", cfg) == "clip,image_reward"
  rewards = rw.resolve_rewards("clip,image_reward", cfg)
  assert [(r.name, r.weight, r.on_device) for r in rewards] == [("clip", 0.1, True), ("image_reward", 0.1, True)]
  images = rng.integers(0, 255, (4, 40, 40, 3), dtype=np.uint8)
  prompts = ["a red cat", "a blue dog", "a red cat", "the mat"]
  inputs = rw.RewardInputs(prompts=prompts, device_images=jnp.asarray(images), place=jnp.asarray,
                           completion_ids=[np.zeros(1)] * 4)
  total, raw = rw.combine_rewards(rewards, inputs)
  host_clip = CLIP.from_pretrained(tmp_path / "clip").score(images, prompts)
  np.testing.assert_allclose(raw["clip"], host_clip, atol=1.0)           # device resize vs PIL: ~1e-2 per pixel
  head = PreferenceScorer.from_files(tmp_path / "clip", tmp_path / "head.safetensors")
  np.testing.assert_allclose(raw["image_reward"], head.score(images, prompts), atol=0.05)
  np.testing.assert_allclose(total, 0.1 * raw["clip"] + 0.1 * raw["image_reward"], rtol=1e-6)
  assert raw["clip"][0] == pytest.approx(raw["clip"][2], abs=1e-4) or not np.array_equal(images[0], images[2])
  save_preference_head(tmp_path / "bad.safetensors", [(np.zeros((5, 1)), np.zeros(1))])
  with pytest.raises(ValueError, match="expected weight"):
    PreferenceScorer.from_files(tmp_path / "clip", tmp_path / "bad.safetensors")
  with pytest.raises(ValueError, match="rl.preference_head"):
    rw.resolve_rewards("image_reward", GRPOConfig(clip_model=str(tmp_path / "clip")))


# ------------------------------------------------------------------ through the trainer (slow)

MIX_CONFIG = '''"""configs/tiny.py:grpo as a unified stage: two toy-digit tasks with their own samplers."""
from mmada_jax.configs import tiny

VARIANTS = ("mix",)


def get_config(arg=None):
  c = tiny.get_config("grpo")
  c.rl.inner_updates = 2
  c.rl.prompts_per_step = 4
  c.rl.tasks = (dict(name="short", weight=1.0, gen_length=4, block_length=4, gen_steps=4),
                dict(name="long", weight=1.0, gen_length=8, block_length=4, gen_steps=8, temperature=1.0))
  return c
'''
COMPARED = ("loss", "grad_norm", "kl", "ratio_mean", "reward_mean/short", "reward_mean/long", "clip_frac/long")


def _mix_launch(cache, config, workdir, n_proc, steps, log_dir):
  from test_train_multiprocess import _env, _port
  port = _port()
  procs = []
  for i in range(n_proc):
    cmd = [sys.executable, "-m", "mmada_jax.train", f"--config={config}:mix", f"--workdir={workdir}",
           f"--config.steps={steps}", "--config.checkpoint_every=0", "--config.log_every=1",
           "--config.progress_bar=False", "--config.tensorboard=False", "--config.mesh_shape=data=4,fsdp=2",
           "--config.optimizer.schedule_steps=4",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           f"--config.distributed.num_processes={n_proc}", f"--config.distributed.process_id={i}"]
    log = open(log_dir / f"p{i}_{steps}_{os.getpid()}_{len(procs)}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(cache, 8 // n_proc), stdout=log, stderr=subprocess.STDOUT))
  return procs


@pytest.mark.slow   # four trainer runs in subprocesses (2 processes × 4 CPU devices, 1 × 8)
def test_unified_two_processes_and_mid_cycle_restart(tmp_path):
  """The unified stage (two tasks) over 4 steps (2 rollout cycles): 2 processes give the same
  metrics as 1 process; a run stopped after step 3 (mid-cycle) and resumed ends where the
  uninterrupted run does (step-4 metrics and final parameters identical)."""
  from test_train_multiprocess import _logs, _metrics, _wait
  config = tmp_path / "mix.py"
  config.write_text(MIX_CONFIG)
  cache, logs = tmp_path / "cache", tmp_path / "logs"
  logs.mkdir()
  runs = {}
  for name, n, steps in (("two", 2, 4), ("one", 1, 4), ("cut", 1, 3), ("cut", 1, 4)):
    assert _wait(_mix_launch(cache, config, tmp_path / name, n, steps, logs), 900) == [0] * n, _logs(logs)
    runs[name] = _metrics(tmp_path / name)
  two, one, cut = runs["two"], runs["one"], runs["cut"]
  assert sorted(one) == sorted(two) == [1, 2, 3, 4] and 4 in cut
  for s in one:
    for k in COMPARED:
      assert two[s][k] == one[s][k], f"2 vs 1 process, step {s} {k}: {two[s][k]!r} != {one[s][k]!r}"
  for k in COMPARED:
    assert cut[4][k] == one[4][k], f"resumed step 4 {k}: {cut[4][k]!r} != {one[4][k]!r}"
  assert one[3]["time/rollout"] > 0 and one[4]["time/rollout"] == 0 and one[4]["time/update"] > 0
  data = json.loads((tmp_path / "cut" / "checkpoints" / "3" / "data" / "process_0-of-1.json").read_text())
  assert data["calls"] == 3 and set(data["cycle"]["tasks"]) == {"short", "long"}
  a, b = (_final_params(tmp_path / name) for name in ("one", "cut"))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def _final_params(workdir: pathlib.Path):
  from mmada_jax.configs import tiny
  from mmada_jax.train import checkpointing
  from mmada_jax.train.state import abstract_params
  from mmada_jax.train.trainer import model_config
  cfg = model_config(tiny.get_config("grpo").model)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_params(cfg))
  return jax.tree.map(np.asarray, checkpointing.load_init_params(str(workdir), cfg, abstract, None))

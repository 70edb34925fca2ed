"""The UniGRPO stage object (spec §8): rollouts → rewards → advantages → μ masked updates.

:class:`GRPOStage` has the trainer's stage hooks as attributes (``loss_fn``, ``make_batches``,
``batch_spec``, ``sequences``, ``pre_step``, ``init_frozen``, ``logit_shape``); the trainer wraps
it (``mmada_jax.train.stages.unigrpo``), and own loops or tests can drive it directly
(:meth:`GRPOStage.batch_for`). Nothing here imports the trainer.

One stage runs one task (``rl.task``, the flat batch of :func:`mmada_jax.rl.update.batch_spec`)
or a mixture of tasks (``rl.tasks``, :meth:`GRPOStage.mixture`; the batch is ``{task: that task's
batch}`` and the loss :func:`mmada_jax.rl.update.mixed_loss_fn`). Each task has its own prompt
source, share of the step's prompts (:func:`mmada_jax.rl.prompts.mixture_counts`), compiled
sampler, rewards and group advantages. One rollout cycle serves μ = ``inner_updates`` optimizer
steps:

1. ``pre_step`` on the first step of a cycle, with the current params (= π_old), for each task:
   G rollouts per prompt (:mod:`mmada_jax.rl.rollout`, tokens stay on the devices), the image
   decoder for T2I (on the devices), rewards (host rewards see this process's rows of the
   response tokens / images; ``on_device`` rewards such as CLIP run on the batch-sharded
   images), group-normalised advantages, optionally the accuracy filter; the μ structured
   maskings and log π_old / log π_ref (:func:`mmada_jax.rl.update.prepare_updates`, on the
   devices). Each step of the cycle then returns the batch of its inner iteration n, device
   arrays in the train step's layout (:func:`mmada_jax.rl.update.step_layout`): no μ×B×L
   tensor crosses to the host.
2. ``loss_fn`` (jitted by the trainer).

Step metrics (host, :meth:`GRPOStage.metrics`, merged into the step's row by the trainer):
``time/rollout`` (sampling and image decoding), ``time/reward`` (responses to the host, decoding,
rewards, advantages), ``time/old_ref`` (the π_old / π_ref pass) — non-zero on the first step of
a cycle — and ``time/update``: the previous optimizer step's seconds (from the end of its
``pre_step`` until its parameters were ready); per task ``time/rollout/<task>``.

The prompt iterator yields every prompt batch μ times, tagged ``(index, inner)``; a batch whose
index differs from the cached rollout starts a new cycle. Resume: a checkpoint taken in mid-cycle
stores this process's part of the cycle that the restored params cannot recompute (the rollout
tokens, rewards, advantages and log π_old, :meth:`GRPOStage.cycle_state`, in the iterator's
state); on restore the maskings and log π_ref are recomputed from their deterministic keys, so the
run continues exactly as without the restart.

Sharding: rollouts and the log-prob pass run on global arrays (``sharding.transfer``), rows
sharded by the run's logical ``batch`` rule (rows per process must divide by those shards) with
the policy's own parameter shardings; the reference params are a copy of the initial policy
made by ``init_frozen`` with the same shardings. Host work (decoding, host rewards) sees only the
process's own rows; groups never straddle processes.
"""
from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl import advantages as adv_lib
from mmada_jax.rl import masking as mask_lib
from mmada_jax.rl import rewards as rew_lib
from mmada_jax.rl import update
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.rl.loss import check_targets
from mmada_jax.rl.prompts import PromptIterator, Record, mixture_counts, mixture_source
from mmada_jax.rl.rollout import global_std, sample_image_groups, sample_text_groups, sharding_for
from mmada_jax.sharding import to_global, to_host

SAVED = ("tokens", "attention_mask", "advantages", "seq_weight", "reward", "reward_std", "response_length",
         "old_logp")
"""A task's per-process cycle arrays saved with a mid-cycle checkpoint (plus ``reward/<name>``)."""


@dataclasses.dataclass
class _Task:
  """One task of the stage: its resolved settings, rewards and shapes."""
  name: str
  weight: float
  cfg: GRPOConfig
  rewards: list
  tokenizer: Any
  image_decoder: Callable[[Any], Any] | None
  vocab_range: tuple[int, int] | None
  length: int
  response: int
  stop_ids: tuple[int, ...]
  tail: str
  filter_name: str = ""


@dataclasses.dataclass
class _Cycle:
  index: int
  batches: list[Any]
  saved: dict[str, dict[str, np.ndarray]] | None = None   # host copies, made when a checkpoint asks


class GRPOStage:
  """UniGRPO with the trainer's stage hooks (module docstring); one task.

  Args:
    model_cfg: the policy's config. cfg: :class:`mmada_jax.rl.config.GRPOConfig`.
    source: ``batch_index -> list of records`` over all processes
      (:func:`mmada_jax.rl.prompts.list_source`).
    rewards: the rewards to combine (:mod:`mmada_jax.rl.rewards`).
    specials: special-token ids (pad, stops, image offset, t2i/mmu layout tokens).
    tokenizer: decodes completions for text rewards (``decode(ids, skip_special_tokens=True)``);
      None = rewards see only ``completion_ids``.
    image_decoder: T2I: ``codes int [B, N] (global) -> uint8 [B, H, W, 3]`` on the devices
      (:func:`mmada_jax.rl.rollout.magvit_decoder`); a numpy result is accepted in one process.
  """

  def __init__(self, model_cfg: MMaDAConfig, cfg: GRPOConfig, source: Callable[[int], Sequence[Record]],
               rewards: Sequence[rew_lib.RewardFn], *, specials: SpecialTokens = SpecialTokens(),
               tokenizer: Any = None, image_decoder: Callable[[Any], Any] | None = None):
    if cfg.tasks:
      raise ValueError("config.rl has rl.tasks: build the stage with GRPOStage.mixture")
    self._setup(model_cfg, cfg, specials, {cfg.task: list(rewards)}, {cfg.task: tokenizer},
                {cfg.task: image_decoder})
    self.single = True
    self.source = source

  @classmethod
  def mixture(cls, model_cfg: MMaDAConfig, cfg: GRPOConfig, sources: Mapping[str, Callable[[int], Sequence[Record]]],
              rewards: Mapping[str, Sequence[rew_lib.RewardFn]], *, specials: SpecialTokens = SpecialTokens(),
              tokenizers: Mapping[str, Any] | None = None,
              image_decoders: Mapping[str, Callable[[Any], Any]] | None = None) -> "GRPOStage":
    """The unified stage over ``cfg.tasks`` (:meth:`GRPOConfig.task_list`): ``sources[name]``
    gives that task's global records of a batch index (``list_source`` built with the task's
    :meth:`prompt_counts` share); ``rewards[name]`` its rewards; ``tokenizers`` /
    ``image_decoders`` per task where needed."""
    if not cfg.tasks:
      raise ValueError("GRPOStage.mixture needs rl.tasks")
    self = cls.__new__(cls)
    self._setup(model_cfg, cfg, specials, {k: list(v) for k, v in rewards.items()}, dict(tokenizers or {}),
                dict(image_decoders or {}))
    self.single = False
    missing = [t.name for t in self.tasks if t.name not in sources]
    if missing:
      raise ValueError(f"GRPOStage.mixture: no prompt source for tasks {missing}")
    self.source = mixture_source({t.name: sources[t.name] for t in self.tasks})
    return self

  @classmethod
  def abstract(cls, model_cfg: MMaDAConfig, cfg: GRPOConfig,
               specials: SpecialTokens = SpecialTokens()) -> "GRPOStage":
    """Shapes only (AOT): ``loss_fn``, ``batch_spec`` (without the ``reward/<name>`` leaves:
    no reward is built), ``init_frozen``; ``make_batches`` / ``pre_step`` raise."""
    self = cls.__new__(cls)
    self._setup(model_cfg, cfg, specials, None, {}, {})
    self.single = not cfg.tasks
    self.source = None
    return self

  def _setup(self, model_cfg: MMaDAConfig, cfg: GRPOConfig, specials: SpecialTokens,
             rewards: Mapping[str, list] | None, tokenizers: Mapping[str, Any],
             decoders: Mapping[str, Any]) -> None:
    self.model_cfg, self.cfg, self.specials = model_cfg, cfg, specials
    self.mask_id = int(model_cfg.mask_token_id)
    self.tasks: list[_Task] = []
    counts = self.prompt_counts()
    for (name, weight, resolved), n in zip(cfg.task_list(), counts):
      tc: GRPOConfig = resolved
      if tc.task != "t2i" and tc.max_prompt_len < 1:
        raise ValueError(f"task {name!r}: text/MMU rollouts need rl.max_prompt_len >= 1 (the compiled prompt width)")
      if tc.task == "t2i":
        off = int(specials.image_offset)
        vr: tuple[int, int] | None = (off, off + int(model_cfg.codebook_size))
        nv = int(model_cfg.num_vq_tokens)
        length, response, stops, tail = int(tc.max_text_len) + nv + 3, nv, (), "train"
      else:
        vr, length, response = None, int(tc.max_prompt_len) + int(tc.gen_length), int(tc.gen_length)
        stops, tail = (int(specials.eos), int(specials.eot_id)), tc.response_tail
      t = _Task(name, weight, dataclasses.replace(tc, prompts_per_step=n), [], tokenizers.get(name),
                decoders.get(name), vr, length, response, stops, tail)
      if rewards is not None:
        t.rewards = list(rewards.get(name, []))
        if not t.rewards:
          raise ValueError(f"task {name!r}: the GRPO stage needs at least one reward")
        if tc.task == "t2i" and t.image_decoder is None:
          raise ValueError(f"task {name!r}: rl.task='t2i' needs an image decoder (set rl.image_tokenizer)")
        t.filter_name = tc.filter_reward or next((r.name for r in t.rewards if "correct" in r.name), "")
        if tc.drop_degenerate_groups and t.filter_name not in {r.name for r in t.rewards}:
          raise ValueError(f"task {name!r}: rl.drop_degenerate_groups needs rl.filter_reward naming one of the "
                           f"rewards {[r.name for r in t.rewards]}")
      self.tasks.append(t)
    self._cycle: _Cycle | None = None
    self._pending_cycle: Mapping[str, Any] | None = None
    self._times: dict[str, float] = {}
    self._sh: Any = None
    self._last_exit: float | None = None
    self.last_rollout: dict[str, Any] = {}
    if self.tasks and len(self.tasks) == 1 and not cfg.tasks:   # the one-task attributes of old
      t = self.tasks[0]
      self.vocab_range, self.length, self.response, self.rewards = t.vocab_range, t.length, t.response, t.rewards
      self.stop_ids = (int(specials.eos), int(specials.eot_id))

  def prompt_counts(self) -> list[int]:
    """Global prompts per step of each task (the weights' share of ``rl.prompts_per_step``)."""
    return mixture_counts([w for _, w, _ in self.cfg.task_list()], self.cfg.prompts_per_step)

  def _need_data(self, what: str) -> None:
    if self.source is None:
      raise RuntimeError(f"GRPOStage.{what}: this stage was built abstract (shapes only): it has no prompts")

  # -- trainer hooks ------------------------------------------------------------------------
  @property
  def logit_shape(self) -> tuple[int, int]:
    """(response positions per row, vocabulary columns) where the loss applies the LM head; for
    a mixture, the row-weighted mean positions and the widest vocabulary."""
    rows = [t.cfg.rollouts_per_step for t in self.tasks]
    cols = [(t.vocab_range or (0, int(self.model_cfg.vocab_size))) for t in self.tasks]
    pos = sum(r * t.response for r, t in zip(rows, self.tasks)) / sum(rows)
    return int(round(pos)), max(hi - lo for lo, hi in cols)

  def _task_spec(self, t: _Task) -> dict[str, jax.ShapeDtypeStruct]:
    return update.batch_spec(t.cfg.rollouts_per_step, t.length, t.response, [r.name for r in t.rewards])

  def batch_spec(self) -> Any:
    """The global batch of one inner step (:func:`mmada_jax.rl.update.batch_spec`): G ×
    prompts rows per task; text / MMU rows of max_prompt_len + gen_length tokens with a
    gen_length response, T2I rows of max_text_len + num_vq_tokens + 3 with the image response.
    One task: that batch; a mixture: ``{task: its batch}``."""
    if self.single:
      return self._task_spec(self.tasks[0])
    return {t.name: self._task_spec(t) for t in self.tasks}

  def make_batches(self, process_index: int, process_count: int) -> PromptIterator:
    self._need_data("make_batches")
    for t in self.tasks:
      if t.cfg.prompts_per_step % process_count:
        raise ValueError(f"task {t.name!r}: {t.cfg.prompts_per_step} prompts per step (of rl.prompts_per_step="
                         f"{self.cfg.prompts_per_step}) are not divisible by the {process_count} processes")
    return PromptIterator(self.source, self.cfg.inner_updates, process_index, process_count, stage=self)

  def init_frozen(self, params: Any) -> Any:
    """``{"ref": copy of params}`` (same shardings) when the objective reads π_ref, else None.
    Abstract params (``ShapeDtypeStruct`` leaves) give the abstract ``{"ref": ...}``."""
    if not self.cfg.loss.needs_ref:
      return None
    shardings = jax.tree.map(lambda x: x.sharding, params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return {"ref": copy.eval_shape(params)}
    return {"ref": copy(params)}

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array, frozen: Any):
    if self.single:
      return update.grpo_loss_fn(params, batch, rng, frozen, model_cfg=self.model_cfg, loss_cfg=self.cfg.loss,
                                 vocab_range=self.tasks[0].vocab_range)
    return update.mixed_loss_fn(params, batch, rng, frozen, model_cfg=self.model_cfg, loss_cfg=self.cfg.loss,
                                vocab_ranges={t.name: t.vocab_range for t in self.tasks})

  def sequences(self, batch: Any) -> tuple[int, int]:
    """(rows, token length) of a batch (host batch or spec); a mixture: all rows, their mean length."""
    parts = [batch] if self.single else [batch[t.name] for t in self.tasks]
    shapes = [np.shape(p["input_ids"]) for p in parts]
    shapes = [s[-2:] for s in shapes]
    rows = sum(int(s[0]) for s in shapes)
    tokens = sum(int(s[0]) * int(s[1]) for s in shapes)
    return rows, int(round(tokens / max(rows, 1)))

  def pre_step(self, ctx: Any, host_batch: Mapping[str, Any]) -> Any:
    """Returns the batch of inner iteration ``host_batch['inner']`` (device arrays in the step
    layout of ``optimizer.grad_accum``), rolling out when needed."""
    mesh = getattr(ctx, "mesh", None)
    frozen = getattr(ctx, "frozen", None)
    micro = int(ctx.config.optimizer.grad_accum) if getattr(ctx, "config", None) is not None else 1
    return self.batch_for(ctx.state.params, frozen, host_batch, mesh, micro=micro)

  def metrics(self) -> dict[str, float]:
    """The last ``pre_step``'s host scalars (module docstring: ``time/*``)."""
    return dict(self._times)

  def batch_for(self, params: Any, frozen: Any, host_batch: Mapping[str, Any],
                mesh: jax.sharding.Mesh | None = None, micro: int | None = None) -> Any:
    """``pre_step`` without a trainer context (own loops, tests). ``micro``: the step layout
    ``[A, rows/A, ...]`` of A micro-batches; None: ``[rows, ...]``. Leaves are device arrays."""
    self._need_data("pre_step")
    jax.block_until_ready(params)   # the previous optimizer step is done: its seconds are time/update
    t_ready = time.perf_counter()
    self._times = {"time/update": 0.0 if self._last_exit is None else t_ready - self._last_exit,
                   "time/rollout": 0.0, "time/reward": 0.0, "time/old_ref": 0.0}
    index, inner = int(host_batch["index"]), int(host_batch["inner"])
    if self._cycle is None or self._cycle.index != index:
      records = host_batch["records"]
      records = {self.tasks[0].name: records} if self.single else records
      pending, self._pending_cycle = self._pending_cycle, None
      if pending is not None and int(pending["index"]) != index:
        pending = None
      self._cycle = self.rollout(params, frozen, records, index, mesh, micro, restored=pending)
    self._last_exit = time.perf_counter()
    return self._cycle.batches[inner]

  # -- rollout cycle ------------------------------------------------------------------------
  def _keys(self, index: int) -> tuple[jax.Array, jax.Array]:
    k = jax.random.fold_in(jax.random.key(self.cfg.seed), index)
    return tuple(jax.random.split(k))

  def rollout(self, params: Any, frozen: Any, records: Mapping[str, Sequence[Record]], index: int,
              mesh: jax.sharding.Mesh | None = None, micro: int | None = None,
              restored: Mapping[str, Any] | None = None) -> _Cycle:
    """One rollout cycle over this process's ``records`` (``{task: records}``): the μ inner
    batches. ``restored``: a mid-cycle checkpoint's :meth:`cycle_state` (rollout not redone)."""
    cfg = self.cfg
    if cfg.loss.needs_ref and frozen is None:
      raise ValueError("kl_reference='ref' with kl_beta > 0 needs the frozen reference (init_frozen)")
    ref = frozen["ref"] if cfg.loss.needs_ref else params
    k_roll, k_mask = self._keys(index)
    sh = sharding_for(mesh)
    self._sh = sh
    shardings = None
    if sh.mesh is not None and micro is not None:
      shardings = tuple(NamedSharding(sh.mesh, sh.spec((None, "batch") + (None,) * k)) for k in range(4))
    per_task: dict[str, list[dict[str, jax.Array]]] = {}
    self.last_rollout = {}
    for i, t in enumerate(self.tasks):
      kr, km = jax.random.fold_in(k_roll, i), jax.random.fold_in(k_mask, i)
      if self.single:   # the one-task keys of old (same rollouts as before the mixture)
        kr, km = k_roll, k_mask
      saved = None if restored is None else _decode_arrays(restored["tasks"][t.name])
      per_task[t.name] = self._task_cycle(t, params, ref, records[t.name], kr, km, sh, saved)
    batches = []
    for n in range(cfg.inner_updates):
      tree = {name: b[n] for name, b in per_task.items()}
      tree = tree[self.tasks[0].name] if self.single else tree
      batches.append(update.step_layout(tree, micro, shardings))
    return _Cycle(index, batches)

  def _task_cycle(self, t: _Task, params: Any, ref: Any, records: Sequence[Record], k_roll: jax.Array,
                  k_mask: jax.Array, sh: Any, saved: dict[str, np.ndarray] | None) -> list[dict[str, jax.Array]]:
    """The μ inner batches of task ``t`` ([rows, ...] global device arrays)."""
    cfg, g, mesh = t.cfg, t.cfg.group_size, sh.mesh
    local = len(records) * g
    t0 = time.perf_counter()
    if saved is None:
      if cfg.task == "t2i":
        tokens, attn, start, codes = sample_image_groups(params, self.model_cfg, cfg, records, k_roll, mesh,
                                                         self.specials)
        images = t.image_decoder(codes)
      else:
        tokens, attn, start = sample_text_groups(params, self.model_cfg, cfg, records, k_roll, mesh, self.specials)
        images = None
      response, trainable, hidden, length, bad = _split(tokens, start, t.response, t.stop_ids, t.tail,
                                                        t.vocab_range or (0, int(self.model_cfg.vocab_size)))
      jax.block_until_ready((response, images))
      t1 = time.perf_counter()
      if int(to_host(bad, sh, names=None)):
        check_targets(to_host(response, sh), t.vocab_range or (0, int(self.model_cfg.vocab_size)),
                      f"task {t.name!r}: rollout response tokens")
      length_h = to_host(length, sh).astype(np.int64)
      total, raw = self._rewards(t, records, response, images, length_h, sh)
      advantages = adv_lib.group_advantages(total, g, cfg.adv_eps)
      weight = np.ones_like(total)
      if cfg.drop_degenerate_groups:
        weight = adv_lib.group_keep_mask(raw[t.filter_name], g, cfg.filter_low, cfg.filter_high)
      std = np.full_like(total, global_std(total))
      t2 = time.perf_counter()
      host = {"attention_mask": attn.astype(np.int32), "advantages": advantages.astype(np.float32),
              "seq_weight": weight.astype(np.float32), "reward": total.astype(np.float32),
              "reward_std": std.astype(np.float32), "response_length": length_h.astype(np.float32)}
      host.update({f"reward/{k}": v.astype(np.float32) for k, v in raw.items()})
      dev = to_global(host, sh)
    else:   # resumed in mid-cycle: the saved rollout, rewards and log π_old of this process's rows
      start = int(saved["response_start"][0])
      host = {k: v for k, v in saved.items() if k in ("attention_mask", "advantages", "seq_weight", "reward",
                                                      "reward_std", "response_length") or k.startswith("reward/")}
      dev = to_global(host, sh)
      tokens, images = to_global(saved["tokens"], sh), None
      response, trainable, hidden, _, _ = _split(tokens, start, t.response, t.stop_ids, t.tail,
                                                 t.vocab_range or (0, int(self.model_cfg.vocab_size)))
      t1 = t2 = time.perf_counter()
    starts = to_global(np.full(local, start, np.int32), sh)
    out = update.prepare_updates(
        params, ref, tokens, dev["attention_mask"], starts, trainable, hidden, k_mask, model_cfg=self.model_cfg,
        mu=cfg.inner_updates, masking=cfg.masking, mask_id=self.mask_id, vocab_range=t.vocab_range,
        need_ref=cfg.loss.needs_ref)
    if saved is not None:
      old = to_global(saved["old_logp"], sh, names=(None, "batch"))     # [μ, rows, R]
      out = dict(out, old_logp=old, ref_logp=out["ref_logp"] if cfg.loss.needs_ref else old)
    jax.block_until_ready(out)
    t3 = time.perf_counter()
    for k, v in (("time/rollout", t1 - t0), ("time/reward", t2 - t1), ("time/old_ref", t3 - t2)):
      self._times[k] = self._times.get(k, 0.0) + v
    self._times[f"time/rollout/{t.name}"] = t1 - t0
    common = dict(dev, response_start=starts, targets=response.astype(jnp.int32))
    self.last_rollout[t.name] = {"tokens": tokens, "trainable": trainable, "hidden": hidden, "images": images,
                                 "old_logp": out["old_logp"], "response_start": start, "response": response,
                                 **host}
    if self.single:
      self.last_rollout.update(self.last_rollout[t.name])
    return [dict(common, input_ids=out["input_ids"][n], loss_mask=out["loss_mask"][n],
                 old_logp=out["old_logp"][n], ref_logp=out["ref_logp"][n], mask_ratio=out["mask_ratio"][n])
            for n in range(cfg.inner_updates)]

  def _rewards(self, t: _Task, records: Sequence[Record], response: jax.Array, images: Any,
               length: np.ndarray, sh: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Task ``t``'s rewards of this process's rows: host rewards on host copies (the response
    tokens [rows, R]; the images only when a host reward may read them), ``on_device`` rewards
    on the global arrays."""
    g = t.cfg.group_size
    host_rewards = [r for r in t.rewards if not getattr(r, "on_device", False)]
    device_rewards = len(host_rewards) < len(t.rewards)
    comp_ids = completions = None
    host_images = device_images = None
    if t.cfg.task == "t2i":
      if isinstance(images, jax.Array):
        device_images = images
        host_images = to_host(images, sh) if host_rewards else None
      else:
        if jax.process_count() > 1:
          raise ValueError(f"task {t.name!r}: with several processes the image decoder must return a jax.Array")
        host_images = np.asarray(images)
        device_images = to_global(host_images, sh) if device_rewards else None
    else:
      resp = to_host(response, sh)
      comp_ids = [resp[i, :length[i]] for i in range(resp.shape[0])]
      if t.tokenizer is not None:
        completions = [t.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in comp_ids]

    def per_row(key):
      return [rec.get(key) for rec in records for _ in range(g)]
    labels = per_row("label")
    inputs = rew_lib.RewardInputs(
        prompts=[str(x) if x is not None else "" for x in per_row("prompt")], completions=completions,
        references=per_row("answer"), choices=per_row("choices"), images=host_images,
        labels=None if any(x is None for x in labels) else np.asarray(labels, np.int64),
        completion_ids=comp_ids, device_images=device_images, place=lambda x: to_global(x, sh))
    return rew_lib.combine_rewards(t.rewards, inputs, to_local=lambda x: to_host(x, sh))

  # -- checkpointed cycle -------------------------------------------------------------------
  def cycle_state(self) -> dict[str, Any] | None:
    """This process's part of the current cycle that the restored params cannot recompute:
    per task the rollout tokens, trainable / hidden masks, rewards, advantages, weights and
    log π_old (base64 arrays, JSON-able), or None without a cycle."""
    if self._cycle is None or not self.last_rollout:
      return None
    tasks = {}
    sh = self._sh
    for t in self.tasks:
      r = self.last_rollout[t.name]
      arrays = {k: r[k] for k in r if (k in SAVED or k.startswith("reward/")) and k != "old_logp"}
      arrays = {k: to_host(v, sh) if isinstance(v, jax.Array) else v for k, v in arrays.items()}
      arrays["old_logp"] = to_host(r["old_logp"], sh, names=(None, "batch"))
      arrays["response_start"] = np.asarray([r["response_start"]], np.int32)
      tasks[t.name] = _encode_arrays(arrays)
    return {"index": self._cycle.index, "tasks": tasks}

  def restore_cycle(self, state: Mapping[str, Any] | None) -> None:
    """Keeps a checkpoint's :meth:`cycle_state` for the next ``pre_step`` of that cycle."""
    self._cycle, self._pending_cycle = None, state


def _split(tokens: jax.Array, start: int, r: int, stops: tuple[int, ...], tail: str,
           vocab_range: tuple[int, int]) -> tuple[jax.Array, ...]:
  """(response [B, R], trainable, hidden [B, R], length [B], count of out-of-vocabulary response
  tokens) on the devices (:func:`mmada_jax.rl.masking.split_response`)."""
  return _split_jit(tokens, int(start), int(r), tuple(int(s) for s in stops), tail,
                    (int(vocab_range[0]), int(vocab_range[1])))


def _split_fn(tokens, start, r, stops, tail, vocab_range):
  response = jax.lax.dynamic_slice_in_dim(tokens, start, r, axis=1)
  trainable, hidden, length = mask_lib.split_response(response, stops, tail)
  bad = jnp.sum((response < vocab_range[0]) | (response >= vocab_range[1]))
  return response, trainable, hidden, length, bad


_split_jit = jax.jit(_split_fn, static_argnums=(1, 2, 3, 4, 5))


def _encode_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  out = {}
  for k, v in arrays.items():
    v = np.ascontiguousarray(np.asarray(v))
    out[k] = {"dtype": v.dtype.str, "shape": list(v.shape), "data": base64.b64encode(v.tobytes()).decode("ascii")}
  return out


def _decode_arrays(enc: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in enc.items():
    out[k] = np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
  return out

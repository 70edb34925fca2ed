"""The UniGRPO stage object (spec §8): rollouts → rewards → advantages → μ masked updates.

:class:`GRPOStage` has the trainer's stage hooks as attributes (``loss_fn``, ``make_batches``,
``batch_spec``, ``sequences``, ``pre_step``, ``init_frozen``, ``logit_shape``); the trainer wraps
it (``mmada_jax.train.stages.unigrpo``), and own loops or tests can drive it directly
(:meth:`GRPOStage.batch_for`). Nothing here imports the trainer.

One rollout cycle serves μ = ``inner_updates`` optimizer steps:

1. ``pre_step`` (host) on the first step of a cycle, with the current params (= π_old): G
   rollouts per prompt (:mod:`mmada_jax.rl.rollout`); rewards on the host
   (:mod:`mmada_jax.rl.rewards`), group-normalised advantages (:mod:`mmada_jax.rl.advantages`),
   optionally the accuracy filter; the μ structured maskings and log π_old / log π_ref of every
   response token on those exact inputs (:func:`mmada_jax.rl.update.prepare_updates`). Each step
   of the cycle then returns the batch of its inner iteration n.
2. ``loss_fn`` (jitted by the trainer): :func:`mmada_jax.rl.update.grpo_loss_fn`.

The prompt iterator yields every prompt batch μ times, tagged ``(index, inner)``; a batch whose
index differs from the cached rollout starts a new cycle. After a resume in mid-cycle the
rollout is redone with the restored params and the cycle continues at the restored ``inner``.

Sharding: rollouts and the log-prob pass run on global arrays (``sharding.transfer``), rows
sharded by the run's logical ``batch`` rule (rows per process must divide by those shards) with
the policy's own parameter shardings; the reference params are a copy of the initial policy
made by ``init_frozen`` with the same shardings. Host work (decoding, rewards) sees only the
process's own rows; groups never straddle processes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl import advantages as adv_lib
from mmada_jax.rl import masking as mask_lib
from mmada_jax.rl import rewards as rew_lib
from mmada_jax.rl import update
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.rl.loss import check_targets
from mmada_jax.rl.prompts import PromptIterator, Record
from mmada_jax.rl.rollout import global_std, sample_image_groups, sample_text_groups, sharding_for
from mmada_jax.sharding import to_global, to_host


@dataclasses.dataclass
class _Cycle:
  index: int
  batches: list[dict[str, np.ndarray]]


class GRPOStage:
  """UniGRPO with the trainer's stage hooks (module docstring).

  Args:
    model_cfg: the policy's config. cfg: :class:`mmada_jax.rl.config.GRPOConfig`.
    source: ``batch_index -> list of records`` over all processes
      (:func:`mmada_jax.rl.prompts.list_source`).
    rewards: the rewards to combine (:mod:`mmada_jax.rl.rewards`).
    specials: special-token ids (pad, stops, image offset, t2i/mmu layout tokens).
    tokenizer: decodes completions for text rewards (``decode(ids, skip_special_tokens=True)``);
      None = rewards see only ``completion_ids``.
    image_decoder: T2I: ``codes int [B, N] -> uint8 [B, H, W, 3]``
      (:func:`mmada_jax.rl.rollout.magvit_decoder`).
  """

  def __init__(self, model_cfg: MMaDAConfig, cfg: GRPOConfig, source: Callable[[int], Sequence[Record]],
               rewards: Sequence[rew_lib.RewardFn], *, specials: SpecialTokens = SpecialTokens(),
               tokenizer: Any = None, image_decoder: Callable[[np.ndarray], np.ndarray] | None = None):
    if not rewards:
      raise ValueError("the GRPO stage needs at least one reward")
    if cfg.task == "t2i" and image_decoder is None:
      raise ValueError("rl.task='t2i' needs an image decoder (set rl.image_tokenizer)")
    self._setup(model_cfg, cfg, specials)
    self.source = source
    self.rewards = list(rewards)
    self.tokenizer, self.image_decoder = tokenizer, image_decoder
    self.filter_name = cfg.filter_reward or next((r.name for r in self.rewards if "correct" in r.name), "")
    if cfg.drop_degenerate_groups and self.filter_name not in {r.name for r in self.rewards}:
      raise ValueError("rl.drop_degenerate_groups needs rl.filter_reward naming one of the rewards "
                       f"{[r.name for r in self.rewards]}")

  @classmethod
  def abstract(cls, model_cfg: MMaDAConfig, cfg: GRPOConfig,
               specials: SpecialTokens = SpecialTokens()) -> "GRPOStage":
    """Shapes only (AOT): ``loss_fn``, ``batch_spec`` (without the ``reward/<name>`` leaves:
    no reward is built), ``init_frozen``; ``make_batches`` / ``pre_step`` raise."""
    self = cls.__new__(cls)
    self._setup(model_cfg, cfg, specials)
    self.source, self.rewards, self.tokenizer, self.image_decoder, self.filter_name = None, [], None, None, ""
    return self

  def _setup(self, model_cfg: MMaDAConfig, cfg: GRPOConfig, specials: SpecialTokens) -> None:
    if cfg.task != "t2i" and cfg.max_prompt_len < 1:
      raise ValueError("text/MMU rollouts need rl.max_prompt_len >= 1 (the compiled prompt width)")
    self.model_cfg, self.cfg, self.specials = model_cfg, cfg, specials
    self.mask_id = int(model_cfg.mask_token_id)
    self.stop_ids = (int(specials.eos), int(specials.eot_id))
    if cfg.task == "t2i":
      off = int(specials.image_offset)
      self.vocab_range: tuple[int, int] | None = (off, off + int(model_cfg.codebook_size))
      n = int(model_cfg.num_vq_tokens)
      self.length, self.response = int(cfg.max_text_len) + n + 3, n
    else:
      self.vocab_range = None
      self.length, self.response = int(cfg.max_prompt_len) + int(cfg.gen_length), int(cfg.gen_length)
    self._cycle: _Cycle | None = None
    self.last_rollout: dict[str, Any] = {}

  def _need_data(self, what: str) -> None:
    if self.source is None:
      raise RuntimeError(f"GRPOStage.{what}: this stage was built abstract (shapes only): it has no prompts")

  # -- trainer hooks ------------------------------------------------------------------------
  @property
  def logit_shape(self) -> tuple[int, int]:
    """(response positions per row, vocabulary columns) where the loss applies the LM head."""
    lo, hi = self.vocab_range or (0, int(self.model_cfg.vocab_size))
    return self.response, hi - lo

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one inner step (:func:`mmada_jax.rl.update.batch_spec`): G ×
    prompts_per_step rows; text / MMU rows of max_prompt_len + gen_length tokens with a
    gen_length response, T2I rows of max_text_len + num_vq_tokens + 3 with the image response."""
    return update.batch_spec(self.cfg.rollouts_per_step, self.length, self.response,
                             [r.name for r in self.rewards])

  def make_batches(self, process_index: int, process_count: int) -> PromptIterator:
    self._need_data("make_batches")
    if self.cfg.prompts_per_step % process_count:
      raise ValueError(f"rl.prompts_per_step={self.cfg.prompts_per_step} is not divisible by the "
                       f"{process_count} processes")
    return PromptIterator(self.source, self.cfg.inner_updates, process_index, process_count)

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

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any):
    return update.grpo_loss_fn(params, batch, rng, frozen, model_cfg=self.model_cfg, loss_cfg=self.cfg.loss,
                               vocab_range=self.vocab_range)

  def sequences(self, batch: Mapping[str, Any]) -> tuple[int, int]:
    """(rows, token length) of a batch (host batch or spec)."""
    rows, length = np.shape(batch["input_ids"])[:2]
    return int(rows), int(length)

  def pre_step(self, ctx: Any, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the batch of inner iteration ``host_batch['inner']``, rolling out when needed."""
    mesh = getattr(ctx, "mesh", None)
    frozen = getattr(ctx, "frozen", None)
    return self.batch_for(ctx.state.params, frozen, host_batch, mesh)

  def batch_for(self, params: Any, frozen: Any, host_batch: Mapping[str, Any],
                mesh: jax.sharding.Mesh | None = None) -> dict[str, np.ndarray]:
    """``pre_step`` without a trainer context (own loops, tests)."""
    self._need_data("pre_step")
    index, inner = int(host_batch["index"]), int(host_batch["inner"])
    if self._cycle is None or self._cycle.index != index:
      self._cycle = _Cycle(index, self.rollout(params, frozen, host_batch["records"], index, mesh))
    return self._cycle.batches[inner]

  # -- rollout cycle ------------------------------------------------------------------------
  def _keys(self, index: int) -> tuple[jax.Array, jax.Array]:
    k = jax.random.fold_in(jax.random.key(self.cfg.seed), index)
    return tuple(jax.random.split(k))

  def rollout(self, params: Any, frozen: Any, records: Sequence[Record], index: int,
              mesh: jax.sharding.Mesh | None = None) -> list[dict[str, np.ndarray]]:
    """One rollout cycle over this process's ``records``: the μ inner-iteration batches."""
    cfg, g = self.cfg, self.cfg.group_size
    k_roll, k_mask = self._keys(index)
    if cfg.task == "t2i":
      tokens, attn, start, images = sample_image_groups(params, self.model_cfg, cfg, records, k_roll, mesh,
                                                        self.specials, self.image_decoder)
    else:
      tokens, attn, start = sample_text_groups(params, self.model_cfg, cfg, records, k_roll, mesh, self.specials)
      images = None
    r = tokens.shape[1] - int(start[0]) if cfg.task != "t2i" else int(self.model_cfg.num_vq_tokens)
    response = tokens[np.arange(tokens.shape[0])[:, None], start[:, None] + np.arange(r)[None, :]]
    check_targets(response, self.vocab_range or (0, int(self.model_cfg.vocab_size)), "rollout response tokens")
    stops = () if cfg.task == "t2i" else self.stop_ids
    tail = "train" if cfg.task == "t2i" else cfg.response_tail
    trainable, hidden, length = (np.asarray(a) for a in mask_lib.split_response(response, stops, tail))

    comp_ids = [response[i, :length[i]] for i in range(response.shape[0])]
    completions = None
    if self.tokenizer is not None and cfg.task != "t2i":
      completions = [self.tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in comp_ids]

    def per_row(key):
      return [rec.get(key) for rec in records for _ in range(g)]
    labels = per_row("label")
    inputs = rew_lib.RewardInputs(
        prompts=[str(x) if x is not None else "" for x in per_row("prompt")], completions=completions,
        references=per_row("answer"), choices=per_row("choices"), images=images,
        labels=None if any(x is None for x in labels) else np.asarray(labels, np.int64),
        completion_ids=comp_ids)
    total, raw = rew_lib.combine_rewards(self.rewards, inputs)
    advantages = adv_lib.group_advantages(total, g, cfg.adv_eps)
    weight = np.ones_like(total)
    if cfg.drop_degenerate_groups:
      weight = adv_lib.group_keep_mask(raw[self.filter_name], g, cfg.filter_low, cfg.filter_high)

    ref = frozen["ref"] if (cfg.loss.needs_ref and frozen is not None) else params
    if cfg.loss.needs_ref and frozen is None:
      raise ValueError("kl_reference='ref' with kl_beta > 0 needs the frozen reference (init_frozen)")
    sh = sharding_for(mesh)
    out = update.prepare_updates(
        params, ref, *to_global((tokens, attn, start, trainable, hidden), sh), k_mask, model_cfg=self.model_cfg,
        mu=cfg.inner_updates, masking=cfg.masking, mask_id=self.mask_id, vocab_range=self.vocab_range,
        need_ref=cfg.loss.needs_ref)
    out = to_host(out, sh, names=(None, "batch"))  # [mu, rows, ...]: this process's rows

    std = np.full_like(total, global_std(total))
    common = {"attention_mask": attn.astype(np.int32), "response_start": start.astype(np.int32),
              "targets": response.astype(np.int32), "advantages": advantages.astype(np.float32),
              "seq_weight": weight.astype(np.float32), "reward": total, "reward_std": std,
              "response_length": length.astype(np.float32)}
    common.update({f"reward/{k}": v for k, v in raw.items()})
    self.last_rollout = {"tokens": tokens, "rewards": total, "raw": raw, "advantages": advantages,
                         "completions": completions, "images": images, "response_length": length}
    return [dict(common, input_ids=out["input_ids"][n].astype(np.int32), loss_mask=out["loss_mask"][n],
                 old_logp=out["old_logp"][n], ref_logp=out["ref_logp"][n], mask_ratio=out["mask_ratio"][n])
            for n in range(cfg.inner_updates)]

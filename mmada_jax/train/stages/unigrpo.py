"""The UniGRPO stage of the trainer (``config.stage.name`` 'unigrpo', alias 'grpo').

Builds :class:`mmada_jax.rl.stage.GRPOStage` from ``config.rl``
(:class:`mmada_jax.rl.config.GRPOConfig`): the prompt records (``rl.prompt_source``: a JSONL file
with its tokenizer, or the toy digits with the toy source's special tokens), the rewards
(``rl.rewards``, :func:`mmada_jax.rl.rewards.resolve_rewards`), the MAGVIT-v2 decoder for T2I,
and the compiled prompt width (``rl.max_prompt_len``, 0 = the longest prompt). ``abstract=True``
builds it from the config alone (AOT): no prompt file, tokenizer or reward is opened; MMaDA's
default special tokens (the toy source's for the toy digits); ``rl.max_prompt_len`` must be set
for text / MMU prompts read from a file.

With ``rl.tasks`` (a unified stage) each task's records, rewards, decoder and prompt width are
built the same way from its own settings (:meth:`mmada_jax.rl.config.GRPOConfig.task_list`).
"""
from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl import rewards as rew_lib
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.rl.prompts import list_source, load_jsonl_records, mixture_counts, toy_digit_records
from mmada_jax.rl.rollout import magvit_decoder
from mmada_jax.rl.stage import GRPOStage
from mmada_jax.train.stages import Stage, register_stage
from mmada_jax.train.toy_data import TOY_SPECIALS


def _prompt_source(config: ConfigDict, cfg: GRPOConfig) -> str:
  return cfg.prompt_source or ("toy_digits" if config.get("data_source") == "toy" else "jsonl")


def _abstract_width(config: ConfigDict, cfg: GRPOConfig, name: str, task: str) -> GRPOConfig:
  """``cfg`` with its compiled prompt width where it is known without files (the toy digits)."""
  if cfg.task == "t2i" or cfg.max_prompt_len > 0:
    return cfg
  if _prompt_source(config, cfg) == "toy_digits":
    width = max(len(r["prompt_ids"]) for r in toy_digit_records(TOY_SPECIALS, cfg.toy_digits))
    return dataclasses.replace(cfg, max_prompt_len=width)
  raise ValueError(f"stage {name!r} built without its prompts needs rl.max_prompt_len >= 1 (the compiled prompt "
                   f"width){'' if task == cfg.task and not config.rl.get('tasks') else f' for task {task!r}'}")


def _task_parts(config: ConfigDict, model_cfg: MMaDAConfig, cfg: GRPOConfig, specials_cache: dict):
  """(records, rewards, tokenizer, image decoder, cfg with its prompt width) of one task."""
  source = _prompt_source(config, cfg)
  tokenizer = None
  if source == "toy_digits":
    specials = TOY_SPECIALS
    records = toy_digit_records(specials, cfg.toy_digits)
  else:
    from mmada_jax.prompting.text_tokenizer import TextTokenizer
    tok_path = cfg.text_tokenizer or str(config.data.text_tokenizer)
    if not tok_path:
      raise ValueError("rl.prompt_source='jsonl' needs rl.text_tokenizer (or data.text_tokenizer)")
    if not cfg.prompt_file:
      raise ValueError("rl.prompt_source='jsonl' needs rl.prompt_file")
    if tok_path not in specials_cache:
      tok = TextTokenizer.from_file(tok_path)
      specials_cache[tok_path] = (tok, SpecialTokens.from_tokenizer(tok))
    tokenizer, specials = specials_cache[tok_path]
    records = load_jsonl_records(cfg.prompt_file, cfg.task, tokenizer, specials, cfg.thinking_prompt)
  decoder = None
  if cfg.task == "t2i":
    if not cfg.image_tokenizer:
      raise ValueError("rl.task='t2i' needs rl.image_tokenizer (a MAGVIT-v2 directory) to decode images")
    from mmada_jax.api.image_tokenizer import ImageTokenizer
    decoder = magvit_decoder(ImageTokenizer.from_pretrained(cfg.image_tokenizer))
  if cfg.max_prompt_len == 0 and cfg.task != "t2i":
    cfg = dataclasses.replace(cfg, max_prompt_len=max(len(r["prompt_ids"]) for r in records))
  rewards = rew_lib.resolve_rewards(cfg.rewards or rew_lib.default_reward_spec(cfg.task, source, cfg), cfg,
                                    config, model_cfg)
  return records, rewards, tokenizer, decoder, cfg, specials


def grpo_stage(config: ConfigDict, model_cfg: MMaDAConfig, name: str = "unigrpo",
               abstract: bool = False) -> GRPOStage:
  """The :class:`GRPOStage` of ``config`` (module docstring): one task, or with ``rl.tasks`` the
  unified stage (:meth:`GRPOStage.mixture`; every task's prompts use the same special tokens,
  each task its own seed ``rl.seed + 1000·k`` for its prompt order)."""
  cfg = GRPOConfig.from_config(config.get("rl"))
  if cfg.tasks:
    resolved = {tname: _abstract_width(config, tc, name, tname) if abstract else tc
                for tname, _, tc in cfg.task_list()}
  if abstract:
    toy = all(_prompt_source(config, tc) == "toy_digits" for _, _, tc in cfg.task_list())
    specials = TOY_SPECIALS if toy else SpecialTokens()
    if not cfg.tasks:
      return GRPOStage.abstract(model_cfg, _abstract_width(config, cfg, name, cfg.task), specials)
    tasks = tuple(dataclasses.replace(t, max_prompt_len=resolved[t.name].max_prompt_len) for t in cfg.tasks)
    return GRPOStage.abstract(model_cfg, dataclasses.replace(cfg, tasks=tasks), specials)
  cache: dict = {}
  if not cfg.tasks:
    records, rewards, tokenizer, decoder, cfg, specials = _task_parts(config, model_cfg, cfg, cache)
    src = list_source(records, cfg.prompts_per_step, cfg.seed)
    return GRPOStage(model_cfg, cfg, src, rewards, specials=specials, tokenizer=tokenizer, image_decoder=decoder)
  counts = mixture_counts([w for _, w, _ in cfg.task_list()], cfg.prompts_per_step)
  sources, rewards, tokenizers, decoders, widths, all_specials = {}, {}, {}, {}, {}, set()
  for k, ((tname, _, tc), n) in enumerate(zip(cfg.task_list(), counts)):
    records, rewards[tname], tokenizers[tname], decoders[tname], tc, sp = _task_parts(config, model_cfg, tc, cache)
    all_specials.add(sp)
    widths[tname] = tc.max_prompt_len
    sources[tname] = list_source(records, n, cfg.seed + 1000 * k)
  if len(all_specials) > 1:
    raise ValueError("rl.tasks: every task's prompts must use the same special tokens (one text tokenizer, or "
                     "all toy digits)")
  cfg = dataclasses.replace(cfg, tasks=tuple(dataclasses.replace(t, max_prompt_len=widths[t.name])
                                             for t in cfg.tasks))
  return GRPOStage.mixture(model_cfg, cfg, sources, rewards, specials=all_specials.pop(), tokenizers=tokenizers,
                           image_decoders=decoders)


@register_stage("unigrpo")
def unigrpo_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """UniGRPO (spec §8) as a trainer stage."""
  return Stage.from_hooks("unigrpo", grpo_stage(config, model_cfg, "unigrpo", abstract))


@register_stage("grpo")
def grpo_alias_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """``grpo``: the same stage as ``unigrpo``."""
  return Stage.from_hooks("grpo", grpo_stage(config, model_cfg, "grpo", abstract))

"""The UniGRPO stage of the trainer (``config.stage.name`` 'unigrpo', alias 'grpo').

Builds :class:`mmada_jax.rl.stage.GRPOStage` from ``config.rl``
(:class:`mmada_jax.rl.config.GRPOConfig`): the prompt records (``rl.prompt_source``: a JSONL file
with its tokenizer, or the toy digits with the toy source's special tokens), the rewards
(``rl.rewards``, :func:`mmada_jax.rl.rewards.resolve_rewards`), the MAGVIT-v2 decoder for T2I,
and the compiled prompt width (``rl.max_prompt_len``, 0 = the longest prompt). ``abstract=True``
builds it from the config alone (AOT): no prompt file, tokenizer or reward is opened; MMaDA's
default special tokens (the toy source's for the toy digits); ``rl.max_prompt_len`` must be set
for text / MMU prompts read from a file.
"""
from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from mmada_jax.model.config import MMaDAConfig
from mmada_jax.prompting.special_tokens import SpecialTokens
from mmada_jax.rl import rewards as rew_lib
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.rl.prompts import list_source, load_jsonl_records, toy_digit_records
from mmada_jax.rl.rollout import magvit_decoder
from mmada_jax.rl.stage import GRPOStage
from mmada_jax.train.stages import Stage, register_stage
from mmada_jax.train.toy_data import TOY_SPECIALS


def _prompt_source(config: ConfigDict, cfg: GRPOConfig) -> str:
  return cfg.prompt_source or ("toy_digits" if config.get("data_source") == "toy" else "jsonl")


def grpo_stage(config: ConfigDict, model_cfg: MMaDAConfig, name: str = "unigrpo",
               abstract: bool = False) -> GRPOStage:
  """The :class:`GRPOStage` of ``config`` (module docstring)."""
  cfg = GRPOConfig.from_config(config.get("rl"))
  source = _prompt_source(config, cfg)
  if abstract:
    if source == "toy_digits":   # built in, no files: its prompt width is known
      if cfg.max_prompt_len == 0 and cfg.task != "t2i":
        width = max(len(r["prompt_ids"]) for r in toy_digit_records(TOY_SPECIALS, cfg.toy_digits))
        cfg = dataclasses.replace(cfg, max_prompt_len=width)
      return GRPOStage.abstract(model_cfg, cfg, TOY_SPECIALS)
    if cfg.task != "t2i" and cfg.max_prompt_len < 1:
      raise ValueError(f"stage {name!r} built without its prompts needs rl.max_prompt_len >= 1 "
                       "(the compiled prompt width)")
    return GRPOStage.abstract(model_cfg, cfg, SpecialTokens())
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
    tokenizer = TextTokenizer.from_file(tok_path)
    specials = SpecialTokens.from_tokenizer(tokenizer)
    records = load_jsonl_records(cfg.prompt_file, cfg.task, tokenizer, specials, cfg.thinking_prompt)
  decoder = None
  if cfg.task == "t2i":
    if not cfg.image_tokenizer:
      raise ValueError("rl.task='t2i' needs rl.image_tokenizer (a MAGVIT-v2 directory) to decode images")
    from mmada_jax.api.image_tokenizer import ImageTokenizer
    decoder = magvit_decoder(ImageTokenizer.from_pretrained(cfg.image_tokenizer))
  if cfg.max_prompt_len == 0 and cfg.task != "t2i":
    cfg = dataclasses.replace(cfg, max_prompt_len=max(len(r["prompt_ids"]) for r in records))
  rewards = rew_lib.resolve_rewards(cfg.rewards or rew_lib.default_reward_spec(cfg.task, source), cfg,
                                    config, model_cfg)
  src = list_source(records, cfg.prompts_per_step, cfg.seed)
  return GRPOStage(model_cfg, cfg, src, rewards, specials=specials, tokenizer=tokenizer, image_decoder=decoder)


@register_stage("unigrpo")
def unigrpo_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """UniGRPO (spec §8) as a trainer stage."""
  return Stage.from_hooks("unigrpo", grpo_stage(config, model_cfg, "unigrpo", abstract))


@register_stage("grpo")
def grpo_alias_stage(config: ConfigDict, model_cfg: MMaDAConfig, abstract: bool = False) -> Stage:
  """``grpo``: the same stage as ``unigrpo``."""
  return Stage.from_hooks("grpo", grpo_stage(config, model_cfg, "grpo", abstract))

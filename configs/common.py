"""Config fragments shared by every experiment file (``get_config(arg)`` convention).

Each experiment file builds ``base_config()`` and changes only what differs. Every section's
keys, types, defaults and meaning are defined once, by a dataclass beside the code that reads
it; the builders below derive their ConfigDicts from those (``mmada_jax.config_schema``):

* top level and ``stage``: ``mmada_jax.train.config.TrainConfig`` / ``StageConfig`` (that
  module's docstring lists every section and its dataclass);
* ``model``: ``mmada_jax.model.config.MMaDAConfig`` (training default: bf16 compute);
* ``data``: ``mmada_jax.data.config.DataConfig``; ``toy``: ``mmada_jax.train.toy_data.ToyConfig``;
* ``optimizer``: ``mmada_jax.train.optim.OptimizerConfig``; ``checkpoint``:
  ``mmada_jax.train.checkpointing.CheckpointConfig``; ``distributed``:
  ``mmada_jax.train.distributed.DistributedConfig``; ``sampling``:
  ``mmada_jax.train.samples.SamplingConfig``; ``lora``: ``mmada_jax.train.lora.LoraConfig``;
* ``rl`` (UniGRPO stages): ``mmada_jax.rl.config.GRPOConfig``; ``demo`` (the demo's t2i
  rewards): ``mmada_jax.demo.rewards.DemoConfig``.

``tests/test_config_schema.py`` fails on a key of any variant that the schema lacks, a schema key
that no code reads, and a key read by the code that the schema lacks.
"""
from __future__ import annotations

import ml_collections

from mmada_jax.config_schema import to_config_dict
from mmada_jax.train.config import TrainConfig

_DEFAULTS = TrainConfig()


def _section(name: str, overrides: dict) -> ml_collections.ConfigDict:
  """The ConfigDict of TrainConfig's default ``name`` section with ``overrides``."""
  return to_config_dict(getattr(_DEFAULTS, name), **overrides)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``"sft,steps=10,records"`` -> ConfigDict; bare words set True, the first bare word is also
  ``variant``. Values are cast to the type of the default."""
  out = ml_collections.ConfigDict(dict(defaults, variant=defaults.get("variant", "")))
  for i, part in enumerate([p for p in (arg or "").split(",") if p]):
    key, _, value = part.partition("=")
    if not _:
      if i == 0 and "variant" in defaults:
        out.variant = key
        continue
      value = "True"
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
    kind = type(out[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def model_config(**overrides) -> ml_collections.ConfigDict:
  """``model``: the MMaDA-8B architecture (spec §1.2), fp32 master weights and bf16 compute."""
  return _section("model", overrides)


def stage_config(**overrides) -> ml_collections.ConfigDict:
  """``stage``: which registered stage runs, and the mixed objective's settings."""
  return _section("stage", overrides)


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """``optimizer``: AdamW + warm-up/cosine (spec §5)."""
  return _section("optimizer", overrides)


def checkpoint_config(**overrides) -> ml_collections.ConfigDict:
  """``checkpoint``: the Orbax CheckpointManager policy."""
  return _section("checkpoint", overrides)


def distributed_config(**overrides) -> ml_collections.ConfigDict:
  """``distributed``: multi-host start-up."""
  return _section("distributed", overrides)


def sampling_config(**overrides) -> ml_collections.ConfigDict:
  """``sampling``: periodic samples written to WORKDIR/samples and TensorBoard."""
  return _section("sampling", overrides)


def lora_config(**overrides) -> ml_collections.ConfigDict:
  """``lora``: LoRA / QLoRA adapters (``rank=0``, the default, trains every parameter)."""
  return _section("lora", overrides)


def toy_config(**overrides) -> ml_collections.ConfigDict:
  """``toy``: the built-in toy source (``data_source='toy'``)."""
  return _section("toy", overrides)


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (no ``rl`` / ``demo``: the stages that read them add them)."""
  return to_config_dict(_DEFAULTS)


def rl_config(**overrides) -> ml_collections.ConfigDict:
  """``rl``: the UniGRPO section (spec §8, docs/unigrpo.md), read by ``stage.name='unigrpo'``."""
  from mmada_jax.rl.config import GRPOConfig
  return to_config_dict(GRPOConfig, **overrides)
"""The training config's schema: :class:`TrainConfig`, the top level of every experiment config.

Each section is a dataclass defined beside the code that reads it; this module only assembles
them (``configs/common.py`` derives its ConfigDicts from these, :func:`parse_config` reads one
back, strictly; :func:`model_config` reads the ``model`` section alone):

| key | dataclass |
|---|---|
| top level | :class:`TrainConfig` (below) |
| ``model`` | :class:`mmada_jax.model.config.MMaDAConfig` (training default: bf16 compute) |
| ``stage`` | :class:`StageConfig` (below) |
| ``data`` | :class:`mmada_jax.data.config.DataConfig` (flows ``t2i`` / ``lm`` / ``mmu``) |
| ``toy`` | :class:`mmada_jax.train.toy_data.ToyConfig` |
| ``optimizer`` | :class:`mmada_jax.train.optim.OptimizerConfig` |
| ``checkpoint`` | :class:`mmada_jax.train.checkpointing.CheckpointConfig` |
| ``distributed`` | :class:`mmada_jax.train.distributed.DistributedConfig` |
| ``sampling`` | :class:`mmada_jax.train.samples.SamplingConfig` |
| ``lora`` | :class:`mmada_jax.train.lora.LoraConfig` (rank 0 = off: full fine-tuning) |
| ``rl`` (UniGRPO stages only) | :class:`mmada_jax.rl.config.GRPOConfig` |
| ``demo`` (the demo's t2i rewards only) | :class:`mmada_jax.demo.rewards.DemoConfig` |

``tests/test_config_schema.py`` checks that every key of every shipped config variant is in
this schema, that every schema key is read by the code, and that the code reads no other key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mmada_jax.config_schema import parse, plugin_section
from mmada_jax.data.config import DataConfig
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.rl.config import GRPOConfig
from mmada_jax.train.checkpointing import CheckpointConfig
from mmada_jax.train.distributed import DistributedConfig
from mmada_jax.train.lora import LoraConfig
from mmada_jax.train.optim import OptimizerConfig
from mmada_jax.train.samples import SamplingConfig
from mmada_jax.train.toy_data import ToyConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """The ``config.stage`` section. ``name`` selects a registered stage ('pretrain', 'sft',
  'unigrpo', …: :mod:`mmada_jax.train.stages`); the other keys configure the mixed objective
  (:class:`mmada_jax.diffusion.objectives.MixedSpec`).

  ``coeff_*``: loss weights. ``lm_format``: 'lm' (pre-training formula Σ CE/p / (B·L)) or
  'lm_chat' (prompt never noised, 1/(p·ans_len)). ``t2i_attention``: 'hard' padding mask or the
  original's 'original_additive' float bias (QUIRK). ``mask_schedule`` / ``min_masking_rate``:
  image noising. ``text_eps``: ε of p = (1-ε)t + ε. ``min_answer_length_lm``: clamp of ans_len
  (stage 2.2: 1; 0 = off). ``logits_chunk``: > 0 applies the LM head + cross-entropy to this
  many positions at a time (the fused ``model.lm_head`` loss: same loss, neither forward nor
  backward holds [B, L, V] float32 logits); 0 = full logits.
  """
  name: str = "pretrain"
  coeff_t2i: float = 1.0
  coeff_lm: float = 0.1
  coeff_mmu: float = 1.0
  lm_format: Literal["lm", "lm_chat"] = "lm"
  t2i_attention: Literal["hard", "original_additive"] = "hard"
  mask_schedule: str = "cosine"
  min_masking_rate: float = 0.0
  text_eps: float = 1e-3
  min_answer_length_lm: int = 0
  logits_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The top level of a training config.

  ``seed``; ``steps`` (optimizer steps); ``log_every``; ``checkpoint_every`` (0 = only at the
  end); ``mesh_shape`` ("fsdp=4,tensor=2"; one axis may be -1); ``sharding_preset`` (the
  logical-axis rule table, :data:`mmada_jax.sharding.rules.PRESETS`); ``sharding_rules``
  (overrides of the preset's entries, "logical=axis[+axis],...", "none" = replicated);
  ``init_from`` (params only: an original HF directory, an mmada_jax params directory, or a
  trainer workdir / step directory); ``data_source`` ('records' = the grain pipeline over
  ``data``; 'toy' = the built-in toy source); ``peak_flops_per_device`` (0 = look up by device
  kind); ``tensorboard``; ``progress_bar``. Sections: the table in the module docstring.
  """
  seed: int = 10086
  steps: int = 1000
  log_every: int = 10
  checkpoint_every: int = 1000
  mesh_shape: str = "fsdp=-1"
  sharding_preset: str = "fsdp_tp"
  sharding_rules: str = ""
  init_from: str = ""
  data_source: Literal["records", "toy"] = "records"
  peak_flops_per_device: float = 0.0
  tensorboard: bool = True
  progress_bar: bool = True
  model: MMaDAConfig = dataclasses.field(default_factory=lambda: MMaDAConfig(dtype="bfloat16"))
  stage: StageConfig = dataclasses.field(default_factory=StageConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  toy: ToyConfig = dataclasses.field(default_factory=ToyConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  rl: GRPOConfig | None = None
  demo: Any = plugin_section("mmada_jax.demo.rewards:DemoConfig", "the demo's t2i reward settings")


def model_config(cfg: Any) -> MMaDAConfig:
  """The ``config.model`` section as an MMaDAConfig (ConfigError on an unknown key or type)."""
  return parse(MMaDAConfig, cfg, "config.model")


def parse_config(config: Any) -> TrainConfig:
  """``config`` (a ConfigDict or mapping) as a :class:`TrainConfig`; a ConfigError names the
  first unknown key (full dotted path and the known keys) or wrongly typed value."""
  return parse(TrainConfig, config, "config")

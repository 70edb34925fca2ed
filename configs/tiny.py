"""Tiny MMaDA for CPU tests and demos (2 layers, d_model 64; every stage in seconds).

  python -m mmada_jax.train --config=configs/tiny.py:pretrain --workdir=/tmp/tiny
  python -m mmada_jax.train --config=configs/tiny.py:sft --workdir=/tmp/tiny_sft \
      --config.init_from=/tmp/tiny
  python -m mmada_jax.train --config=configs/tiny.py:grpo --workdir=/tmp/tiny_rl

Variants (first word of the argument): ``pretrain`` (stage-1 style mixed loss, lm pre-training
formula), ``sft`` (stage-2 style: lm_chat rows, coefficients 1.0/0.5/0.5), ``grpo`` (the UniGRPO
stage: ``stage.name='unigrpo'`` with the ``rl`` section, on the toy-digits prompts).
Options: ``records`` = read ``config.data`` with the grain pipeline instead of the toy source
(then set ``data.text_tokenizer``, the flows' paths and ``model.vocab_size`` / ids to match).
"""
from __future__ import annotations

# mmada_jax.configs is this folder (setup.py's package_dir), installed editable or as a wheel.
from mmada_jax.configs import common

from mmada_jax.train.toy_data import toy_model_fields

VARIANTS = ("pretrain", "sft", "grpo")


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="pretrain", records=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"configs/tiny.py: unknown variant {args.variant!r}; expected one of {VARIANTS}")
  c = common.base_config()
  c.seed = 0
  c.steps = 100
  c.log_every = 1
  c.checkpoint_every = 50
  c.mesh_shape = "fsdp=-1"
  c.data_source = "records" if args.records else "toy"
  c.toy = common.toy_config(codebook_size=64, classes=8, chat_lm=args.variant == "sft")

  c.data.max_text_len = 20       # S
  c.data.num_image_tokens = 16   # N (4×4 codes); L = S + N + 3 = 39
  c.data.seed = 0
  c.data.t2i.batch_size = 16     # global rows per optimizer step
  c.data.lm.batch_size = 16
  c.data.mmu.batch_size = 16

  c.model = common.model_config(
      d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128, max_sequence_length=128,
      **toy_model_fields(c.toy.codebook_size, c.data.num_image_tokens))
  c.optimizer = common.optimizer_config(lr=3e-3, warmup_steps=10, grad_accum=2)
  c.checkpoint = common.checkpoint_config(max_to_keep=3)
  c.sampling = common.sampling_config(gen_length=8, block_length=8, text_steps=8, t2i_steps=4,
                                      t2i_guidance_scale=1.5)

  if args.variant == "pretrain":
    c.stage = common.stage_config(name="pretrain", coeff_t2i=1.0, coeff_lm=0.1, coeff_mmu=1.0, lm_format="lm")
  elif args.variant == "sft":
    c.data.lm.kind = "lm_chat"
    c.stage = common.stage_config(name="sft", coeff_t2i=1.0, coeff_lm=0.5, coeff_mmu=0.5, lm_format="lm_chat")
  else:
    # UniGRPO: the stage and its module belong to the RL implementation (spec §8).
    c.stage = common.stage_config(name="unigrpo", lm_format="lm_chat")
    c.rl = common.rl_config()
    c.rl.group_size = 4
    c.rl.prompts_per_step = 4
    c.rl.gen_length = 8
    c.rl.block_length = 8
    c.rl.gen_steps = 8
    c.optimizer = common.optimizer_config(lr=1e-4, weight_decay=0.0, warmup_steps=0, grad_accum=1)
  return c

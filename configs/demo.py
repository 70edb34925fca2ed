"""The embedded demo's stages: a ~1M-parameter MMaDA on digits and arithmetic, CPU-sized.

Built by ``python -m mmada_jax.demo`` after it has made the data (``mmada_jax.demo.data``); the
argument names the stage and the built data's ``demo_data.json``:

  python -m mmada_jax.train --config=configs/demo.py:pretrain,data=RUN/data/demo_data.json --workdir=RUN/pretrain
  python -m mmada_jax.train --config=configs/demo.py:sft,data=...  --workdir=RUN/sft --config.init_from=RUN/pretrain
  python -m mmada_jax.train --config=configs/demo.py:grpo_text,data=... --workdir=RUN/grpo_text --config.init_from=RUN/sft

Variants: ``pretrain`` (t2i + lm + mmu, lm pre-training formula), ``sft`` (mixed CoT: lm_chat
arithmetic with <think> answers, mmu plain + CoT), ``grpo`` (one unified UniGRPO stage over the
three tasks below, ``rl.tasks`` weighted by ``GRPO_TASKS``), ``grpo_text`` / ``grpo_mmu`` / ``grpo_t2i``
(UniGRPO on arithmetic with correctness + format rewards, on digit questions with MMU
correctness, and on digit captions with the demo's digit classifier as the image-text scorer).
``steps=N`` overrides the variant's default step count (the demo's presets use it).
"""
from __future__ import annotations

import json

# mmada_jax.configs is this folder (setup.py's package_dir), installed editable or as a wheel.
from mmada_jax.configs import common

from mmada_jax.config_schema import to_config_dict
from mmada_jax.demo.rewards import DemoConfig

VARIANTS = ("pretrain", "sft", "grpo", "grpo_text", "grpo_mmu", "grpo_t2i")
# variant: (steps, lr, warm-up, batch sizes t2i/lm/mmu, coefficients t2i/lm/mmu). SFT weights the
# arithmetic 4× (measured on seed 0's pretrained model, rows ending at the evaluation's window:
# arithmetic 0.77 after SFT with 1.0, 0.98 with 4.0; image understanding unchanged). Image
# understanding is learnt in pretraining from MMU rows ending at the evaluation's 4-token window,
# 64 per step (seed 1: 0.852 with 32 rows of the CoT length, 0.900 with 64 of them, 0.928 with 64
# short ones); SFT then keeps it when plain answers outnumber CoT answers 3:1 at weight 1.0
# (seed 1: 0.925 after SFT, against 0.852 -> 0.774 with 1:1 at 0.5).
MIXED = {"pretrain": (1200, 3e-3, 50, (32, 32, 64), (1.0, 0.5, 1.0)),
         "sft": (300, 1e-3, 20, (16, 32, 32), (1.0, 4.0, 1.0))}
SFT_MMU_WEIGHTS = (3.0, 1.0)   # SFT's MMU rows: plain answers : CoT answers
GRPO_STEPS = {"grpo": 120, "grpo_text": 100, "grpo_mmu": 60, "grpo_t2i": 20}
GRPO_LR = {"grpo": 5e-5, "grpo_text": 5e-5, "grpo_mmu": 1e-4, "grpo_t2i": 1e-4}
# The unified stage ``grpo``: task -> (weight, i.e. its share of the 8 prompts per step; rewards).
GRPO_TASKS = {"text": (4.0, ""), "mmu": (2.0, ""), "t2i": (2.0, "mmada_jax.demo.rewards:t2i_rewards")}


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="pretrain", data="", steps=0, seed=0)
  if args.variant not in VARIANTS:
    raise ValueError(f"configs/demo.py: unknown variant {args.variant!r}; expected one of {VARIANTS}")
  if not args.data:
    raise ValueError("configs/demo.py needs data=PATH/demo_data.json (made by python -m mmada_jax.demo)")
  with open(args.data) as f:
    built = json.load(f)
  from mmada_jax.demo.data import data_config
  model = dict(built["model"])
  s, n = int(model.pop("max_text_len")), int(model.pop("num_image_tokens"))
  paths = built["paths"]

  c = common.base_config()
  c.seed = int(args.seed)
  c.log_every = 10
  c.mesh_shape = "fsdp=-1"
  c.data_source = "records"
  c.tensorboard = True
  c.model = common.model_config(**model)
  c.checkpoint = common.checkpoint_config(max_to_keep=2, async_save=True)
  c.sampling = common.sampling_config(
      every=0, text_prompts=["What is 3 + 4?"], t2i_prompts=[f"a handwritten digit {d}" for d in range(4)],
      gen_length=16, block_length=16, text_steps=16, t2i_steps=8, t2i_guidance_scale=2.0,
      image_tokenizer=paths["image_tokenizer"])

  if args.variant in MIXED:
    steps, lr, warmup, batches, coeffs = MIXED[args.variant]
    c.steps = int(args.steps) or steps
    c.checkpoint_every = c.steps
    c.sampling.every = c.steps
    c.data = data_config(built, stage=args.variant, batch_sizes=batches, seed=int(args.seed),
                         mmu_weights=SFT_MMU_WEIGHTS)
    c.optimizer = common.optimizer_config(lr=lr, warmup_steps=min(warmup, c.steps // 2), weight_decay=0.01,
                                          weight_decay_mask="matrices", grad_accum=1)
    c.stage = common.stage_config(name=args.variant, coeff_t2i=coeffs[0], coeff_lm=coeffs[1], coeff_mmu=coeffs[2],
                                  lm_format="lm" if args.variant == "pretrain" else "lm_chat")
    return c

  task = args.variant.split("_")[1] if "_" in args.variant else ""
  c.steps = int(args.steps) or GRPO_STEPS[args.variant]
  c.checkpoint_every = c.steps
  c.data = data_config(built, stage="sft", batch_sizes=(0, 0, 0), seed=int(args.seed))
  c.optimizer = common.optimizer_config(lr=GRPO_LR[args.variant], weight_decay=0.0, warmup_steps=0, grad_accum=1)
  c.stage = common.stage_config(name="unigrpo", lm_format="lm_chat")
  c.rl = common.rl_config()
  c.rl.task = task or "text"
  c.rl.prompt_source = "jsonl"
  c.rl.prompt_file = paths[f"grpo_{task}"] if task else ""
  c.rl.text_tokenizer = paths["text_tokenizer"]
  c.rl.thinking_prompt = bool(built.get("config", {}).get("thinking_prompt", False))
  c.rl.group_size, c.rl.prompts_per_step, c.rl.inner_updates = 8, 8, 2
  c.rl.kl_beta = 0.04
  c.rl.max_text_len = s
  if not task:   # one unified stage over the three tasks (docs/unigrpo.md)
    c.demo = to_config_dict(DemoConfig, classifier=paths["classifier"])
    c.rl.image_tokenizer = paths["image_tokenizer"]
    c.rl.tasks = tuple(_grpo_task(name, weight, rewards, paths, c.rl) for name, (weight, rewards) in GRPO_TASKS.items())
    return c
  if task == "t2i":
    c.demo = to_config_dict(DemoConfig, classifier=paths["classifier"])   # read by the rewards below
    c.rl.image_tokenizer = paths["image_tokenizer"]
    c.rl.rewards = "mmada_jax.demo.rewards:t2i_rewards"
    c.rl.t2i_steps, c.rl.t2i_guidance_scale = 8, 2.0
  else:
    # Text: semi-autoregressive blocks of 4 tokens (as the demo's evaluation decodes); one block
    # of 16 lets the confident trailing EOS padding be committed first and cut answers short.
    c.rl.gen_length, c.rl.block_length, c.rl.gen_steps = (16, 4, 16) if task == "text" else (4, 4, 4)
    c.rl.temperature = 0.7
  return c


def _grpo_task(name: str, weight: float, rewards: str, paths: dict, rl) -> dict:
  """One ``rl.tasks`` entry of the unified variant: the same prompts and sampler settings as the
  single-task variant ``grpo_<name>``."""
  out = dict(name=name, weight=weight, task=name, prompt_source="jsonl", prompt_file=paths[f"grpo_{name}"],
             rewards=rewards, thinking_prompt=bool(rl.thinking_prompt), max_text_len=int(rl.max_text_len))
  if name == "t2i":
    out.update(t2i_steps=8, t2i_guidance_scale=2.0)
  else:
    length, block, steps = (16, 4, 16) if name == "text" else (4, 4, 4)
    out.update(gen_length=length, block_length=block, gen_steps=steps, temperature=0.7)
  return out

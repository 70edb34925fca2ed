"""MMaDA-8B training stages of the original (spec §5 table), one variant per stage.

  python -m mmada_jax.train --config=configs/mmada_8b.py:stage1_1,root=/mnt/runs,data_root=/mnt/data \
      --workdir=/mnt/runs/stage1_1
  python -m mmada_jax.train --config=configs/mmada_8b.py:stage1_2,root=/mnt/runs,data_root=/mnt/data \
      --workdir=/mnt/runs/stage1_2

The workdir must be a file-system path shared by all hosts (NFS, or a bucket mounted with gcsfuse
on TPU VMs); ``root`` is where the stage workdirs live.

| variant  | init_from (under ROOT)           | S / N / L         | B/device t2i/lm/mmu | acc | lr / warm-up | steps | c t2i/lm/mmu |
|----------|----------------------------------|-------------------|---------------------|-----|--------------|-------|--------------|
| stage1_1 | llada_8b_instruct_mmada_vocab    | 128 / 256 / 387   | 7 / 2 / 6           | 2   | 1e-4 / 5000  | 500k  | 1.0/0.1/1.0  |
| stage1_2 | stage1_1                         | 256 / 256 / 515   | 7 / 2 / 3           | 2   | 5e-5 / 5000  | 1M    | 1.0/0.1/0.5  |
| stage1_3 | stage1_2                         | 512 / 1024 / 1539 | 4 / 1 / 1 (lm_chat) | 4   | 5e-5 / 5000  | 1M    | 1.0/0.4/0.5  |
| stage2_1 | stage1_3                         | 512 / 1024 / 1539 | 1 / 2 / 1 (lm_chat) | 4   | 5e-5 / 5000  | 1M    | 1.0/0.5/0.5  |
| stage2_2 | stage2_1/checkpoints/210000      | 512 / 1024 / 1539 | 1 / 2 / 1 (mix)     | 4   | 5e-5 / 5000  | 1M    | 0.05/0.6/0.4 |

Per-device batches are the original's per-GPU micro-batches; the global rows per optimizer step
(``data.<task>.batch_size``) are ``per_device × devices × grad_accum`` with ``devices`` (variant
argument, default 64 = the original's 8 nodes × 8 GPUs) so a run on ``devices`` chips keeps the
original micro-batch per chip. Stage 1.1 starts from LLaDA-8B-Instruct with the vocabulary grown to
134,656 rows (an original-layout directory at ROOT/llada_8b_instruct_mmada_vocab, or any path given
with ``--config.init_from``). Each later stage's ``init_from`` is the previous stage's workdir (its
newest checkpoint, params only). ``data_root``: folder holding the pre-tokenised datasets named
below (token shards for image data, jsonl/parquet for text) and the tokenizer; override any
``--config.data.<flow>.path`` as needed. Stage 2.2 mixes per batch: lm 0.02 RefinedWeb (pre-training
rows, whose all-zero prompt mask makes the lm_chat formula equal the lm one) / 0.98 chat, and mmu
CoT / LLaVA-665k / Clevr-CoGenT / Geo170K at 3.5 / 5.5 / 0.5 / 0.5.
The cosine horizon is the original's max steps (``optimizer.schedule_steps``) even when
``--config.steps`` stops earlier.

UniGRPO (stage 3, spec §8; reconstruction documented in docs/unigrpo.md), from stage2_2's workdir:

| variant          | task | prompts (under DATA_ROOT)       | rewards                                   |
|------------------|------|---------------------------------|-------------------------------------------|
| stage3_grpo      | text | rl_math_prompts.jsonl (GSM8K…)  | correctness 2.0 + format 0.5              |
| stage3_grpo_mmu  | mmu  | rl_mmu_prompts.jsonl (GeoQA…)   | MMU correctness 2.0 + format 0.5          |
| stage3_grpo_t2i  | t2i  | rl_t2i_prompts.jsonl            | CLIP 0.1 + ImageReward 0.1 (user scorers) |
| stage3_unigrpo   | all three, one stage (``rl.tasks``, equal weights) | the three files | each task's own; t2i: ``clip`` + ``image_reward`` on the devices (``clip/``, ``preference_head.safetensors``) |

G = 16 responses per prompt, μ = 5 inner updates, ε = 0.2, β = 0.04 (k3 KL to the frozen SFT
reference), AdamW lr 1e-6 without weight decay or warm-up, grad-acc 4, 50k steps. The t2i variant
needs ``--config.rl.rewards=module:function`` returning the image–text scorers.
"""
from __future__ import annotations

# mmada_jax.configs is this folder (setup.py's package_dir), installed editable or as a wheel.
from mmada_jax.configs import common

# name: (S, N, per-device (t2i, lm, mmu), grad_acc, lr, max_steps, coeffs, lm_format)
STAGES = {
    "stage1_1": (128, 256, (7, 2, 6), 2, 1e-4, 500_000, (1.0, 0.1, 1.0), "lm"),
    "stage1_2": (256, 256, (7, 2, 3), 2, 5e-5, 1_000_000, (1.0, 0.1, 0.5), "lm"),
    "stage1_3": (512, 1024, (4, 1, 1), 4, 5e-5, 1_000_000, (1.0, 0.4, 0.5), "lm_chat"),
    "stage2_1": (512, 1024, (1, 2, 1), 4, 5e-5, 1_000_000, (1.0, 0.5, 0.5), "lm_chat"),
    "stage2_2": (512, 1024, (1, 2, 1), 4, 5e-5, 1_000_000, (0.05, 0.6, 0.4), "lm_chat"),
}
INIT_FROM = {"stage1_1": "llada_8b_instruct_mmada_vocab", "stage1_2": "stage1_1", "stage1_3": "stage1_2", "stage2_1": "stage1_3",
             "stage2_2": "stage2_1/checkpoints/210000"}


def _src(data_root: str, name: str, **kw) -> dict:
  return dict(path=f"{data_root}/{name}", **kw)


def _data(c, stage: str, data_root: str) -> None:
  d = c.data
  d.text_tokenizer = f"{data_root}/tokenizer"
  t2i, lm, mmu = d.t2i, d.lm, d.mmu
  lm.strip_newlines, lm.max_chars = True, 8000          # RefinedWeb preprocessing
  if stage == "stage1_1":
    t2i.path = f"{data_root}/imagenet1k_tokens_256"      # caption = class name
    mmu.path = f"{data_root}/sa1b_cc12m_laion_aes_tokens_256"
    lm.path = f"{data_root}/refinedweb"
  elif stage == "stage1_2":
    t2i.path = f"{data_root}/sa1b_cc12m_laion_aes_tokens_256"
    t2i.first_sentence_prob = 0.5
    mmu.path = f"{data_root}/sa1b_cc12m_laion_aes_tokens_256"
    lm.path = f"{data_root}/refinedweb"
  else:
    t2i.path = f"{data_root}/journeydb_laion_aes_t2i2m_tokens_512"
    lm.kind = "lm_chat"
    lm.strip_newlines, lm.max_chars = False, 0
    if stage == "stage1_3":
      mmu.path = f"{data_root}/sa1b_cc12m_laion_tokens_512"
      lm.path = f"{data_root}/instruct_3_datasets"
      lm.max_tokens = 512
    elif stage == "stage2_1":
      mmu.sources = [_src(data_root, n) for n in ("ai2d_cot_tokens_512", "clevr_cot_tokens_512",
                                                  "docvqa_cot_tokens_512", "geo_cot_tokens_512",
                                                  "laion_caption_tokens_512")]
      lm.path = f"{data_root}/cot_sft_3"
      lm.max_tokens = 1536
    else:  # stage2_2: per-batch mixtures (the *_in_mmu_coeff weights; lm 0.02 RefinedWeb / 0.98 chat)
      mmu.sources = [_src(data_root, "mmu_cot_tokens_512", weight=3.5),
                     _src(data_root, "llava665k_tokens_512", weight=5.5),
                     _src(data_root, "clevr_cogent_tokens_512", weight=0.5),
                     _src(data_root, "geo170k_tokens_512", weight=0.5)]
      lm.sources = [_src(data_root, "refinedweb", kind="lm", weight=0.02),
                    _src(data_root, "cot_sft_3", kind="lm_chat", weight=0.98)]
      lm.max_tokens = 1536


# Saves the weight matmuls' outputs, recomputes the rest (norms, attention softmax, activations):
# on v5p the estimated MFU of stage 1.3 goes from 49% ('full') to 66% with >= 50% HBM free at
# 6 rows per chip per micro-batch (docs/aot.md). 16 GiB v5e chips need 'minimal' or 'full' plus
# tensor parallelism (see the table there).
REMAT = "dots_with_no_batch_dims"

GRPO_STAGES = {"stage3_grpo": "text", "stage3_grpo_mmu": "mmu", "stage3_grpo_t2i": "t2i", "stage3_unigrpo": ""}
VARIANTS = tuple(STAGES) + tuple(GRPO_STAGES)


def _grpo_config(args) -> "common.ml_collections.ConfigDict":
  """UniGRPO from the Mix-CoT checkpoint (stage 2.2) on the 8B model, S=512, N=1024."""
  task = GRPO_STAGES[args.variant]
  c = common.base_config()
  c.seed = 10086
  c.steps = 50_000
  c.log_every = 10
  c.checkpoint_every = 1_000
  c.mesh_shape = "fsdp=-1"
  c.data_source = "records"
  c.init_from = f"{args.root}/stage2_2"
  c.model = common.model_config(num_vq_tokens=1024, remat_policy=REMAT)
  c.data.max_text_len, c.data.num_image_tokens = 512, 1024
  c.data.text_tokenizer = f"{args.data_root}/tokenizer"
  for flow in ("t2i", "lm", "mmu"):
    c.data[flow].batch_size = 0
  c.optimizer = common.optimizer_config(lr=1e-6, weight_decay=0.0, warmup_steps=0, grad_accum=4,
                                        schedule_steps=50_000)
  c.stage = common.stage_config(name="unigrpo", lm_format="lm_chat")
  c.rl = common.rl_config()
  c.rl.task = task or "text"
  c.rl.group_size, c.rl.inner_updates = 16, 5
  c.rl.prompts_per_step = int(args.devices) // 4
  c.rl.prompt_file = f"{args.data_root}/rl_{task}_prompts.jsonl".replace("rl_text_", "rl_math_")
  c.rl.text_tokenizer = c.data.text_tokenizer
  c.rl.max_text_len = 512
  if task == "t2i":
    c.rl.image_tokenizer = f"{args.data_root}/magvitv2"
  else:
    c.rl.gen_length, c.rl.block_length, c.rl.gen_steps = 256, 64, 128
    c.rl.cache, c.rl.threshold = "prefix", 0.95
  if not task:   # stage3_unigrpo: the three tasks in one stage, equal weights (docs/unigrpo.md)
    c.rl.prompts_per_step = 3 * (int(args.devices) // 4)   # each task the single-task variants' rows
    c.rl.prompt_file, c.rl.image_tokenizer = "", f"{args.data_root}/magvitv2"
    c.rl.clip_model, c.rl.preference_head = f"{args.data_root}/clip", f"{args.data_root}/preference_head.safetensors"
    text = dict(gen_length=256, block_length=64, gen_steps=128, cache="prefix", threshold=0.95)
    c.rl.tasks = (
        dict(name="text", task="text", prompt_file=f"{args.data_root}/rl_math_prompts.jsonl", max_prompt_len=512, **text),
        dict(name="mmu", task="mmu", prompt_file=f"{args.data_root}/rl_mmu_prompts.jsonl", max_prompt_len=512 + 1027,
             **text),
        dict(name="t2i", task="t2i", prompt_file=f"{args.data_root}/rl_t2i_prompts.jsonl", max_text_len=512,
             rewards="clip,image_reward"))
  c.checkpoint = common.checkpoint_config(max_to_keep=3, keep_period=10_000)
  c.sampling = common.sampling_config(every=0)
  return c


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, variant="stage1_1", root="runs/mmada_8b", data_root="data/mmada", devices=64)
  if args.variant in GRPO_STAGES:
    return _grpo_config(args)
  if args.variant not in STAGES:
    raise ValueError(f"configs/mmada_8b.py: unknown stage {args.variant!r}; expected one of "
                     f"{sorted(STAGES) + sorted(GRPO_STAGES)}")
  s, n, per_dev, acc, lr, max_steps, coeffs, lm_format = STAGES[args.variant]
  c = common.base_config()
  c.seed = 10086
  c.steps = max_steps
  c.log_every = 50
  c.checkpoint_every = 10_000
  c.mesh_shape = "fsdp=-1"
  c.data_source = "records"
  c.init_from = f"{args.root}/{INIT_FROM[args.variant]}"
  c.model = common.model_config(num_vq_tokens=n, remat_policy=REMAT)
  c.data.max_text_len, c.data.num_image_tokens = s, n
  for task, b in zip(("t2i", "lm", "mmu"), per_dev):
    c.data[task].batch_size = b * int(args.devices) * acc
  _data(c, args.variant, args.data_root)
  c.optimizer = common.optimizer_config(lr=lr, warmup_steps=5000, grad_accum=acc, schedule_steps=max_steps)
  c.stage = common.stage_config(
      name="pretrain" if args.variant.startswith("stage1") else "sft",
      coeff_t2i=coeffs[0], coeff_lm=coeffs[1], coeff_mmu=coeffs[2], lm_format=lm_format,
      min_answer_length_lm=1 if args.variant == "stage2_2" else 0)
  c.checkpoint = common.checkpoint_config(max_to_keep=3, keep_period=50_000)
  guidance = 1.5 if args.variant == "stage1_1" else (3.0 if args.variant.startswith("stage1") else 5.0)
  c.sampling = common.sampling_config(every=0, t2i_guidance_scale=guidance,
                                      t2i_steps=12 if args.variant.startswith("stage1") else 20)
  return c

"""Evaluation presets: ``python -m mmada_jax.eval --config=configs/eval.py:TASK --workdir=OUT``.

The argument is the task, then optional ``key=value`` settings (``configs/eval.py:gsm8k,limit=50``);
``--config.model=DIR --config.text_tokenizer=PATH --config.data=FILE`` name the model and the
benchmark file. Each preset carries the settings published for that benchmark (sources inline).
"""
from __future__ import annotations

from mmada_jax.config_schema import to_config_dict
from mmada_jax.eval.config import EvalConfig

VARIANTS = ("gsm8k", "math", "mmlu", "arc_c", "hellaswag", "piqa", "winogrande", "truthfulqa", "gpqa", "cmmlu",
            "ceval", "vqav2", "pope", "mmmu", "geneval", "clip_score", "demo_arithmetic",
            "demo_mmu", "demo_t2i")

# Image understanding: VLMEvalKit-style defaults of the MMaDA evaluation wrapper for short-answer
# datasets (max_new_tokens = steps = block_length = 2); chat template on.
_MMU = dict(gen_length=2, steps=2, block_length=2, chat=True, batch_size=8)

_T2I = dict(steps=50, cfg=3.5, noise_schedule="cosine", batch_size=1)

PRESETS = {
    # GSM8K, 5-shot: the MMaDA repository's lm-eval script (gen_length 256, steps 256, block 64).
    # Alternatives: LLaDA base gen_length = steps = block_length = 1024; MMaDA paper text
    # settings gen_length 1024, steps 512, block 64.
    "gsm8k": dict(task="gsm8k", num_fewshot=5, gen_length=256, steps=256, block_length=64, batch_size=8),
    # MATH: the MMaDA paper's text settings (length 1024, 512 steps, block 64), chat template, 0-shot.
    "math": dict(task="math", gen_length=1024, steps=512, block_length=64, chat=True, batch_size=8),
    # MMLU, 5-shot likelihood: LLaDA base evaluation, mc_num 1 (a one-token answer is exact), CFG 0.
    "mmlu": dict(task="mmlu", num_fewshot=5, mc_num=1, cfg=0.0, batch_size=8),
    # ARC-Challenge, 0-shot likelihood: LLaDA base evaluation (batch 8, mc_num 128, CFG 0.5).
    "arc_c": dict(task="arc_c", num_fewshot=0, mc_num=128, cfg=0.5, batch_size=8),
    # The other likelihood tasks: LLaDA base evaluation (its evaluation/eval.sh: lm-eval tasks with
    # batch 8, mc_num 128 and the CFG weights below; MMLU-style single-letter tasks mc_num 1).
    # HellaSwag, 0-shot, CFG 0.5 (accuracy_norm is lm-eval's acc_norm).
    "hellaswag": dict(task="hellaswag", num_fewshot=0, mc_num=128, cfg=0.5, batch_size=8),
    # PIQA, 0-shot, CFG 0.5.
    "piqa": dict(task="piqa", num_fewshot=0, mc_num=128, cfg=0.5, batch_size=8),
    # WinoGrande, 5-shot, CFG 0 (partial scoring: the rest of the sentence after each option).
    "winogrande": dict(task="winogrande", num_fewshot=5, mc_num=128, cfg=0.0, batch_size=8),
    # TruthfulQA, 0-shot (its fixed QA primer), CFG 2.0: accuracy = MC1; mc2 (LLaDA's reported
    # truthfulqa_mc2) when the records carry mc2_targets.
    "truthfulqa": dict(task="truthfulqa", num_fewshot=0, mc_num=128, cfg=2.0, batch_size=8),
    # GPQA (main), 5-shot, CFG 0.5.
    "gpqa": dict(task="gpqa", num_fewshot=5, mc_num=128, cfg=0.5, batch_size=8),
    # CMMLU and C-Eval (validation), 5-shot, CFG 0, mc_num 1 (single-letter answers are exact).
    "cmmlu": dict(task="cmmlu", num_fewshot=5, mc_num=1, cfg=0.0, batch_size=8),
    "ceval": dict(task="ceval", num_fewshot=5, mc_num=1, cfg=0.0, batch_size=8),
    "vqav2": dict(task="vqav2", **_MMU),
    "pope": dict(task="pope", **_MMU),
    "mmmu": dict(task="mmmu", **_MMU),
    # Text-to-image: the MMaDA paper's T2I settings (1024 image tokens, cosine schedule, 50 steps,
    # CFG 3.5); the image-token count is the checkpoint's generation config (1024 for MMaDA 8B).
    # GenEval: 4 images per prompt (GenEval's protocol), scored by GenEval's detector afterwards.
    "geneval": dict(task="geneval", **_T2I, n_samples=4),
    # CLIP score (100·max(cos, 0)) of one image per prompt; needs --config.clip_model=DIR.
    "clip_score": dict(task="clip_score", **_T2I, n_samples=1),
    # The offline demo's evaluation (``python -m mmada_jax.demo`` writes WORKDIR/eval/*.jsonl):
    # arithmetic as GSM8K records, the bare question in the chat template, greedy decoding of 16
    # tokens in blocks of 4 (one step per token).
    "demo_arithmetic": dict(task="gsm8k", prompt="{question}", chat=True, gen_length=16, block_length=4, steps=16,
                            batch_size=32),
    # Held-out digits: "What digit is shown?" -> 4 tokens in one block, exact match of the answer.
    "demo_mmu": dict(task="vqav2", prompt="{question}", chat=True, gen_length=4, block_length=4, steps=4,
                     batch_size=32),
    # Captions -> one image each (8 steps, CFG 2.0), scored by the demo's digit classifier.
    "demo_t2i": dict(task="geneval", steps=8, cfg=2.0, noise_schedule="cosine", n_samples=1, batch_size=1),
}


def get_config(arg: str | None = None):
  """The preset named by the first word of ``arg``, with ``key=value`` overrides after it."""
  words = [w for w in (arg or "").split(",") if w]
  if not words or words[0] not in PRESETS:
    raise ValueError(f"configs/eval.py: name a task first, one of {VARIANTS} (got {arg!r})")
  c = to_config_dict(EvalConfig, **PRESETS[words[0]])
  for w in words[1:]:
    key, eq, value = w.partition("=")
    if not eq or key not in c:
      raise ValueError(f"configs/eval.py: bad setting {w!r}; write key=value with a key of {sorted(c.keys())}")
    kind = type(c[key]) if c[key] is not None else (int if key == "limit" else float)
    c[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return c

"""The evaluation config: one section, :class:`EvalConfig` (``configs/eval.py`` holds the presets)."""
from __future__ import annotations

import dataclasses
from typing import Literal

TASKS = ("gsm8k", "math", "mmlu", "arc_c", "hellaswag", "piqa", "winogrande", "truthfulqa", "gpqa", "cmmlu", "ceval",
         "vqav2", "pope", "mmmu", "geneval", "clip_score")
Task = Literal["gsm8k", "math", "mmlu", "arc_c", "hellaswag", "piqa", "winogrande", "truthfulqa", "gpqa", "cmmlu",
               "ceval", "vqav2", "pope", "mmmu", "geneval", "clip_score"]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Settings of ``python -m mmada_jax.eval`` (every key of ``--config.KEY=VALUE``).

  task: the benchmark; model / text_tokenizer / image_tokenizer: directories or files as for
  ``MMaDA.from_pretrained`` / ``TextTokenizer.from_file`` / ``ImageTokenizer.from_pretrained``
  (image tasks only); data: the benchmark file (.jsonl or .parquet, the benchmark's field names);
  fewshot_data: the file the ``num_fewshot`` examples are taken from (its first records);
  batch_size: prompts per sampler call, or Monte-Carlo copies per forward pass (likelihood tasks);
  limit: only the first ``limit`` examples (None: all); gen_length / block_length / steps / cache
  / threshold: the text sampler's settings; chat: render prompts with the chat template;
  mc_num / cfg: the likelihood estimator's samples and CFG weight (text-to-image tasks: ``cfg`` is
  the image sampler's CFG weight, ``steps`` its steps); seed: sampler / estimator seed;
  n_samples / noise_schedule: images per prompt and the mask schedule (text-to-image tasks);
  clip_model: a local Hugging Face CLIP directory (``clip_score``; optional for ``geneval``);
  prompt: a format string with ``{question}`` that replaces the task's prompt (text and image
  understanding tasks, no few-shot; ``"{question}"``: the bare question), '' for the task's own;
  mesh_shape: run data-parallel on a mesh of this process's devices (``make_mesh`` syntax, e.g.
  ``"data=-1"`` or ``"fsdp=8"``; parameters by the sharding rules, batches by the batch rule),
  '' for one device; per-example outputs do not depend on it.
  """
  task: Task = "gsm8k"
  model: str = ""
  text_tokenizer: str = ""
  image_tokenizer: str = ""
  data: str = ""
  fewshot_data: str = ""
  batch_size: int = 8
  limit: int | None = None
  gen_length: int = 256
  block_length: int = 64
  steps: int = 256
  cache: Literal["none", "prefix", "dual"] = "none"
  threshold: float | None = None
  num_fewshot: int = 0
  chat: bool = False
  mc_num: int = 128
  cfg: float = 0.0
  seed: int = 0
  n_samples: int = 4
  noise_schedule: Literal["cosine", "linear", "sigmoid"] = "cosine"
  clip_model: str = ""
  prompt: str = ""
  mesh_shape: str = ""

  def __post_init__(self):
    for name in ("batch_size", "gen_length", "block_length", "steps", "mc_num", "n_samples"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.{name}={getattr(self, name)} must be >= 1")
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"config.limit={self.limit} must be >= 1 (or None for all examples)")
    if self.num_fewshot < 0 or self.cfg < 0:
      raise ValueError("config.num_fewshot and config.cfg must be >= 0")
    if self.prompt:
      try:
        ok = self.prompt.format(question="\0") != self.prompt
      except (KeyError, IndexError, ValueError):
        ok = False
      if not ok:
        raise ValueError(f"config.prompt={self.prompt!r} must be a format string whose only field is {{question}}")
      if self.num_fewshot:
        raise ValueError("config.prompt replaces the task's few-shot prompt; set config.num_fewshot=0")

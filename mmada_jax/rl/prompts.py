"""UniGRPO prompts: where they come from and how a step's prompts are batched.

* :class:`PromptIterator`: the trainer's batch iterator: every prompt batch μ times, tagged
  ``(index, inner)``, this process's slice of it; checkpointable;
* sources (``batch_index -> list of global records``): :func:`list_source` over records from
  :func:`load_jsonl_records` (a JSONL file) or :func:`toy_digit_records` (the copy-the-digit task);
* the task mixture of a unified stage: :func:`mixture_counts` (each task's prompts per step from
  its weight) and :func:`mixture_source` (``batch_index -> {task: list of global records}``);
* :func:`pad_prompts`: left-padding to the one compiled prompt width.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mmada_jax.data.jsonl import read_json_lines
from mmada_jax.prompting.special_tokens import SpecialTokens

THINKING_PROMPT = ("You should first think about the reasoning process in the mind and then provide the user "
                   "with the answer. The reasoning process is enclosed within <think> </think> tags, i.e. "
                   "<think> reasoning process here </think> answer here\n")
"""The "thinking mode" system sentence (``app.py``, ``training/data.py``)."""

Record = Mapping[str, Any]
"""A prompt: ``prompt_ids`` (list[int]: the full generation prompt for text/MMU, the caption ids
for T2I), ``prompt`` (str), and optionally ``answer``, ``choices``, ``label``."""


class PromptIterator:
  """Yields ``{"index": b, "inner": n, "records": [...]}`` — prompt batch b, each μ times.

  ``source(batch_index) -> list of global records`` (prompts_per_step of them), or a mixture's
  ``{task: list}``; this process keeps its contiguous slice (of every task's list). Checkpointable:
  the state is the number of batches yielded — every source is a pure function of the batch
  index, so that number restores the mixture exactly (which task's prompts, in which order).
  """

  def __init__(self, source: Callable[[int], Any], inner_updates: int,
               process_index: int = 0, process_count: int = 1, stage: Any = None):
    self.source, self.mu = source, int(inner_updates)
    self.pi, self.pc = int(process_index), int(process_count)
    self.calls = 0
    self.stage = stage   # GRPOStage: its mid-cycle state and step metrics travel with this iterator

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    index, inner = divmod(self.calls, self.mu)
    got = self.source(index)
    if isinstance(got, Mapping):
      records = {k: self._slice(list(v), f"task {k!r}: ") for k, v in got.items()}
    else:
      records = self._slice(list(got), "")
    self.calls += 1
    return {"index": index, "inner": inner, "records": records}

  def _slice(self, records: list, what: str) -> list:
    if len(records) % self.pc:
      raise ValueError(f"{what}{len(records)} prompts per step do not split over {self.pc} processes")
    per = len(records) // self.pc
    return records[self.pi * per:(self.pi + 1) * per]

  def get_state(self) -> dict[str, Any]:
    """``{"calls": n}``, and in mid-cycle (n not a multiple of μ) the stage's ``cycle``
    (:meth:`mmada_jax.rl.stage.GRPOStage.cycle_state`)."""
    out: dict[str, Any] = {"calls": self.calls}
    if self.stage is not None and self.calls % self.mu:
      out["cycle"] = self.stage.cycle_state()
    return out

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.calls = int(state["calls"])
    if self.stage is not None:
      self.stage.restore_cycle(state.get("cycle"))

  def metrics(self) -> dict[str, float]:
    """The stage's host scalars of the latest step (``time/*``), or none without a stage."""
    return self.stage.metrics() if self.stage is not None else {}


def list_source(records: Sequence[Record], prompts_per_step: int, seed: int = 0,
                shuffle: bool = True) -> Callable[[int], list[Record]]:
  """Batches of ``prompts_per_step`` records over endless epochs (reshuffled per epoch by seed)."""
  records = list(records)
  if not records:
    raise ValueError("the prompt source is empty")
  n = len(records)

  def source(index: int) -> list[Record]:
    out = []
    for k in range(index * prompts_per_step, (index + 1) * prompts_per_step):
      epoch, pos = divmod(k, n)
      order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
      out.append(records[int(order[pos])])
    return out
  return source


def mixture_counts(weights: Sequence[float], total: int) -> list[int]:
  """Prompts per step of each task: ``total`` apportioned by ``weights`` (largest remainder; ties
  to the earlier task). Fixed per step (every task compiles to one shape); a task that would get
  no prompt is an error naming the weights."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or not w.size or np.any(~(w > 0)):
    raise ValueError(f"task weights must be positive, got {list(weights)}")
  quota = w / w.sum() * int(total)
  counts = np.floor(quota + 1e-9).astype(int)
  order = sorted(range(w.size), key=lambda i: (-(quota[i] - counts[i]), i))
  for i in order[:int(total) - int(counts.sum())]:
    counts[i] += 1
  if np.any(counts < 1):
    raise ValueError(f"rl.prompts_per_step={total} gives task(s) {np.flatnonzero(counts < 1).tolist()} no prompt "
                     f"with weights {list(weights)}; raise prompts_per_step or those weights")
  return counts.tolist()


def mixture_source(sources: Mapping[str, Callable[[int], Sequence[Record]]]) -> Callable[[int], dict[str, list]]:
  """``batch_index -> {task: that task's global records of batch index}`` (each task's own
  ``list_source``, built with its :func:`mixture_counts` share and its own seed)."""
  sources = dict(sources)
  if not sources:
    raise ValueError("the task mixture has no task")

  def source(index: int) -> dict[str, list]:
    return {name: list(src(index)) for name, src in sources.items()}
  return source


def toy_digit_records(specials: SpecialTokens, num_digits: int = 10) -> list[dict[str, Any]]:
  """The toy verifiable task: prompt ``[BOS, d]`` (d = token id 0..num_digits-1), answer d.

  Its reward (:func:`mmada_jax.rl.rewards.toy_digit_reward`, ``digit_match``) is the fraction of response tokens, up to the first stop
  token, equal to d: a model must learn to copy the prompt's digit.
  """
  return [{"prompt_ids": [specials.bos, d], "prompt": str(d), "answer": d} for d in range(num_digits)]


def load_jsonl_records(path: str, task: str, tokenizer: Any, specials: SpecialTokens,
                       thinking_prompt: bool = True) -> list[dict[str, Any]]:
  """Prompt records from a JSONL file: one JSON object per line with ``question`` (or ``prompt``),
  ``answer``, and optionally ``choices`` (option texts), ``image_codes`` (MMU: the pre-tokenised
  image's codes) and ``label`` (T2I: the class a classifier reward checks).

  text / MMU prompts are the chat template with a generation prompt (the "think" sentence
  prepended to the question when ``thinking_prompt``); MMU prepends
  ``[mmu] [soi] image [eoi]`` (``mmu_gen_prompt``) from ``image_codes``. T2I keeps the caption ids.
  """
  out = []
  for line_no, row in read_json_lines(path):
    text = row.get("question", row.get("prompt"))
    if text is None:
      raise ValueError(f"{path}:{line_no}: a record needs 'question' or 'prompt'")
    rec = {"prompt": str(text), "answer": row.get("answer"), "choices": row.get("choices"),
           "label": row.get("label")}
    if task == "t2i":
      rec["prompt_ids"] = list(tokenizer.encode(str(text)))
    else:
      content = (THINKING_PROMPT + str(text)) if thinking_prompt else str(text)
      ids = list(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
      if task == "mmu":
        codes = row.get("image_codes")
        if codes is None:
          raise ValueError(f"{path}:{line_no}: an MMU record needs 'image_codes' (pre-tokenised image)")
        ids = ([specials.mmu, specials.soi] + [int(c) + specials.image_offset for c in codes]
               + [specials.eoi] + ids)
      rec["prompt_ids"] = ids
    out.append(rec)
  return out


def pad_prompts(prompt_ids: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to ``width``: (ids int32 [n, width], attention_mask int32 [n, width])."""
  ids = np.full((len(prompt_ids), width), pad_id, np.int32)
  attn = np.zeros((len(prompt_ids), width), np.int32)
  for i, p in enumerate(prompt_ids):
    p = list(p)
    if len(p) > width:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than rl.max_prompt_len={width}")
    if p:
      ids[i, width - len(p):] = p
      attn[i, width - len(p):] = 1
  return ids, attn

"""A small deterministic, checkpointable mixed-task data source (for tests and CPU demos).

It emits the same per-step contract as the real pipeline (``mmada_jax.data``)::

  {"t2i": {"input_ids", "attention_mask"}, "lm": {"input_ids", "prompt_mask"},
   "mmu": {"input_ids", "prompt_mask"}}        numpy int32 [B_task_local, L]

built with the real prompt builders over a tiny vocabulary (:data:`TOY_SPECIALS`):

* class ``c`` in [0, classes): caption = words of class c; image = a class-specific code pattern
  with 10% of the codes replaced at random (t2i rows, and the image of mmu rows);
* lm rows: arithmetic progressions of words, EOS-padded (learnable, so the loss falls);
* mmu rows: a fixed chat question about the image; the answer is the caption.

Batch sizes are ``data.<task>.batch_size`` global rows per step (as the real pipeline).
Batch ``s`` is a pure function of ``(seed, s)``: the global batch is generated and each process
keeps its contiguous slice of rows, so 1 and N processes see the same global batch. The state is
``{"step": s}``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmada_jax.prompting import builders
from mmada_jax.prompting.special_tokens import SpecialTokens

TEXT_WORDS = 80
_NAMES = ("bos", "eos", "soi", "eoi", "sov", "eov", "t2i", "mmu", "t2v", "v2v", "lvg", "ipad", "r2i",
          "mask", "start_header", "end_header", "eot_id")
IMAGE_OFFSET = 128
TOY_SPECIALS = SpecialTokens(**{n: TEXT_WORDS + i for i, n in enumerate(_NAMES)}, pad=TEXT_WORDS + 1,
                             image_offset=IMAGE_OFFSET)
"""Special ids 80…96 (MASK = 93), image token = code + 128."""
TASK_IDS = {"t2i": 1, "lm": 2, "mmu": 3}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """The ``config.toy`` section, read with ``data_source='toy'``: the codebook size of the toy
  images, the number of caption classes, and whether lm rows are chat-formatted (SFT)."""
  codebook_size: int = 64
  classes: int = 8
  chat_lm: bool = False


def toy_model_fields(codebook_size: int, num_image_tokens: int) -> dict[str, int]:
  """MMaDAConfig fields that make the model's vocabulary fit the toy ids."""
  return dict(vocab_size=IMAGE_OFFSET + codebook_size, mask_token_id=TOY_SPECIALS.mask,
              eos_token_id=TOY_SPECIALS.eos, pad_token_id=TOY_SPECIALS.pad, llm_vocab_size=IMAGE_OFFSET,
              codebook_size=codebook_size, num_vq_tokens=num_image_tokens)


class ToyMixedIterator:
  """Iterator over per-host mixed batches; ``get_state``/``set_state`` make it resumable."""

  def __init__(self, data_cfg: ConfigDict, toy_cfg: ToyConfig | ConfigDict, process_index: int, process_count: int,
               seed: int):
    self.s = int(data_cfg.max_text_len)
    self.n = int(data_cfg.num_image_tokens)
    self.codebook = int(toy_cfg.codebook_size)
    self.classes = int(toy_cfg.classes)
    self.sft = bool(toy_cfg.chat_lm)
    self.length = self.s + self.n + 3
    self.sizes = {t: int(data_cfg[t].batch_size) for t in TASK_IDS if int(data_cfg[t].batch_size) > 0}
    self.pi, self.pc, self.seed = int(process_index), int(process_count), int(seed)
    if not self.sizes:
      raise ValueError("every flow has batch_size 0: set data.t2i/lm/mmu.batch_size")
    for task, b in self.sizes.items():
      if b % self.pc:
        raise ValueError(f"data.{task}.batch_size={b} (global rows per step) must be a multiple of "
                         f"the process count {self.pc}")
    if self.classes * 8 > TEXT_WORDS or self.classes < 1:
      raise ValueError(f"toy.classes={self.classes} must lie in [1, {TEXT_WORDS // 8}]")
    self.step = 0

  # -- state
  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "seed": self.seed}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"data state was written with seed {state['seed']}, this run uses {self.seed}")
    self.step = int(state["step"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    out = {task: self._task(task, self.step) for task in self.sizes}
    self.step += 1
    return out

  # -- generation
  def _rows(self, task: str) -> slice:
    per = self.sizes[task] // self.pc
    return slice(self.pi * per, (self.pi + 1) * per)

  def _caption(self, rng: np.random.Generator, c: int) -> list[int]:
    k = int(rng.integers(2, 7))
    return [c * 8 + int(j) for j in rng.permutation(8)[:k]]

  def _image(self, rng: np.random.Generator, c: int) -> np.ndarray:
    codes = (c * 9 + np.arange(self.n) * 5) % self.codebook
    noise = rng.random(self.n) < 0.1
    codes = np.where(noise, rng.integers(0, self.codebook, self.n), codes)
    return codes + IMAGE_OFFSET

  def _task(self, task: str, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, TASK_IDS[task], step])
    b = self.sizes[task]
    sp = TOY_SPECIALS
    if task == "t2i":
      cls = rng.integers(0, self.classes, b)
      caps = [self._caption(rng, int(c)) for c in cls]
      imgs = np.stack([self._image(rng, int(c)) for c in cls])
      pb = builders.t2i_prompt(caps, imgs, self.s, specials=sp, rng=rng)
      keep = {"input_ids": pb.input_ids, "attention_mask": pb.attention_mask}
    elif task == "lm":
      rows = []
      for _ in range(b):
        a, d = int(rng.integers(0, TEXT_WORDS)), int(rng.integers(1, 5))
        k = int(rng.integers(4, self.length - 2))
        seq = [(a + d * i) % TEXT_WORDS for i in range(k)]
        if self.sft:
          seq = [sp.start_header, 70, sp.end_header, a % TEXT_WORDS, sp.eot_id, sp.start_header, 71,
                 sp.end_header] + seq[:max(1, k - 8)]
        rows.append(seq)
      pb = (builders.lm_chat_prompt if self.sft else builders.lm_prompt)(rows, self.length, specials=sp)
      keep = {"input_ids": pb.input_ids, "prompt_mask": pb.prompt_mask}
    else:
      cls = rng.integers(0, self.classes, b)
      imgs = np.stack([self._image(rng, int(c)) for c in cls])
      q = [sp.start_header, 72, sp.end_header, 73, 74, sp.eot_id, sp.start_header, 75, sp.end_header]
      texts = [q + self._caption(rng, int(c)) for c in cls]
      pb = builders.mmu_prompt(imgs, texts, self.s, specials=sp)
      keep = {"input_ids": pb.input_ids, "prompt_mask": pb.prompt_mask}
    rows = self._rows(task)
    return {k: np.ascontiguousarray(v[rows], dtype=np.int32) for k, v in keep.items()}


def make_toy_iterator(data_cfg: ConfigDict, toy_cfg: ToyConfig | ConfigDict, process_index: int, process_count: int,
                      seed: int) -> ToyMixedIterator:
  return ToyMixedIterator(data_cfg, toy_cfg, process_index, process_count, seed)

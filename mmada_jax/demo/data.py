"""``build_demo_data``: every artifact the demo's MMaDA training reads, built offline from a seed.

Layout under ``WORKDIR`` (formats of :mod:`mmada_jax.data` unless noted)::

  tokenizers/text/         tokenizer.json (byte-level BPE with the MMaDA special tokens)
  tokenizers/magvit/       config.json + pytorch_model.safetensors (ImageTokenizer.save_pretrained)
  classifier.pkl           DigitClassifier (pickled scikit-learn model; mmada_jax.demo.classifier)
  data/t2i_train/          token shards: codes + "text" (caption), "label", "id"          (t2i flow)
  data/mmu_train/          token shards: codes + "messages" (question -> "3"), ...          (mmu flow)
  data/mmu_cot_train/      token shards: codes + "messages" (question -> "<think> … </think> 3")
  data/lm_text.jsonl       {"text"}: arithmetic statements and number words                 (lm flow)
  data/sft_chat.jsonl      {"messages"}: arithmetic question -> CoT answer             (lm_chat flow)
  data/grpo_text.jsonl     {"question", "answer", "a", "op", "b"}     (rl.prompt_file, task text)
  data/grpo_mmu.jsonl      {"question", "answer", "image_codes", "label"}          (task mmu)
  data/grpo_t2i.jsonl      {"prompt", "label"}                                     (task t2i)
  data/eval_arith.jsonl    every arithmetic problem, as grpo_text
  data/eval_mmu.jsonl      the test-split images, as grpo_mmu
  data/eval_t2i.jsonl      ``t2i_eval_per_digit`` captions per digit, as grpo_t2i
  data/test_images.npz     test split: images uint8 [n, R, R, 3], labels, codes int32 [n, N]
  demo_data.json           the returned dict (paths, stats, model suggestion)

Train and test images never mix: the MAGVIT, the classifier and the t2i/mmu training data use the
train split only; ``eval_mmu`` and ``test_images`` hold the test split. The MAGVIT and the MMU data
(by default; t2i optionally) also use randomly jittered copies of the train images
(:func:`mmada_jax.demo.digits.jitter`), more variety for answering about unseen test digits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from typing import Any, Callable, Sequence

import numpy as np

from mmada_jax.data import records
from mmada_jax.demo import arithmetic, digits
from mmada_jax.demo.classifier import train_classifier
from mmada_jax.demo.tokenizers import (MagvitTrainConfig, build_text_tokenizer, codebook_usage, decode_codes,
                                       demo_magvit_config, encode_images, train_magvit)

RESULT_NAME = "demo_data.json"
ARITH_GEN_LENGTH = 16
"""Tokens the demo's arithmetic evaluation and text UniGRPO generate after the prompt (the
``demo_arithmetic`` preset of ``configs/eval.py``): SFT chat rows end exactly there."""
MMU_GEN_LENGTH = 4
"""Tokens the demo's image-understanding evaluation and MMU UniGRPO generate after the question
(the ``demo_mmu`` preset): pretraining's plain MMU rows end exactly there."""


@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
  """What :func:`build_demo_data` builds (sizes in images, rows or tokens as named)."""
  resolution: int = 16                 # image side R in pixels (the MAGVIT gives (R/4)² codes)
  codebook_bits: int = 8               # LFQ bits K: 2**K image codes
  test_fraction: float = 0.2
  text_vocab_size: int = 512
  magvit: MagvitTrainConfig = MagvitTrainConfig(steps=600, batch_size=64, lr=3e-3)
  max_operand: int = 5
  ops: tuple[str, ...] = arithmetic.OPS
  lm_rows: int = 2000
  facts_per_row: int = 3
  word_row_fraction: float = 0.1       # share of lm rows stating number words ("three is 3.")
  mmu_augment_copies: int = 3          # jittered copies of each train image added to the MMU data
  t2i_augment_copies: int = 0          # ... and to the t2i data
  t2i_eval_per_digit: int = 12
  grpo_mmu_images: int = 256
  thinking_prompt: bool = False        # prepend rl.prompts.THINKING_PROMPT to SFT questions
  classifier_kind: str = "mlp"
  shard_size: int = 512

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["ops"] = list(d["ops"])
    return d


def sub_seed(seed: int, name: str) -> int:
  """A 32-bit seed for one named part, derived from the demo seed."""
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]).generate_state(1)[0])


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Rows of a JSON-lines file (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_token_shards(folder: str, codes: np.ndarray, fields: Sequence[dict[str, Any]], *, grid: Sequence[int],
                       codebook_size: int, resolution: int, tokenizer_info: dict[str, Any], source: str,
                       shard_size: int = 512) -> str:
  """A token-shard folder (:mod:`mmada_jax.data.records`) of codes int [n, N] with per-row JSON fields;
  replaces ``folder``. Returns it."""
  from array_record.python.array_record_module import ArrayRecordWriter
  codes = np.asarray(codes)
  if len(codes) != len(fields):
    raise ValueError(f"{len(codes)} code rows for {len(fields)} field rows")
  if os.path.exists(folder):
    shutil.rmtree(folder)
  os.makedirs(folder)
  n_shards = max(1, math.ceil(len(codes) / shard_size))
  shards, names = [], set()
  for s in range(n_shards):
    lo, hi = s * shard_size, min(len(codes), (s + 1) * shard_size)
    name = records.shard_name(s, n_shards)
    w = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    for i in range(lo, hi):
      w.write(records.encode_record(codes[i], fields[i]))
      names.update(fields[i])
    w.close()
    shards.append({"file": name, "count": hi - lo})
  manifest = {
      "format": records.FORMAT_NAME, "version": records.FORMAT_VERSION, "count": int(len(codes)),
      "num_tokens": int(codes.shape[1]), "grid": [int(g) for g in grid], "codebook_size": int(codebook_size),
      "code_dtype": "uint16", "resolution": int(resolution), "resize": "squash", "shards": shards,
      "text_fields": sorted(names), "skipped": {"count": 0, "reasons": {}}, "tokenizer": tokenizer_info, "source": source,
      "created": None,
  }
  records.write_json_atomic(os.path.join(folder, records.MANIFEST_NAME), manifest)
  return folder


def number_word_texts(rows: int, seed: int) -> list[str]:
  """Rows linking digits and words, e.g. ``"three is 3. the number seven is written 7."``."""
  rng = np.random.default_rng(seed)
  forms = ("{w} is {d}.", "the number {w} is written {d}.", "{d} is {w}.")
  out = []
  for _ in range(rows):
    parts = [forms[int(rng.integers(len(forms)))].format(w=digits.DIGIT_WORDS[d], d=d)
             for d in rng.integers(0, 10, 3)]
    out.append(" ".join(parts))
  return out


def tokenizer_corpus(problems: Sequence[arithmetic.Problem], thinking_prompt: bool) -> list[str]:
  """Every kind of text the demo tokenises (captions, MMU turns, arithmetic, chat-template words)."""
  texts = [digits.caption(d, t) for d in range(10) for t in range(len(digits.CAPTION_TEMPLATES))]
  texts += [digits.mmu_question(q, cot) for q in range(len(digits.MMU_QUESTIONS)) for cot in (False, True)]
  texts += [digits.mmu_answer(d, cot) for d in range(10) for cot in (False, True)]
  texts += [p.question for p in problems] + [p.cot() for p in problems] + [p.statement for p in problems]
  texts += number_word_texts(50, 0)
  texts += ["user\nassistant\nsystem\n"] * 20
  if thinking_prompt:
    from mmada_jax.rl.prompts import THINKING_PROMPT
    texts += [THINKING_PROMPT] * 20
  return texts


def _text_lengths(tok, problems: Sequence[arithmetic.Problem], thinking_prompt: bool,
                  lm_rows: Sequence[str]) -> dict[str, int]:
  """Longest token counts: ``t2i_core`` ([t2i] BOS caption EOS; must be <= S + 1), ``mmu_text``
  (BOS chat EOS; <= S), ``lm_chat`` and ``lm_text`` (BOS text EOS; <= L), ``arith_answer`` /
  ``mmu_cot_answer`` (CoT response + <|eot_id|>: the generation lengths the samplers need),
  ``lm_chat_prompt`` / ``mmu_prompt`` (BOS chat prompt with the generation header: where
  generation starts; ``mmu_prompt``: the plain questions)."""
  system = None
  if thinking_prompt:
    from mmada_jax.rl.prompts import THINKING_PROMPT
    system = THINKING_PROMPT
  caps = [digits.caption(d, t) for d in range(10) for t in range(len(digits.CAPTION_TEMPLATES))]
  t2i = max(len(tok.encode(c, add_special_tokens=False)) for c in caps) + 3
  mmu = max(len(tok.apply_chat_template(digits.mmu_messages(d, q, cot), add_generation_prompt=False)) + 1
            for d in range(10) for q in range(len(digits.MMU_QUESTIONS)) for cot in (False, True))
  chat = max(len(tok.apply_chat_template(arithmetic.chat_messages(p, system), add_generation_prompt=False)) + 1
             for p in problems)
  chat_prompt = max(len(tok.apply_chat_template(arithmetic.chat_messages(p, system)[:1], add_generation_prompt=True))
                    for p in problems)
  answer = max(len(tok.encode(p.cot() + "<|eot_id|>", add_special_tokens=False)) for p in problems)
  mmu_answer = max(len(tok.encode(digits.mmu_answer(d, True) + "<|eot_id|>", add_special_tokens=False))
                   for d in range(10))
  mmu_prompt = max(len(tok.apply_chat_template(digits.mmu_messages(0, q)[:1], add_generation_prompt=True))
                   for q in range(len(digits.MMU_QUESTIONS)))
  mmu_plain = max(len(tok.apply_chat_template(digits.mmu_messages(d, q), add_generation_prompt=False)) + 1
                  for d in range(10) for q in range(len(digits.MMU_QUESTIONS)))
  lm = max(len(ids) for ids in tok.encode_batch(list(lm_rows), add_special_tokens=False)) + 2
  return {"t2i_core": t2i, "mmu_text": mmu, "lm_chat": chat, "lm_chat_prompt": chat_prompt, "lm_text": lm,
          "arith_answer": answer, "mmu_cot_answer": mmu_answer, "mmu_prompt": mmu_prompt,
          "mmu_plain_text": mmu_plain}


def demo_model_config(tokenizer, codebook_size: int = 256, num_image_tokens: int = 16,
                      max_text_len: int = 32) -> dict[str, Any]:
  """Suggested ``MMaDAConfig`` fields (plus ``max_text_len`` S and ``num_image_tokens`` N) for the demo.

  vocab = len(tokenizer) + codebook_size (image code c is token c + len(tokenizer)); ~1M parameters:
  d_model 128, 4 layers, 4 heads (2 KV heads), MLP 384; rows of L = S + N + 3 tokens. The layers
  are unrolled (``scan_layers=False``; same parameter layout): on XLA:CPU the demo's pretraining
  step runs 24 % faster than as a scan (5.88 against 4.74 steps/s, 2 cores).
  """
  from mmada_jax.prompting.special_tokens import SpecialTokens
  sp = SpecialTokens.from_tokenizer(tokenizer)
  n_text = len(tokenizer)
  return {"vocab_size": n_text + int(codebook_size), "llm_vocab_size": n_text, "codebook_size": int(codebook_size),
          "num_vq_tokens": int(num_image_tokens), "mask_token_id": sp.mask, "eos_token_id": sp.eos,
          "pad_token_id": sp.pad, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "n_layers": 4,
          "mlp_hidden_size": 384, "max_sequence_length": 128, "rope_theta": 10000.0,
          "param_dtype": "float32", "dtype": "float32", "scan_layers": False,
          "max_text_len": int(max_text_len), "num_image_tokens": int(num_image_tokens)}


def data_config(result: dict[str, Any], stage: str = "pretrain", batch_sizes: Sequence[int] = (16, 16, 16),
                seed: int | None = None, mmu_weights: Sequence[float] = (1.0, 1.0)):
  """The ``config.data`` section reading the built data with the grain pipeline.

  ``stage``: ``pretrain`` (t2i captions, lm plain text, mmu plain answers) or ``sft`` (mixed CoT:
  t2i captions, lm_chat arithmetic CoT, mmu plain answers mixed with CoT answers to the
  " Think first." questions, ``mmu_weights`` = (plain, CoT) their sampling weights). ``batch_sizes``
  are the global rows per step of (t2i, lm, mmu);
  0 turns a flow off. Each flow's text budget is the built data's ``flow_text_len`` (its longest
  row; lm_chat rows are as long as the evaluation's prompt + :data:`ARITH_GEN_LENGTH` window).
  """
  from mmada_jax.data.config import default_data_config
  if stage not in ("pretrain", "sft"):
    raise ValueError(f"stage must be 'pretrain' or 'sft', got {stage!r}")
  p, m = result["paths"], result["model"]
  c = default_data_config()
  c.text_tokenizer = p["text_tokenizer"]
  c.max_text_len = int(m["max_text_len"])
  c.num_image_tokens = int(m["num_image_tokens"])
  c.seed = int(result["seed"] if seed is None else seed)
  c.worker_count = 0
  c.read_threads = 1
  c.prefetch_buffer_size = 4
  c.t2i.batch_size, c.lm.batch_size, c.mmu.batch_size = (int(b) for b in batch_sizes)
  lens = result.get("flow_text_len") or {}     # absent in data built before per-flow lengths
  c.t2i.max_text_len = int(lens.get("t2i", 0))
  c.mmu.max_text_len = int(lens.get("mmu_plain" if stage == "pretrain" else "mmu", 0))
  c.lm.max_text_len = int(lens.get("lm" if stage == "pretrain" else "lm_chat", 0))
  c.t2i.path = p["t2i_train"]
  c.mmu.path = p["mmu_train"]
  if stage == "pretrain":
    c.lm.path, c.lm.kind = p["lm_text"], "lm"
  else:
    c.lm.path, c.lm.kind = p["sft_chat"], "lm_chat"
    plain, cot = (float(w) for w in mmu_weights)
    c.mmu.sources = [{"path": p["mmu_train"], "weight": plain}, {"path": p["mmu_cot_train"], "weight": cot}]
  return c


DATA_VERSION = 3   # bumped when the built data's layout changes (2: per-flow text lengths, 3: plain MMU rows)


def _settings_hash(seed: int, cfg: DemoDataConfig) -> str:
  return hashlib.sha256(json.dumps({"seed": int(seed), "config": cfg.to_dict(), "version": DATA_VERSION},
                                   sort_keys=True).encode()).hexdigest()


def build_demo_data(workdir: str, seed: int = 0, config: DemoDataConfig = DemoDataConfig(),
                    log: Callable[[str], None] | None = print, overwrite: bool = False) -> dict[str, Any]:
  """Builds everything listed in the module docstring under ``workdir``; deterministic in ``seed``.

  When ``workdir/demo_data.json`` already records the same seed and config (and ``overwrite`` is
  False), nothing is rebuilt and the stored dict is returned.

  Returns a JSON-able dict: ``paths`` (name -> absolute path), ``stats`` (timings in wall seconds,
  MAGVIT losses / test reconstruction MSE on the [-1, 1] scale / codebook usage, classifier
  accuracies, token-length maxima, counts), ``model`` (:func:`demo_model_config`), ``config``,
  ``seed``, ``settings_hash``.
  """
  from mmada_jax.data.tokenize_images import tokenizer_fingerprint

  say = log or (lambda s: None)
  workdir = os.path.abspath(workdir)
  result_path = os.path.join(workdir, RESULT_NAME)
  settings = _settings_hash(seed, config)
  if not overwrite and os.path.isfile(result_path):
    with open(result_path, encoding="utf-8") as f:
      old = json.load(f)
    if old.get("settings_hash") == settings and all(os.path.exists(p) for p in old["paths"].values()):
      say(f"demo data: reusing {result_path}")
      return old
  t_start = time.perf_counter()
  timings: dict[str, float] = {}
  paths: dict[str, str] = {}
  ddir = os.path.join(workdir, "data")
  os.makedirs(ddir, exist_ok=True)

  # --- digits and the classifier
  t = time.perf_counter()
  train, test = digits.load_digit_splits(config.resolution, config.test_fraction, sub_seed(seed, "split"))
  timings["digits"] = time.perf_counter() - t
  t = time.perf_counter()
  clf = train_classifier(train.images, train.labels, config.classifier_kind, sub_seed(seed, "classifier"))
  paths["classifier"] = os.path.join(workdir, "classifier.pkl")
  clf.save(paths["classifier"])
  timings["classifier"] = time.perf_counter() - t
  say(f"demo data: {len(train)} train / {len(test)} test digits at {config.resolution}px; classifier test "
      f"accuracy {clf.accuracy(test.images, test.labels):.3f}")

  # --- text tokenizer
  t = time.perf_counter()
  problems = arithmetic.all_problems(config.max_operand, config.ops)
  tok = build_text_tokenizer(tokenizer_corpus(problems, config.thinking_prompt), config.text_vocab_size)
  paths["text_tokenizer"] = tok.save(os.path.join(workdir, "tokenizers", "text"))
  timings["text_tokenizer"] = time.perf_counter() - t

  # --- jittered copies of the train images
  t = time.perf_counter()
  n_copies = max(config.mmu_augment_copies, config.t2i_augment_copies)
  aug, aug_src = digits.jitter(train.images, n_copies, sub_seed(seed, "jitter"))
  all_images = np.concatenate([train.images, aug])
  all_labels = np.concatenate([train.labels, train.labels[aug_src]])
  all_fields = ([{"id": int(i), "label": int(l), "copy": 0} for i, l in zip(train.index, train.labels)]
                + [{"id": int(train.index[i]), "label": int(train.labels[i]), "copy": 1 + k // len(train)}
                   for k, i in enumerate(aug_src)])
  timings["jitter"] = time.perf_counter() - t

  # --- MAGVIT-v2
  t = time.perf_counter()
  mcfg = demo_magvit_config(config.codebook_bits, config.resolution)
  mtrain = dataclasses.replace(config.magvit, seed=sub_seed(seed, "magvit"))
  img_tok, mstats = train_magvit(digits.to_float(all_images), mcfg, mtrain, log=say)
  paths["image_tokenizer"] = os.path.join(workdir, "tokenizers", "magvit")
  img_tok.save_pretrained(paths["image_tokenizer"], overwrite=True)
  timings["magvit_train"] = time.perf_counter() - t

  t = time.perf_counter()
  all_codes = encode_images(img_tok, all_images)
  train_codes = all_codes[:len(train)]
  test_codes = encode_images(img_tok, test.images)
  recon = decode_codes(img_tok, test_codes)
  timings["encode_decode"] = time.perf_counter() - t
  grid = img_tok.grid_size(config.resolution, config.resolution)
  n_img = grid[0] * grid[1]
  cb = mcfg.codebook_size
  magvit_stats = {
      "num_params": mstats["num_params"], "steps": mtrain.steps, "first_loss": mstats["first_loss"],
      "final_loss": mstats["final_loss"], "final_train_mse": mstats["final_mse"],
      "test_recon_mse": float(np.mean((recon - test.as_float()) ** 2)),
      "test_recon_mae_uint8": float(np.mean(np.abs(digits.to_uint8(recon).astype(np.float32)
                                                   - test.images.astype(np.float32)))),
      "usage_train": codebook_usage(train_codes, cb), "usage_test": codebook_usage(test_codes, cb),
      "codebook_size": cb, "grid": list(grid)}
  clf_stats = {"kind": config.classifier_kind, "test_accuracy_real": clf.accuracy(test.images, test.labels),
               "test_accuracy_recon": clf.accuracy(digits.to_uint8(recon), test.labels)}
  say(f"demo data: MAGVIT test MSE {magvit_stats['test_recon_mse']:.4f}, {magvit_stats['usage_test']['used']}/{cb} "
      f"codes used; classifier on reconstructions {clf_stats['test_accuracy_recon']:.3f}")

  # --- image-token datasets
  t = time.perf_counter()
  tinfo = dict(tokenizer_fingerprint(img_tok), path=paths["image_tokenizer"])
  shard_kw = dict(grid=grid, codebook_size=cb, resolution=config.resolution, tokenizer_info=tinfo,
                  shard_size=config.shard_size)
  caps = digits.random_captions(all_labels, sub_seed(seed, "captions"))
  qs = np.random.default_rng(sub_seed(seed, "mmu_questions")).integers(0, len(digits.MMU_QUESTIONS), len(all_labels))
  n_t2i = len(train) * (1 + config.t2i_augment_copies)
  n_mmu = len(train) * (1 + config.mmu_augment_copies)
  paths["t2i_train"] = write_token_shards(os.path.join(ddir, "t2i_train"), all_codes[:n_t2i],
                                          [dict(f, text=c) for f, c in zip(all_fields[:n_t2i], caps)],
                                          source="sklearn digits (train split), demo captions", **shard_kw)
  for name, cot in (("mmu_train", False), ("mmu_cot_train", True)):
    rows = [dict(f, text=c, messages=digits.mmu_messages(f["label"], int(q), cot=cot))
            for f, c, q in zip(all_fields[:n_mmu], caps, qs)]
    paths[name] = write_token_shards(os.path.join(ddir, name), all_codes[:n_mmu], rows,
                                     source=f"sklearn digits (train split), digit questions{' with CoT' * cot}",
                                     **shard_kw)

  # --- text datasets
  system = None
  if config.thinking_prompt:
    from mmada_jax.rl.prompts import THINKING_PROMPT
    system = THINKING_PROMPT
  n_word = int(round(config.lm_rows * config.word_row_fraction))
  lm_rows = (arithmetic.pretrain_texts(problems, config.lm_rows - n_word, config.facts_per_row,
                                       sub_seed(seed, "lm_facts"))
             + number_word_texts(n_word, sub_seed(seed, "lm_words")))
  lm_rows = [lm_rows[i] for i in np.random.default_rng(sub_seed(seed, "lm_order")).permutation(len(lm_rows))]
  paths["lm_text"] = _write_jsonl(os.path.join(ddir, "lm_text.jsonl"), [{"text": s} for s in lm_rows])
  sft = arithmetic.shuffled(problems, sub_seed(seed, "sft"))
  paths["sft_chat"] = _write_jsonl(os.path.join(ddir, "sft_chat.jsonl"),
                                   [{"id": i, "messages": arithmetic.chat_messages(p, system)}
                                    for i, p in enumerate(sft)])
  grpo = arithmetic.shuffled(problems, sub_seed(seed, "grpo"))
  paths["grpo_text"] = _write_jsonl(os.path.join(ddir, "grpo_text.jsonl"), [arithmetic.prompt_record(p) for p in grpo])
  paths["eval_arith"] = _write_jsonl(os.path.join(ddir, "eval_arith.jsonl"),
                                     [arithmetic.prompt_record(p) for p in problems])

  def mmu_record(codes: np.ndarray, label: int) -> dict[str, Any]:
    return {"question": digits.MMU_QUESTIONS[0], "answer": str(int(label)),
            "image_codes": [int(c) for c in codes], "label": int(label)}

  pick = np.random.default_rng(sub_seed(seed, "grpo_mmu")).permutation(len(train))[:config.grpo_mmu_images]
  paths["grpo_mmu"] = _write_jsonl(os.path.join(ddir, "grpo_mmu.jsonl"),
                                   [mmu_record(train_codes[i], train.labels[i]) for i in pick])
  paths["eval_mmu"] = _write_jsonl(os.path.join(ddir, "eval_mmu.jsonl"),
                                   [mmu_record(c, l) for c, l in zip(test_codes, test.labels)])
  n_t = len(digits.CAPTION_TEMPLATES)
  t2i_eval = [{"prompt": digits.caption(d, k), "label": d}
              for k in range(config.t2i_eval_per_digit) for d in range(10)]
  paths["eval_t2i"] = _write_jsonl(os.path.join(ddir, "eval_t2i.jsonl"), t2i_eval)
  g_rng = np.random.default_rng(sub_seed(seed, "grpo_t2i"))
  paths["grpo_t2i"] = _write_jsonl(os.path.join(ddir, "grpo_t2i.jsonl"),
                                   [{"prompt": digits.caption(d, int(g_rng.integers(n_t))), "label": int(d)}
                                    for d in g_rng.permutation(np.repeat(np.arange(10), 20))])
  paths["test_images"] = os.path.join(ddir, "test_images.npz")
  np.savez(paths["test_images"], images=test.images, labels=test.labels, codes=test_codes, index=test.index)
  timings["write_data"] = time.perf_counter() - t

  lengths = _text_lengths(tok, problems, config.thinking_prompt, lm_rows)
  s = max(lengths["t2i_core"] - 1, lengths["mmu_text"], max(lengths["lm_chat"], lengths["lm_text"]) - n_img - 3)
  model = demo_model_config(tok, cb, n_img, s)
  if lengths["arith_answer"] + 1 > ARITH_GEN_LENGTH:
    raise ValueError(f"arithmetic answers take {lengths['arith_answer']} tokens + EOS, more than the "
                     f"{ARITH_GEN_LENGTH}-token generation window (lower max_operand)")
  # Each flow's rows as short as its longest row (L = S_f + N + 3); SFT chat rows end where the
  # evaluation's window ends (prompt + ARITH_GEN_LENGTH), so the model trains on the length it
  # decodes at (measured: rows of the common length lose a third of the arithmetic accuracy).
  # Pretraining's MMU rows (plain answers only) likewise end at prompt + MMU_GEN_LENGTH: the digit
  # is then one of 4 answer positions instead of one of 15 (mostly EOS padding), and rows are 11
  # tokens shorter (seed 1, MMU batch 64: image understanding 0.900 -> 0.928 after pretraining).
  extra = n_img + 3
  if lengths["mmu_plain_text"] > lengths["mmu_prompt"] + MMU_GEN_LENGTH:
    raise ValueError(f"plain MMU answers take {lengths['mmu_plain_text'] - lengths['mmu_prompt']} tokens, more than "
                     f"the {MMU_GEN_LENGTH}-token generation window")
  flow_lens = {"t2i": lengths["t2i_core"] - 1, "mmu": lengths["mmu_text"],
               "mmu_plain": lengths["mmu_prompt"] + MMU_GEN_LENGTH,
               "lm": max(1, lengths["lm_text"] - extra),
               "lm_chat": max(1, lengths["lm_chat_prompt"] + ARITH_GEN_LENGTH - extra)}
  timings["total"] = time.perf_counter() - t_start
  stats = {"timings_s": timings, "magvit": magvit_stats, "magvit_losses": mstats["losses"], "classifier": clf_stats,
           "text_tokenizer_len": len(tok), "token_lengths": lengths,
           "counts": {"train_images": len(train), "test_images": len(test), "t2i_rows": n_t2i, "mmu_rows": n_mmu, "problems": len(problems),
                      "lm_rows": len(lm_rows), "t2i_eval": len(t2i_eval)}}
  result = {"seed": int(seed), "config": config.to_dict(), "settings_hash": settings, "paths": paths,
            "stats": stats, "model": model, "flow_text_len": flow_lens}
  records.write_json_atomic(result_path, result)
  say(f"demo data: built in {timings['total']:.1f}s -> {workdir}")
  return result

"""The demo's data pieces: digits, arithmetic, tokenizers, MAGVIT training, classifier, build_demo_data."""
import dataclasses
import filecmp
import os

import numpy as np
import pytest

from mmada_jax.demo import arithmetic, digits, evaluate
from mmada_jax.demo import tokenizers as demo_tok
from mmada_jax.demo.classifier import DigitClassifier, train_classifier
from mmada_jax.demo.data import (ARITH_GEN_LENGTH, MMU_GEN_LENGTH, DemoDataConfig, build_demo_data, data_config, read_jsonl,
                                 tokenizer_corpus)
from mmada_jax.prompting import SpecialTokens, TextTokenizer
from mmada_jax.rl import answers as answer_lib


@pytest.fixture(scope="module")
def splits():
  return digits.load_digit_splits(resolution=16, test_fraction=0.2, seed=0)


# ---------------------------------------------------------------- digits

def test_digit_splits_shapes_and_determinism(splits):
  train, test = splits
  assert train.images.shape == (len(train), 16, 16, 3) and train.images.dtype == np.uint8
  assert len(train) + len(test) == 1797
  assert not set(train.index) & set(test.index)
  assert np.array_equal(np.bincount(test.labels), np.bincount(test.labels, minlength=10))
  assert np.all(np.bincount(test.labels) >= 30)  # stratified: every digit in test
  assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grey replicated
  x = train.as_float()
  assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
  assert np.array_equal(digits.to_uint8(x), train.images)
  again, _ = digits.load_digit_splits(resolution=16, test_fraction=0.2, seed=0)
  other, _ = digits.load_digit_splits(resolution=16, test_fraction=0.2, seed=1)
  assert np.array_equal(again.index, train.index) and np.array_equal(again.images, train.images)
  assert not np.array_equal(other.index, train.index)


def test_jitter_is_seeded_and_keeps_digits_recognisable(splits):
  train, _ = splits
  x = train.images[:50]
  aug, src = digits.jitter(x, copies=2, seed=4)
  assert aug.shape == (100, 16, 16, 3) and aug.dtype == np.uint8
  assert np.array_equal(src, np.tile(np.arange(50), 2))
  again, _ = digits.jitter(x, copies=2, seed=4)
  assert np.array_equal(aug, again) and not np.array_equal(aug, digits.jitter(x, copies=2, seed=5)[0])
  assert not np.array_equal(aug[:50], x) and np.array_equal(aug[..., 0], aug[..., 1])
  clf = train_classifier(train.images, train.labels, kind="logreg")
  assert clf.accuracy(aug, train.labels[:50][src]) >= 0.8


def test_captions_and_mmu_answers_match_labels():
  for d in range(10):
    for t in range(len(digits.CAPTION_TEMPLATES)):
      assert digits.label_of_caption(digits.caption(d, t)) == d
    for cot in (False, True):
      msgs = digits.mmu_messages(d, 1, cot)
      assert msgs[0]["content"] == digits.MMU_QUESTIONS[1] + digits.MMU_COT_SUFFIX * cot
      assert msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant"
      assert answer_lib.mmu_answer_correct(msgs[1]["content"], str(d))
      assert not answer_lib.mmu_answer_correct(msgs[1]["content"], str((d + 1) % 10))
  labels = np.arange(30) % 10
  caps = digits.random_captions(labels, seed=3)
  assert caps == digits.random_captions(labels, seed=3)
  assert [digits.label_of_caption(c) for c in caps] == labels.tolist()


# ---------------------------------------------------------------- arithmetic

def test_arithmetic_answers_and_cot():
  problems = arithmetic.all_problems(9)
  assert len(problems) == 100 + 55 and len(set(problems)) == len(problems)
  for p in problems:
    assert p.answer == eval(f"{p.a} {p.op} {p.b}") and p.answer >= 0  # noqa: S307 - digits and +/- only
    assert answer_lib.format_ok(p.cot()) and arithmetic.is_correct(p.cot(), p.answer)
    assert not arithmetic.is_correct(p.cot(), p.answer + 1)
    assert p.statement == f"{p.a} {p.op} {p.b} = {p.answer}."
  for p in (arithmetic.Problem(23, "+", 19), arithmetic.Problem(42, "-", 19), arithmetic.Problem(35, "-", 7)):
    assert arithmetic.is_correct(p.cot(), p.answer) and answer_lib.format_ok(p.cot())
    assert p.cot().endswith(f"</think> {p.answer}")
  texts = arithmetic.pretrain_texts(problems, rows=40, facts_per_row=4, seed=0)
  assert texts == arithmetic.pretrain_texts(problems, rows=40, facts_per_row=4, seed=0)
  asked = 0
  for row in texts:
    for fact in row.split(". "):
      if fact.startswith("What is "):
        question, fact = fact.split("? ")
        asked += 1
        assert question[len("What is "):] == fact.split(" = ")[0]
      lhs, rhs = fact.rstrip(".").split(" = ")
      assert eval(lhs) == int(rhs)  # noqa: S307
  assert 0 < asked < 160
  assert arithmetic.score(["<think> 1 + 1 = 2 </think> 2", "2", "<think> x </think> 3"], [2, 2, 2]) == {
      "accuracy": 2 / 3, "format": 2 / 3}


# ---------------------------------------------------------------- tokenizers

def test_text_tokenizer_round_trip(tmp_path):
  problems = arithmetic.all_problems(9)
  tok = demo_tok.build_text_tokenizer(tokenizer_corpus(problems, thinking_prompt=False), vocab_size=512)
  sp = SpecialTokens.from_tokenizer(tok)
  assert sp.image_offset == len(tok) <= 512 and sp.mask < len(tok)
  samples = [problems[7].question, problems[99].cot(), digits.caption(3, 2), digits.mmu_answer(8, True)]
  for s in samples:
    assert tok.decode(tok.encode(s)) == s
  msgs = arithmetic.chat_messages(problems[5])
  ids = tok.apply_chat_template(msgs, add_generation_prompt=False)
  assert ids[0] == sp.bos and sp.start_header in ids and ids[-1] == sp.eot_id
  loaded = TextTokenizer.from_file(tok.save(str(tmp_path / "text")))
  assert len(loaded) == len(tok) and loaded.encode(samples[1]) == tok.encode(samples[1])


@pytest.mark.slow   # two MAGVIT training runs
def test_magvit_training_reduces_loss_and_is_deterministic(splits):
  train, _ = splits
  cfg = demo_tok.demo_magvit_config(codebook_bits=6, resolution=16)
  assert cfg.codebook_size == 64 and cfg.downsample_factor == 4
  tcfg = demo_tok.MagvitTrainConfig(steps=24, batch_size=16, lr=3e-3, warmup_steps=4, seed=0)
  x = train.as_float()[:256]
  tok, stats = demo_tok.train_magvit(x, cfg, tcfg)
  losses = stats["losses"]
  assert len(losses) == 24 and np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
  codes = demo_tok.encode_images(tok, train.images[:40], batch_size=16)
  assert codes.shape == (40, 16) and codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < 64
  rec = demo_tok.decode_codes(tok, codes, batch_size=16)
  assert rec.shape == (40, 16, 16, 3)
  usage = demo_tok.codebook_usage(codes, 64)
  assert 1 <= usage["used"] <= 64 and 1.0 <= usage["perplexity"] <= usage["used"] + 1e-6
  tok2, stats2 = demo_tok.train_magvit(x, cfg, tcfg)
  assert stats2["losses"] == losses
  assert np.array_equal(demo_tok.encode_images(tok2, train.images[:40], batch_size=16), codes)


# ---------------------------------------------------------------- classifier and evaluation

def test_classifier_accuracy_on_real_digits(splits, tmp_path):
  train, test = splits
  clf = train_classifier(train.images, train.labels, kind="logreg")
  assert clf.accuracy(test.images, test.labels) >= 0.9
  p = clf.predict_proba(test.images[:5])
  assert p.shape == (5, 10) and p.dtype == np.float32 and np.allclose(p.sum(-1), 1.0, atol=1e-5)
  assert np.allclose(clf.predict_proba(test.images[:5, :, :, 0]), p)  # [n, H, W] input
  big = np.repeat(np.repeat(test.images[:20], 2, axis=1), 2, axis=2)  # any resolution
  assert clf.accuracy(big, test.labels[:20]) >= 0.85
  clf.save(str(tmp_path / "c.pkl"))
  assert np.allclose(DigitClassifier.load(str(tmp_path / "c.pkl")).predict_proba(test.images[:5]), p)
  scorer = evaluate.DigitScorer(clf, {f"digit {d}": d for d in range(10)})
  hits = scorer.score(test.images, [f"digit {d}" for d in test.labels])
  assert hits.shape == (len(test.labels),) and float(hits.mean()) == pytest.approx(clf.accuracy(test.images, test.labels))
  with pytest.raises(ValueError, match="no digit known"):
    scorer.score(test.images[:1], ["a cat"])
  grid = evaluate.image_grid(test.images[:12], cols=5, scale=2)
  assert grid.shape == (3 * 33 + 1, 5 * 33 + 1, 3)


# ---------------------------------------------------------------- build_demo_data

SMALL = DemoDataConfig(magvit=demo_tok.MagvitTrainConfig(steps=6, batch_size=16, warmup_steps=2),
                       codebook_bits=6, lm_rows=40, t2i_eval_per_digit=10, grpo_mmu_images=20, mmu_augment_copies=1,
                       classifier_kind="logreg", shard_size=300)


@pytest.mark.slow   # builds the demo data twice
def test_build_demo_data_formats_and_determinism(tmp_path):
  from mmada_jax.data import make_mixed_iterator
  from mmada_jax.data.sources import open_source

  a = build_demo_data(str(tmp_path / "a"), seed=5, config=SMALL, log=None)
  p = a["paths"]
  assert all(os.path.exists(v) for v in p.values())
  tok = TextTokenizer.from_file(p["text_tokenizer"])
  m = a["model"]
  assert m["vocab_size"] == len(tok) + 64 and m["llm_vocab_size"] == len(tok) and m["num_image_tokens"] == 16
  assert m["mask_token_id"] == SpecialTokens.from_tokenizer(tok).mask
  lengths = a["stats"]["token_lengths"]
  assert lengths["t2i_core"] <= m["max_text_len"] + 1 and lengths["mmu_text"] <= m["max_text_len"]
  assert max(lengths["lm_chat"], lengths["lm_text"]) <= m["max_text_len"] + m["num_image_tokens"] + 3

  t2i = open_source(p["t2i_train"])
  assert len(t2i) == a["stats"]["counts"]["train_images"]
  for i in (0, len(t2i) - 1):
    rec = t2i[i]
    assert rec["codes"].shape == (16,) and rec["codes"].max() < 64
    assert digits.label_of_caption(rec["text"]) == rec["label"]
  mmu, cot = open_source(p["mmu_train"]), open_source(p["mmu_cot_train"])
  assert len(mmu) == len(cot) > len(t2i)
  for i in (3, len(mmu) - 1):
    for rec, is_cot in ((mmu[i], False), (cot[i], True)):
      q, ans = rec["messages"][0]["content"], rec["messages"][1]["content"]
      assert answer_lib.mmu_answer_correct(ans, str(rec["label"])) and answer_lib.format_ok(ans) == is_cot
      assert q.endswith(digits.MMU_COT_SUFFIX) == is_cot
    assert np.array_equal(mmu[i]["codes"], cot[i]["codes"])
  n_problems = len(arithmetic.all_problems(SMALL.max_operand))
  assert len(read_jsonl(p["eval_t2i"])) == 100 and len(read_jsonl(p["eval_arith"])) == n_problems
  assert a["stats"]["counts"]["mmu_rows"] == (1 + SMALL.mmu_augment_copies) * len(t2i)
  ev = read_jsonl(p["eval_mmu"])
  test = np.load(p["test_images"])
  assert len(ev) == len(test["labels"]) and ev[0]["image_codes"] == test["codes"][0].tolist()
  assert int(ev[0]["answer"]) == ev[0]["label"] == int(test["labels"][0])
  for row in read_jsonl(p["sft_chat"])[:20]:
    q, ans = row["messages"][0]["content"], row["messages"][1]["content"]
    assert arithmetic.is_correct(ans, eval(q[len("What is "):-1]))  # noqa: S307

  fl = a["flow_text_len"]   # each flow as long as its longest row; SFT chat rows end at the eval window
  assert fl["t2i"] == lengths["t2i_core"] - 1 and fl["mmu"] == lengths["mmu_text"] <= m["max_text_len"]
  assert fl["lm_chat"] + 16 + 3 == lengths["lm_chat_prompt"] + ARITH_GEN_LENGTH >= lengths["lm_chat"]
  # pretraining's plain MMU rows end at the MMU evaluation's window too (shorter than the CoT turns)
  assert fl["mmu_plain"] == lengths["mmu_prompt"] + MMU_GEN_LENGTH >= lengths["mmu_plain_text"]
  assert fl["mmu_plain"] < fl["mmu"]
  for stage, lm, mmu_len in (("pretrain", fl["lm"], fl["mmu_plain"]), ("sft", fl["lm_chat"], fl["mmu"])):
    batch = next(make_mixed_iterator(data_config(a, stage, (2, 2, 4)), tok))
    assert {k: v["input_ids"].shape for k, v in batch.items()} == {
        "t2i": (2, fl["t2i"] + 19), "lm": (2, lm + 19), "mmu": (4, mmu_len + 19)}
    if stage == "pretrain":   # every plain row fits: the answer's EOT sits inside the window
      eot = tok.token_to_id("<|eot_id|>")
      assert ((batch["mmu"]["input_ids"][:, 19:] == eot).sum(axis=1) == 2).all()   # question's and answer's

  b = build_demo_data(str(tmp_path / "b"), seed=5, config=SMALL, log=None)
  for name in ("lm_text", "sft_chat", "grpo_text", "grpo_mmu", "grpo_t2i", "eval_mmu", "eval_t2i", "eval_arith"):
    assert filecmp.cmp(p[name], b["paths"][name], shallow=False), name
  assert np.array_equal(np.load(b["paths"]["test_images"])["codes"], test["codes"])
  assert build_demo_data(str(tmp_path / "a"), seed=5, config=SMALL, log=None)["stats"] == a["stats"]  # reused
  c = build_demo_data(str(tmp_path / "c"), seed=6, config=dataclasses.replace(SMALL, lm_rows=20), log=None)
  assert not filecmp.cmp(p["eval_mmu"], c["paths"]["eval_mmu"], shallow=False)


# ---------------------------------------------------------------- per-flow row lengths

@pytest.mark.slow   # compiles four forwards of the tiny model
def test_mixed_stage_with_per_flow_lengths_equals_one_forward():
  """Flows of different lengths train with one forward per task; with equal lengths that sum is
  the one-forward loss, and each task's rows are its own S_f + N + 3 tokens."""
  import jax
  import jax.numpy as jnp
  from mmada_jax.configs import tiny
  from mmada_jax.diffusion import objectives
  from mmada_jax.model import transformer
  from mmada_jax.train.stages import get_stage
  from mmada_jax.train.trainer import model_config
  cfg = tiny.get_config("sft")
  mcfg = model_config(cfg.model)
  s, n = int(cfg.data.max_text_len), int(cfg.data.num_image_tokens)
  params = transformer.init_params(mcfg, jax.random.key(0))
  rng = np.random.default_rng(0)

  def rows(task, b, length):
    ids = rng.integers(20, 60, (b, length)).astype(np.int32)
    second = np.zeros((b, length), np.int32)
    if task == "t2i":
      return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    second[:, :length // 2] = 1
    return {"input_ids": ids, "prompt_mask": second}

  sizes = {t: int(cfg.data[t].batch_size) for t in ("t2i", "lm", "mmu")}
  batch = jax.tree.map(jnp.asarray, {t: rows(t, b, s + n + 3) for t, b in sizes.items() if b})
  key = jax.random.key(1)
  spec = objectives.MixedSpec.from_config(cfg, mcfg)
  joint, jparts = objectives.mixed_loss_fn(params, batch, key, None, model_cfg=mcfg, spec=spec)
  cfg.data.lm.max_text_len = s - 3          # lm rows 3 tokens shorter: the per-task path
  stage = get_stage(cfg, mcfg, abstract=True)
  shapes = {t: v["input_ids"].shape for t, v in stage.batch_spec().items()}
  assert shapes["lm"] == (sizes["lm"], s + n) and shapes["mmu"] == (sizes["mmu"], s + n + 3)
  split, parts = stage.loss_fn(params, {**batch, "lm": {k: v[:, 3:] for k, v in batch["lm"].items()}}, key, None)
  assert set(parts) >= {"loss", "loss_t2i", "loss_lm", "loss_mmu"}
  # t2i and mmu rows are unchanged: their losses equal the one-forward ones exactly.
  for k in ("loss_t2i", "loss_mmu"):
    np.testing.assert_allclose(float(parts[k]), float(jparts[k]), rtol=1e-5)
  cfg.data.lm.max_text_len = s              # equal lengths: per-task sum == one forward
  cfg.data.t2i.max_text_len = s
  same = {t: objectives.mixed_loss_fn(params, {t: batch[t]}, key, None, model_cfg=mcfg, spec=spec)[0]
          for t in batch}
  np.testing.assert_allclose(float(sum(same.values())), float(joint), rtol=1e-5)
  assert jnp.isfinite(split)

"""Data: image pre-tokenisation, sources, the tfds builder and the grain mixed-batch pipeline."""
from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from mmada_jax.data import synthetic as syn
from mmada_jax.data.config import default_data_config
from mmada_jax.data.images import preprocess_image
from mmada_jax.data.pipeline import SourceExhausted, make_mixed_iterator
from mmada_jax.data.sources import JsonlSource, ParquetSource, open_source
from mmada_jax.prompting.special_tokens import SpecialTokens

S, N = 24, 16
L = S + N + 3


@pytest.fixture(scope="module")
def tok():
  return syn.tiny_tokenizer()


@pytest.fixture(scope="module")
def sp(tok):
  return SpecialTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  return {
      "t2i": syn.write_token_shards(str(d / "t2i"), 40, N, seed=1),
      "mmu": syn.write_token_shards(str(d / "mmu"), 24, N, seed=2, kind="conversations"),
      "mmu_cap": syn.write_token_shards(str(d / "mmu_cap"), 12, N, seed=5),
      "lm": syn.write_text_jsonl(str(d / "lm.jsonl"), 40, seed=3),
      "lm_pq": syn.write_text_parquet(str(d / "lm.parquet"), 40, seed=3),
      "chat": syn.write_chat_jsonl(str(d / "chat.jsonl"), 30, seed=4),
      "chat_content": syn.write_chat_jsonl(str(d / "chat_c.jsonl"), 30, seed=4, style="content"),
      "root": str(d),
  }


def _cfg(data, t2i=4, lm=4, mmu=2, **kw):
  c = default_data_config()
  c.max_text_len, c.num_image_tokens = S, N
  c.read_threads = 2
  c.t2i.path, c.lm.path, c.mmu.path = data["t2i"], data["lm"], data["mmu"]
  c.t2i.batch_size, c.lm.batch_size, c.mmu.batch_size = t2i, lm, mmu
  for k, v in kw.items():
    sec, _, name = k.rpartition("__")
    (c[sec] if sec else c)[name] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
  return all(a[f].keys() == b[f].keys() and all(np.array_equal(a[f][k], b[f][k]) for k in a[f]) for f in a) \
      and a.keys() == b.keys()


# ---- mixed batches -----------------------------------------------------------------------------

def test_mixed_batch_shapes_dtypes(data, tok, sp):
  it = make_mixed_iterator(_cfg(data), tok, process_index=0, process_count=1)
  assert it.seq_len == L and it.batch_sizes == {"t2i": 4, "lm": 4, "mmu": 2}
  b = next(it)
  assert set(b) == {"t2i", "lm", "mmu"}
  assert set(b["t2i"]) == {"input_ids", "attention_mask"}
  assert set(b["lm"]) == set(b["mmu"]) == {"input_ids", "prompt_mask"}
  for flow, bs in it.batch_sizes.items():
    for v in b[flow].values():
      assert v.dtype == np.int32 and v.shape == (bs, L)
  t2i = b["t2i"]["input_ids"]
  img = t2i[:, S + 2:S + 2 + N]
  assert (img >= sp.image_offset).all() and (img < sp.image_offset + 8192).all()  # visible codes
  assert (t2i[:, S + 1] == sp.soi).all() and (t2i[:, -1] == sp.eoi).all()
  np.testing.assert_array_equal(b["t2i"]["attention_mask"], (t2i != sp.ipad).astype(np.int32))
  assert (b["lm"]["prompt_mask"] == 0).all() and (b["lm"]["input_ids"][:, 0] == sp.bos).all()
  mmu = b["mmu"]
  assert (mmu["input_ids"][:, :2] == [sp.mmu, sp.soi]).all() and (mmu["input_ids"][:, N + 2] == sp.eoi).all()
  # prompt through the last end-header of the conversation, answer after it
  for ids, pm in zip(mmu["input_ids"], mmu["prompt_mask"]):
    last = np.nonzero(ids == sp.end_header)[0][-1]
    assert pm[:last + 1].all() and not pm[last + 1:].any()

  c = _cfg(data, mmu=0)
  b = next(make_mixed_iterator(c, tok, process_index=0, process_count=1))
  assert set(b) == {"t2i", "lm"}


def test_determinism_and_seed(data, tok):
  c = _cfg(data, cond_dropout_prob=0.5)
  a = _take(make_mixed_iterator(c, tok, process_index=0, process_count=1), 12)
  b = _take(make_mixed_iterator(c, tok, process_index=0, process_count=1), 12)
  assert all(_same(x, y) for x, y in zip(a, b))
  other = _take(make_mixed_iterator(c, tok, process_index=0, process_count=1, seed=7), 12)
  assert not all(_same(x, y) for x, y in zip(a, other))
  # caption dropout: some rows are the empty caption [.. iPAD, t2i, BOS, EOS, soi ..], reproducibly
  dropped = np.concatenate([(x["t2i"]["attention_mask"][:, :S + 1].sum(1) == 3) for x in a])
  assert 0 < dropped.mean() < 1


def test_sharding_two_processes_disjoint_and_covering(data, tok):
  c = _cfg(data, mmu=0)  # t2i 40 records / 2 per host; lm 40 records / 2 per host
  seen = {"t2i": [], "lm": []}
  for p in range(2):
    it = make_mixed_iterator(c, tok, shard_options=grain.sharding.ShardOptions(p, 2, drop_remainder=True),
                             emit_index=True)
    assert it.batch_sizes == {"t2i": 2, "lm": 2} and it.steps_per_epoch == 10
    steps = _take(it, it.steps_per_epoch)
    for flow in seen:
      idx = np.concatenate([s[flow]["record_index"] for s in steps])
      assert len(set(idx.tolist())) == 20  # one epoch of this host's shard, no repeats
      seen[flow].append(set(idx.tolist()))
  for flow, (a, b) in seen.items():
    assert not a & b and a | b == set(range(40)), flow


def test_state_restore_mid_epoch_bit_identical(data, tok):
  c = _cfg(data)
  it = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 7
  ref = _take(it, 15)  # crosses the 10-step epoch of t2i/lm and the 12-step one of mmu
  it2 = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  it2.set_state(state)
  got = _take(it2, 15)
  assert all(_same(x, y) for x, y in zip(ref, got)) and it2.step == 22
  other = make_mixed_iterator(c, tok, process_index=0, process_count=1, seed=5)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_orbax_checkpoint_handler(data, tok, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  c = _cfg(data)
  it = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  _take(it, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  ref = _take(it, 4)
  it2 = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert it2.step == 3 and all(_same(x, y) for x, y in zip(ref, _take(it2, 4)))


def test_num_epochs_limits_steps(data, tok):
  it = make_mixed_iterator(_cfg(data, num_epochs=1), tok, process_index=0, process_count=1)
  assert it.total_steps == it.steps_per_epoch == 12  # mmu: 24 records / 2 (max_size_cycle)
  assert len(list(it)) == 12


def test_missing_and_empty_paths(data, tok):
  c = _cfg(data)
  c.t2i.path = os.path.join(data["root"], "nope")
  with pytest.raises(FileNotFoundError, match=r"data\.t2i\.path.*nope"):
    make_mixed_iterator(c, tok, process_index=0, process_count=1)
  c = _cfg(data)
  c.lm.path = ""
  with pytest.raises(FileNotFoundError, match=r"data\.lm\.path is empty"):
    make_mixed_iterator(c, tok, process_index=0, process_count=1)
  c = _cfg(data)
  c.text_tokenizer = os.path.join(data["root"], "no_tokenizer")
  with pytest.raises(FileNotFoundError, match=r"data\.text_tokenizer"):
    make_mixed_iterator(c, None, process_index=0, process_count=1)
  c = _cfg(data, num_image_tokens=N + 1)
  with pytest.raises(ValueError, match="num_image_tokens"):
    make_mixed_iterator(c, tok, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="divisible"):
    make_mixed_iterator(_cfg(data, t2i=3), tok, process_index=0, process_count=2)


# ---- sources and row formats -------------------------------------------------------------------

def test_jsonl_and_parquet_sources_agree(data):
  a, b = JsonlSource([data["lm"]]), ParquetSource([data["lm_pq"]], cache_groups=1)
  assert len(a) == len(b) == 40
  for i in (0, 17, 39, 3):
    assert a[i] == b[i]
  import pickle
  assert pickle.loads(pickle.dumps(b))[5] == b[5] and pickle.loads(pickle.dumps(a))[5] == a[5]


def test_chat_formats_and_lm_mixture(data, tok, sp):
  c = _cfg(data, t2i=0, mmu=0, lm=4)
  c.lm.sources = [{"path": data["chat"], "kind": "lm_chat", "weight": 1.0},
                  {"path": data["chat_content"], "kind": "lm_chat", "weight": 1.0},
                  {"path": data["lm_pq"], "kind": "lm", "weight": 2.0}]
  steps = _take(make_mixed_iterator(c, tok, process_index=0, process_count=1, emit_index=True), 8)
  counts = np.bincount([s["lm"]["source_index"][0] for s in steps], minlength=3)
  assert counts.tolist() == [2, 2, 4]
  for s in steps:
    ids, pm = s["lm"]["input_ids"], s["lm"]["prompt_mask"]
    if s["lm"]["source_index"][0] == 2:
      assert not pm.any()
      continue
    for row, m in zip(ids, pm):
      last = np.nonzero(row == sp.end_header)[0][-1]
      assert m[:last + 1].all() and not m[last + 1:].any() and row[0] == sp.bos
  # messages and pre-formatted content of the same conversations give the same ids
  msgs = JsonlSource([data["chat"]])[3]["messages"]
  content = JsonlSource([data["chat_content"]])[3]["content"]
  assert tok.apply_chat_template(msgs, add_generation_prompt=False) == tok.encode(content, add_special_tokens=False)


def test_source_row_counters_follow_weights_and_resume(data, tok):
  c = _cfg(data, mmu=0, lm=4)
  c.lm.sources = [{"path": data["chat"], "kind": "lm_chat", "weight": 1.0},
                  {"path": data["lm_pq"], "kind": "lm", "weight": 2.0, "name": "web"}]
  it = make_mixed_iterator(c, tok, process_index=0, process_count=1, emit_index=True)
  assert it.metrics() == {"data/t2i/t2i": 0, "data/lm/chat": 0, "data/lm/web": 0}
  steps = _take(it, 6)
  assert all("_source" not in s[f] for s in steps for f in s)
  by_source = np.bincount([s["lm"]["source_index"][0] for s in steps], minlength=2)
  assert by_source.tolist() == [2, 4]  # the 1 : 2 weights
  assert it.metrics() == {"data/t2i/t2i": 24, "data/lm/chat": 8, "data/lm/web": 16}
  state = json.loads(json.dumps(it.get_state()))
  ref = _take(it, 6)
  want = it.metrics()
  assert want == {"data/t2i/t2i": 48, "data/lm/chat": 16, "data/lm/web": 32}
  it2 = make_mixed_iterator(c, tok, process_index=0, process_count=1, emit_index=True)
  it2.set_state(state)
  assert it2.metrics() == {"data/t2i/t2i": 24, "data/lm/chat": 8, "data/lm/web": 16}
  assert all(_same(x, y) for x, y in zip(ref, _take(it2, 6))) and it2.metrics() == want
  two = make_mixed_iterator(c, tok, shard_options=grain.sharding.ShardOptions(0, 2, drop_remainder=True))
  _take(two, 3)  # 2 rows per host of each flow: the counters are over both hosts
  assert two.metrics() == {"data/t2i/t2i": 12, "data/lm/chat": 4, "data/lm/web": 8}


def test_source_on_exhausted_raise_or_repeat(data, tok):
  c = _cfg(data, t2i=0, mmu=0, lm=4)
  c.lm.sources = [{"path": data["chat"], "kind": "lm_chat", "on_exhausted": "raise"}]
  it = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  got = _take(it, 7)  # 30 records: 7 full batches, the last 2 rows dropped
  assert it.metrics() == {"data/lm/chat": 28}
  with pytest.raises(SourceExhausted, match=r"data\.lm source 'chat' \(data\.lm\.sources\[0\]\.path=.*chat\.jsonl"):
    next(it)
  c.lm.sources = [dict(c.lm.sources[0], on_exhausted="repeat")]
  rep = make_mixed_iterator(c, tok, process_index=0, process_count=1)
  assert all(_same(x, y) for x, y in zip(got, _take(rep, 7)))  # the same first epoch
  _take(rep, 8)
  assert rep.metrics() == {"data/lm/chat": 60}
  c.lm.sources = [dict(c.lm.sources[0], on_exhausted="stop")]
  with pytest.raises(ValueError, match="on_exhausted"):
    make_mixed_iterator(c, tok, process_index=0, process_count=1)
  c.lm.sources = [{"path": data["lm"]}, {"path": data["lm_pq"]}]  # both named 'lm'
  with pytest.raises(ValueError, match=r"sources\[1\].*unique name"):
    make_mixed_iterator(c, tok, process_index=0, process_count=1)


def test_mmu_caption_prompt_and_lm_options(data, tok, sp):
  c = _cfg(data, t2i=0, lm=2, mmu=2)
  c.mmu.path = data["mmu_cap"]
  c.lm.strip_newlines, c.lm.max_chars = True, 60
  it = make_mixed_iterator(c, tok, max_text_len=96, process_index=0, process_count=1)  # room for the prompt
  assert it.seq_len == 96 + N + 3 and c.max_text_len == S
  for s in _take(it, 3):
    text = tok.decode(s["mmu"]["input_ids"][0, N + 3:])
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n")
    assert "<eot_id><|start_header_id|>assistant<|end_header_id|>\n" in text  # the original's literal QUIRK
    for row in s["lm"]["input_ids"]:
      body = tok.decode(row[1:]).split("<|endoftext|>")[0]
      assert len(body) <= 60 and "\n" not in body


def test_lm_chat_length_filter(data, tok, sp):
  c = _cfg(data, t2i=0, lm=2, mmu=0)
  c.lm.path, c.lm.kind, c.lm.max_tokens = data["chat_content"], "lm_chat", 60
  src = JsonlSource([data["chat_content"]])
  kept = sum(len(tok.encode(src[i]["content"], add_special_tokens=False)) < 60 for i in range(len(src)))
  assert 0 < kept < len(src)
  for s in _take(make_mixed_iterator(c, tok, max_text_len=96, process_index=0, process_count=1), 5):
    assert ((s["lm"]["input_ids"] != sp.eos).sum(1) < 60).all()
  c.lm.max_tokens = 2  # drops every row: an error, not an endless loop
  with pytest.raises(ValueError, match="skipped 100"):
    next(make_mixed_iterator(c, tok, process_index=0, process_count=1))


# ---- tfds builder ------------------------------------------------------------------------------

def test_tfds_builder_as_data_source_and_pipeline(data, tok, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()
  from mmada_jax.data import tfds_builder
  t2i = tfds_builder.prepare("t2i", data["t2i"], str(tmp_path / "tfds"))
  os.makedirs(tmp_path / "chat_in")
  os.link(data["chat"], tmp_path / "chat_in" / "train.jsonl")
  chat = tfds_builder.prepare("chat", str(tmp_path / "chat_in"), str(tmp_path / "tfds"))
  src = t2i.as_data_source("train")
  assert len(src) == 40 and src[0]["codes"].dtype == np.int16 and src[0]["codes"].shape == (N,)
  shards = open_source(data["t2i"])
  by_text = {shards[i]["text"]: shards[i]["codes"] for i in range(len(shards))}
  ds = grain.MapDataset.source(src).shuffle(seed=0)
  for ex in ds[:5]:
    np.testing.assert_array_equal(ex["codes"], by_text[ex["text"].decode()])
  c = _cfg(data, mmu=0, t2i__format="tfds")
  c.t2i.path = str(t2i.data_dir)
  c.lm.path, c.lm.kind, c.lm.format = str(tmp_path / "tfds" / "mmada_data" / "chat"), "lm_chat", "tfds"
  b = next(make_mixed_iterator(c, tok, process_index=0, process_count=1))
  assert b["t2i"]["input_ids"].shape == (4, L) and b["lm"]["prompt_mask"].any()
  assert chat.info.splits["train"].num_examples == 30


# ---- image tokenization -----------------------------------------------------------------------

def test_preprocess_modes(tmp_path):
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = 255
  path = tmp_path / "a.png"
  Image.fromarray(arr).save(path)
  clip = preprocess_image(str(path), 8, "clip")
  assert clip.shape == (8, 8, 3) and clip.dtype == np.float32 and clip.min() >= -1 and clip.max() <= 1
  # resize to 16x8 then centre crop columns 4..12: left half white, right half black
  assert clip[:, 0].mean() > 0.9 and clip[:, -1].mean() < -0.9
  pad = preprocess_image(str(path), 8, "pad_white")
  assert np.allclose(pad[0], 1.0) and np.allclose(pad[-1], 1.0)  # white bars above and below
  squash = preprocess_image(str(path), 8, "squash")
  assert squash[:, :3].mean() > 0.9 and squash[:, -3:].mean() < -0.9


@pytest.fixture(scope="module")
def image_tok():
  import jax
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
  vq = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), resolution=8)
  return ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, class_name="TinyMAGVITv2"), jax.random.PRNGKey(0))


def test_tokenize_images_end_to_end(image_tok, tmp_path):
  from mmada_jax.data.tokenize_images import main, tokenize_images
  imgs = syn.write_image_folder(str(tmp_path / "imgs"), 10)
  out = str(tmp_path / "out")
  m = tokenize_images(image_tok, imgs, out, resolution=8, batch_size=4, shard_size=4, progress=False)
  assert m["count"] == 10 and m["grid"] == [4, 4] and m["num_tokens"] == 16 and len(m["shards"]) == 3
  assert m["tokenizer"]["config_hash"] and m["tokenizer"]["params_hash"]
  assert sorted(os.listdir(out)) == ["manifest.json"] + [s["file"] for s in m["shards"]]
  src = open_source(out)
  rows = [json.loads(line) for line in open(os.path.join(imgs, "metadata.jsonl"))]
  x = np.stack([preprocess_image(r["file_name"], 8, "clip", imgs) for r in rows])
  want = np.asarray(image_tok.encode(x))
  for i in range(10):
    assert src[i]["codes"].dtype == np.uint16 and src[i]["text"] == rows[i]["text"] and src[i]["id"] == i
    np.testing.assert_array_equal(src[i]["codes"], want[i])
  with pytest.raises(FileExistsError, match="overwrite"):
    tokenize_images(image_tok, imgs, out, resolution=8, progress=False)

  # a broken image stops the run: no output, finished shards kept; fixing it and re-running resumes
  bad = os.path.join(imgs, rows[6]["file_name"])
  good = open(bad, "rb").read()
  open(bad, "wb").write(b"not an image")
  out2 = str(tmp_path / "out2")
  with pytest.raises(RuntimeError, match=rows[6]["file_name"]):
    tokenize_images(image_tok, imgs, out2, resolution=8, batch_size=4, shard_size=4, progress=False,
                    skip_bad=False)
  assert not os.path.exists(out2)
  assert sorted(n for n in os.listdir(out2 + ".partial") if not n.startswith("settings")) == \
      [m["shards"][0]["file"], m["shards"][0]["file"] + ".done.json"]
  with pytest.raises(FileExistsError, match="restart"):
    tokenize_images(image_tok, imgs, out2, resolution=16, batch_size=4, shard_size=4, progress=False)
  open(bad, "wb").write(good)
  tok_dir = str(tmp_path / "tok")
  image_tok.save_pretrained(tok_dir)
  rc = main(["--tokenizer", tok_dir, "--input", imgs, "--output", out2, "--resolution", "8", "--batch-size", "4",
             "--shard-size", "4", "--quiet", "--strict"])
  assert rc == 0 and not os.path.exists(out2 + ".partial")
  src2 = open_source(out2)
  assert len(src2) == 10 and all(np.array_equal(src[i]["codes"], src2[i]["codes"]) for i in range(10))

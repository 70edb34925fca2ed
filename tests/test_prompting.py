"""Special tokens, text tokenizers and the sequence builders (layouts, truncation, masks)."""
import numpy as np
import pytest

from mmada_jax.prompting import (
    IGNORE_ID,
    LLADA_RESERVED_IDS,
    SpecialTokens,
    TextTokenizer,
    lm_chat_prompt,
    lm_prompt,
    mmu_gen_prompt,
    mmu_prompt,
    padding_attention_bias,
    r2i_prompt,
    t2i_gen_prompt,
    t2i_prompt,
    t2i_uncond_prompt,
    text_gen_prompt,
    train_tiny_tokenizer,
    training_attention_bias,
)

SP = SpecialTokens()
CORPUS = ["a cat sitting on a mat", "the quick brown fox jumps over the lazy dog",
          "multimodal diffusion models predict masked tokens", "Ünïcode ✓ and numbers 12345"]


@pytest.fixture(scope="module")
def tiny_tok():
  return train_tiny_tokenizer(CORPUS * 4, vocab_size=320)


@pytest.fixture(scope="module")
def cases(tiny_mmada_dir):
  return np.load(tiny_mmada_dir / "cases.npz")


# special tokens / tokenizers ------------------------------------------------------------------

def test_special_token_defaults_are_llada_ids():
  assert {k: getattr(SP, k) for k in LLADA_RESERVED_IDS} == LLADA_RESERVED_IDS
  assert SP.pad == SP.eos and SP.image_offset == 126349
  assert SP.image_token_ids(np.array([0, 8191])).tolist() == [126349, 134540]


def test_pretokenized_tokenizer_gives_real_ids():
  tok = TextTokenizer.from_ids()
  assert len(tok) == 126349 and tok.bos_token_id == 126080 and tok.eos_token_id == 126081
  assert SpecialTokens.from_tokenizer(tok) == SP
  assert tok.encode([5, 6, 126347]) == [5, 6, 126347]
  assert tok.encode("<|startoftext|>5 6<|end_header_id|>\n7") == [126080, 5, 6, 126347, 7]
  assert tok.decode([126080, 5]) == "<|startoftext|> 5"
  with pytest.raises(ValueError, match="cannot encode"):
    tok.encode("hello")
  with pytest.raises(ValueError, match="lacks the MMaDA special tokens"):
    SpecialTokens.from_tokenizer(tok, use_reserved_token=False)


def test_tiny_tokenizer_round_trip_and_special_lookup(tiny_tok, tmp_path):
  for text in CORPUS + ["unseen wörds ✓ <tags>"]:
    assert tiny_tok.decode(tiny_tok.encode(text)) == text
  sp = SpecialTokens.from_tokenizer(tiny_tok)
  assert len({getattr(sp, k) for k in LLADA_RESERVED_IDS}) == len(LLADA_RESERVED_IDS)
  assert sp.image_offset == len(tiny_tok) <= 320
  assert max(getattr(sp, k) for k in LLADA_RESERVED_IDS) < sp.image_offset
  assert sp.soi == tiny_tok.token_to_id("<|soi|>") and sp.mask == tiny_tok.token_to_id("<|mdm_mask|>")
  assert sp.bos == tiny_tok.bos_token_id == 0 and sp.pad == sp.eos == 1
  # special strings inside text become their ids
  assert tiny_tok.encode("x<|soi|>y", add_special_tokens=False)[1] == sp.soi
  loaded = TextTokenizer.from_file(tiny_tok.save(tmp_path / "tok"))
  assert len(loaded) == len(tiny_tok) and loaded.encode(CORPUS[1]) == tiny_tok.encode(CORPUS[1])
  assert loaded.bos_token == "<|startoftext|>" and SpecialTokens.from_tokenizer(loaded) == sp
  loaded_file = TextTokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
  assert loaded_file.eos_token_id == sp.eos


def test_tokenizer_without_mmada_tokens_is_rejected():
  tok = train_tiny_tokenizer(CORPUS, vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"])
  with pytest.raises(ValueError, match=r"<\|soi\|>"):
    SpecialTokens.from_tokenizer(tok)
  with pytest.raises(ValueError, match="outside the text vocabulary"):
    SpecialTokens.from_tokenizer(tok, use_reserved_token=True)


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    TextTokenizer.from_file(tmp_path / "nope")


def test_chat_template_string_and_ids(tiny_tok):
  msgs = [{"role": "user", "content": "  a cat \n"}, {"role": "assistant", "content": "the dog"},
          {"role": "user", "content": "fox?"}]
  text = tiny_tok.apply_chat_template(msgs, tokenize=False)
  assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\na cat<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\nthe dog<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\nfox?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n")
  assert tiny_tok.apply_chat_template(msgs[:1], add_generation_prompt=False, tokenize=False).endswith("a cat<|eot_id|>")
  ids = tiny_tok.apply_chat_template(msgs)
  sp = SpecialTokens.from_tokenizer(tiny_tok)
  assert ids[0] == sp.bos and ids[1] == sp.start_header and ids.count(sp.eot_id) == 3
  assert ids.count(sp.end_header) == 4 and ids[-2] == sp.end_header
  assert tiny_tok.decode(ids) == text


def test_chat_template_pretokenized_matches_fixture_prompt(cases):
  prompt = cases["text_gen/in/prompt"][0]
  user, assistant = int(prompt[2]), int(prompt[11])
  tok = TextTokenizer.from_ids(named_ids={"user": user, "assistant": assistant})
  ids = tok.apply_chat_template([{"role": "user", "content": prompt[4:9].tolist()}])
  assert ids == prompt.tolist()


# t2i ----------------------------------------------------------------------------------------

def test_t2i_gen_and_uncond_prompts_match_fixture(cases):
  ids = cases["t2i_gen/in/input_ids"]
  s, n = int(cases["t2i_gen/in/max_text_len"]), int(cases["t2i_gen/in/num_vq_tokens"])
  texts = [[int(x) for x in row[:s + 1] if x not in (SP.ipad, SP.t2i, SP.eos)] for row in ids]
  texts_no_bos = [t[1:] for t in texts]  # BOS is prepended when missing
  for tx in (texts, texts_no_bos):
    pb = t2i_gen_prompt(tx, s, num_image_tokens=n)
    np.testing.assert_array_equal(pb.input_ids, ids)
    np.testing.assert_array_equal(pb.attention_mask, cases["t2i_gen/in/attention_mask"])
  assert (pb.labels == IGNORE_ID).all()
  un = t2i_uncond_prompt(2, s, num_image_tokens=n)
  np.testing.assert_array_equal(un.input_ids, cases["t2i_gen/in/uncond_input_ids"])
  np.testing.assert_array_equal(un.attention_mask, cases["t2i_gen/in/uncond_attention_mask"])


def test_t2i_prompt_layout_and_prompt_mask():
  s, n = 6, 4
  img = SP.image_offset + np.arange(2 * n).reshape(2, n)
  lab = np.where(np.arange(n) % 2 == 0, img, IGNORE_ID)
  pb = t2i_prompt([[5, 6], [SP.bos, 9]], img, s, image_labels=lab)
  assert pb.input_ids.shape == (2, s + n + 3) and pb.input_ids.dtype == np.int32
  assert pb.input_ids[0].tolist() == [SP.ipad, SP.ipad, SP.t2i, SP.bos, 5, 6, SP.eos, SP.soi, *img[0], SP.eoi]
  assert pb.input_ids[1, :s + 1].tolist() == [SP.ipad] * 3 + [SP.t2i, SP.bos, 9, SP.eos]
  assert pb.attention_mask[0].tolist() == [0, 0] + [1] * (s + n + 1)
  assert pb.labels[0].tolist() == [IGNORE_ID] * 2 + [SP.t2i, SP.bos, 5, 6, SP.eos, SP.soi, *lab[0], SP.eoi]
  assert pb.prompt_mask[0].tolist() == [1] * (s + 2) + [0] * n + [1]


def test_t2i_truncation_and_strict():
  s, n = 5, 3
  img = np.full((1, n), SP.mask)
  pb = t2i_prompt([[SP.bos] + list(range(10, 20))], img, s)
  # core = [t2i, bos, 10..19, eos] -> core[:S] + [EOS]
  assert pb.input_ids[0, :s + 1].tolist() == [SP.t2i, SP.bos, 10, 11, 12, SP.eos]
  assert pb.attention_mask.all()
  assert pb.labels[0, s + 1] == SP.soi and pb.labels[0, -1] == SP.eoi and (pb.labels[0, s + 2:-1] == IGNORE_ID).all()
  fits = t2i_prompt([[1, 2, 3]], img, s)  # core length 6 = S + 1: no padding, no truncation
  assert fits.input_ids[0, :s + 1].tolist() == [SP.t2i, SP.bos, 1, 2, 3, SP.eos]
  with pytest.raises(ValueError, match=r"t2i_prompt: rows \[0\] have \[13\] tokens.*budget of 6"):
    t2i_prompt([list(range(10, 20))], img, s, strict=True)
  with pytest.raises(ValueError, match="t2i_gen_prompt"):
    t2i_gen_prompt([list(range(10, 20))], s, num_image_tokens=n, strict=True)


def test_t2i_cond_dropout():
  s, n = 6, 2
  img = np.full((3, n), SP.mask)
  texts = [[5, 6, 7], [8], [9, 9]]
  pb = t2i_prompt(texts, img, s, cond_dropout=np.array([False, True, False]))
  assert pb.input_ids[1, :s + 1].tolist() == [SP.ipad] * 4 + [SP.t2i, SP.bos, SP.eos]
  assert pb.attention_mask[1].sum() == 3 + n + 2
  assert pb.input_ids[0, :s + 1].tolist() == [SP.ipad, SP.t2i, SP.bos, 5, 6, 7, SP.eos]
  a = t2i_prompt(texts, img, s, rng=np.random.default_rng(0), cond_dropout_prob=0.5)
  drop = np.random.default_rng(0).random(3) < 0.5
  b = t2i_prompt(texts, img, s, cond_dropout=drop)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  none = t2i_prompt(texts, img, s, rng=np.random.default_rng(0), cond_dropout_prob=0.0)
  np.testing.assert_array_equal(none.input_ids, t2i_prompt(texts, img, s).input_ids)


# mmu / lm / lm_chat / r2i -----------------------------------------------------------------------

def test_mmu_prompt_layout_prompt_mask_and_truncation():
  s, n = 8, 2
  img = SP.image_offset + np.array([[3, 4], [5, 6], [7, 8]])
  sh, eh, eot = SP.start_header, SP.end_header, SP.eot_id
  texts = [[sh, 11, eh, 12, eot, sh, 13, eh], [21, 22], list(range(30, 45))]
  pb = mmu_prompt(img, texts, s)
  assert pb.input_ids.shape == (3, n + 3 + s)
  # row 0: BOS + 8 + EOS = 10 > S -> text[:S-1] + [EOS]; the last end header is cut off
  assert pb.input_ids[0].tolist() == [SP.mmu, SP.soi, *img[0], SP.eoi, SP.bos, sh, 11, eh, 12, eot, sh, SP.eos]
  assert pb.prompt_mask[0].tolist() == [1] * (n + 3 + 4) + [0] * 4
  assert pb.attention_mask.all()
  assert pb.labels[1].tolist() == [IGNORE_ID] * (n + 3) + [SP.bos, 21, 22] + [SP.eos] * (s - 3)
  assert pb.input_ids[2, n + 3:].tolist() == [SP.bos] + list(range(30, 36)) + [SP.eos]
  assert pb.prompt_mask[1].tolist() == [1] * (n + 3) + [0] * s  # no header: image part only
  with pytest.raises(ValueError, match=r"mmu_prompt: rows \[0, 2\]"):
    mmu_prompt(img, texts, s, strict=True)


def test_mmu_prompt_last_end_header():
  s, n = 10, 2
  img = SP.image_offset + np.zeros((1, n), np.int64)
  sh, eh, eot = SP.start_header, SP.end_header, SP.eot_id
  pb = mmu_prompt(img, [[sh, 11, eh, 12, eot, sh, 13, eh, 14]], s)
  last = n + 3 + 8  # BOS shifts the text by one: the last end header is text index 8
  assert pb.input_ids[0, last] == eh
  assert pb.prompt_mask[0].tolist() == [1] * (last + 1) + [0] * (n + 3 + s - last - 1)


def test_lm_prompt_padding_and_truncation():
  pb = lm_prompt([[5, 6], [SP.bos, 7], list(range(10, 30))], 6)
  assert pb.input_ids.tolist() == [[SP.bos, 5, 6, SP.eos, SP.eos, SP.eos], [SP.bos, 7, SP.eos, SP.eos, SP.eos, SP.eos],
                                   [SP.bos, 10, 11, 12, 13, 14]]  # cut to L, no EOS
  np.testing.assert_array_equal(pb.labels, pb.input_ids)
  assert pb.attention_mask.all() and not pb.prompt_mask.any()
  exact = lm_prompt([[1, 2, 3, 4]], 6)
  assert exact.input_ids[0].tolist() == [SP.bos, 1, 2, 3, 4, SP.eos]
  with pytest.raises(ValueError, match=r"lm_prompt: rows \[2\] have \[22\] tokens.*budget of 6"):
    lm_prompt([[5, 6], [7], list(range(10, 30))], 6, strict=True)
  empty = lm_prompt([[]], 3)
  assert empty.input_ids[0].tolist() == [SP.bos, SP.eos, SP.eos]


def test_lm_chat_prompt_mask():
  sh, eh, eot = SP.start_header, SP.end_header, SP.eot_id
  turns = [sh, 1, eh, 2, eot, sh, 3, eh, 4, eot, sh, 5, eh, 6, 7]
  pb = lm_chat_prompt([turns, [8, 9], turns], 20)
  assert pb.prompt_mask[0].tolist() == [1] * 14 + [0] * 6  # through the last end header (index 13)
  assert not pb.prompt_mask[1].any()
  cut = lm_chat_prompt([turns], 10)  # truncated before the last header: the earlier one counts
  assert cut.prompt_mask[0].tolist() == [1] * 9 + [0]
  with pytest.raises(ValueError, match="lm_chat_prompt"):
    lm_chat_prompt([turns], 10, strict=True)


def test_r2i_prompt():
  s, n = 8, 2
  img = SP.image_offset + np.array([[1, 2], [3, 4]])
  sh, eh = SP.start_header, SP.end_header
  pb = r2i_prompt(img, [[sh, 7, eh, 9], [5]], s)
  assert pb.input_ids[0].tolist() == [SP.r2i, SP.bos, sh, 7, eh, 9, SP.eos, SP.eos, SP.eos, SP.soi, *img[0], SP.eoi]
  assert pb.prompt_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1]
  assert pb.prompt_mask[1].tolist() == [1] * (s + 2) + [0] * n + [1]
  np.testing.assert_array_equal(pb.labels, pb.input_ids)


# generation prompts -------------------------------------------------------------------------

def test_mmu_gen_prompt_matches_fixture(cases):
  prompt = cases["text_gen/in/prompt_mmu"]
  n = 16
  pb = mmu_gen_prompt(prompt[:, 2:2 + n], [row[n + 3:] for row in prompt])
  np.testing.assert_array_equal(pb.input_ids, prompt)
  assert pb.attention_mask.all()
  short = mmu_gen_prompt(prompt[:, 2:2 + n], [prompt[0, n + 3:], prompt[1, n + 3:-2]])
  assert short.input_ids[1, :2].tolist() == [SP.eos, SP.eos] and short.attention_mask[1, :2].tolist() == [0, 0]
  np.testing.assert_array_equal(short.input_ids[1, 2:], prompt[1, :-2])


def test_text_gen_prompt_matches_fixture(cases):
  padded, mask = cases["text_gen/in/prompt_padded"], cases["text_gen/in/prompt_padded_mask"]
  rows = [r[m.astype(bool)] for r, m in zip(padded, mask)]
  pb = text_gen_prompt(rows)
  np.testing.assert_array_equal(pb.input_ids, padded)
  np.testing.assert_array_equal(pb.attention_mask, mask)


# attention biases ---------------------------------------------------------------------------

def test_training_attention_bias_modes():
  m = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
  add = np.asarray(training_attention_bias(m, 1, mode="original_additive"))
  assert add.dtype == np.float32 and add.shape == (3, 1, 3, 3)
  np.testing.assert_array_equal(add[0, 0], np.outer(m[0], m[0]))
  assert (add[1:] == 1).all()  # non-t2i rows: +1 everywhere, whatever their mask
  hard = np.asarray(training_attention_bias(m, 1))
  assert hard.dtype == bool
  np.testing.assert_array_equal(hard[0, 0], np.outer(m[0], m[0]).astype(bool))
  assert hard[1:].all()
  np.testing.assert_array_equal(np.asarray(padding_attention_bias(m))[2, 0], np.outer(m[2], m[2]).astype(bool))
  with pytest.raises(ValueError, match="unknown attention bias mode"):
    training_attention_bias(m, 1, mode="soft")


def test_builders_with_tiny_tokenizer_ids(tiny_tok):
  sp = SpecialTokens.from_tokenizer(tiny_tok)
  s, n = 12, 4
  img = sp.image_token_ids(np.arange(n)[None])
  text = tiny_tok.encode("a cat")
  pb = t2i_prompt([text], img, s, specials=sp)
  row = pb.input_ids[0]
  assert row[s + 1] == sp.soi and row[-1] == sp.eoi and (row[s + 2:-1] >= len(tiny_tok)).all()
  assert row[s] == sp.eos and sp.t2i in row[:s] and sp.ipad == row[0]
  chat = tiny_tok.apply_chat_template([{"role": "user", "content": "a cat?"}])
  mm = mmu_prompt(img, [chat[1:]], 24, specials=sp)
  # the prompt ends at the generation prompt's end header; its trailing "\n" is answer
  assert mm.input_ids[0, n + 3] == sp.bos and chat[-2] == sp.end_header
  assert mm.prompt_mask[0].sum() == n + 3 + len(chat) - 1

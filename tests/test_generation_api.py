"""MMaDA.generate_text / answer / generate_images on a small random model and tokenizers."""
import jax
import numpy as np
import pytest

from mmada_jax import GenerationConfig, ImageTokenizer, MMaDA
from mmada_jax.api import generation
from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
from mmada_jax.model import MMaDAConfig
from mmada_jax.prompting import SpecialTokens, train_tiny_tokenizer

CODE_BITS = 6


@pytest.fixture(scope="module")
def setup():
  tok = train_tiny_tokenizer(["a handwritten digit one two three", "what is 2 + 3 ? 5"] * 20, vocab_size=300)
  sp = SpecialTokens.from_tokenizer(tok)
  vq = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=(1, 1, 1), attn_resolutions=(),
                   z_channels=CODE_BITS, resolution=16)
  itok = ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, codebook_dim=CODE_BITS), jax.random.key(0))
  vocab = len(tok) + 2 ** CODE_BITS
  cfg = MMaDAConfig(vocab_size=vocab, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    mask_token_id=sp.mask, eos_token_id=sp.eos, pad_token_id=sp.eos,
                    codebook_size=2 ** CODE_BITS, num_vq_tokens=16)
  gc = GenerationConfig(max_text_len=8, num_vq_tokens=16, gen_length=8, block_length=4, steps=4,
                        t2i_steps=4, t2i_guidance_scale=2.0)
  return MMaDA.init(cfg, 0, generation_config=gc), tok, itok


def test_generate_text(setup):
  model, tok, _ = setup
  out = model.generate_text(["what is 2 + 3 ?", "one"], tokenizer=tok, gen_length=8, block_length=4, steps=4,
                            return_trajectory=True)
  assert out.tokens.shape == (2, 8) and len(out.texts) == 2
  assert out.trajectory.shape[0] == 4 and out.trajectory.shape[1] == 2
  assert (out.sequences[:, -8:] == out.tokens).all()
  cached = model.generate_text(["what is 2 + 3 ?", "one"], tokenizer=tok, gen_length=8, block_length=4, steps=4,
                               cache="prefix", threshold=0.9)
  assert cached.tokens.shape == (2, 8) and 2 <= cached.n_forward <= 8   # >= 1 token per forward


def test_invalid_settings(setup):
  model, tok, _ = setup
  with pytest.raises(ValueError, match="block_length"):
    model.generate_text("one", tokenizer=tok, gen_length=10, block_length=4, steps=4)
  with pytest.raises(ValueError, match="steps"):
    model.generate_text("one", tokenizer=tok, gen_length=8, block_length=4, steps=3)
  with pytest.raises(ValueError, match="tokenizer"):
    model.generate_text("one", tokenizer=None)


def test_answer_and_generate_images(setup):
  model, tok, itok = setup
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ans = model.answer(images, ["what is shown?", "which digit?"], image_tokenizer=itok, tokenizer=tok,
                     gen_length=4, block_length=4, steps=2)
  assert ans.tokens.shape == (2, 4)
  gen = model.generate_images(["digit one", "digit two"], image_tokenizer=itok, tokenizer=tok,
                              guidance_scale=2.0, steps=4, max_text_len=8, return_trajectory=True)
  assert gen.images.dtype == np.uint8 and gen.images.shape == (2, 16, 16, 3)
  assert gen.codes.shape == (2, 16) and gen.codes.dtype == np.int32
  # (the codes' range is checked by generate_images itself.) The images are the decoded codes,
  # and a code known before the last step is never changed by it.
  decoded = np.asarray(itok.decode(gen.codes))
  np.testing.assert_array_equal(gen.images, (np.clip((decoded + 1) / 2, 0, 1) * 255).astype(np.uint8))
  assert gen.trajectory.shape == (4, 2, 16)
  known = gen.trajectory[-1] >= 0
  assert known.any() and np.array_equal(gen.trajectory[-1][known], gen.codes[known])
  assert (gen.trajectory[0] == -1).sum() > (gen.trajectory[-1] == -1).sum()


def test_defaults_come_from_the_generation_config(setup):
  model, tok, itok = setup
  out = model.generate_text(["one", "two"], tokenizer=tok, return_trajectory=True)
  assert out.tokens.shape == (2, 8) and out.trajectory.shape[0] == 4        # gen_length 8, steps 4
  gen = model.generate_images(["digit one"], image_tokenizer=itok, tokenizer=tok, return_trajectory=True)
  assert gen.trajectory.shape == (4, 1, 16)                                 # t2i_steps 4


def test_generate_images_uses_the_saved_prompt_layout(setup, tmp_path, monkeypatch):
  """A checkpoint saved with max_text_len=S (not 128, not the released 512) gets an S-token text
  prefix after loading, without being told."""
  model, tok, itok = setup
  gc = model.generation_config.replace(max_text_len=12)
  MMaDA(model.params, model.config, generation_config=gc).save_pretrained(tmp_path / "m")
  loaded = MMaDA.from_pretrained(tmp_path / "m")
  assert loaded.generation_config.max_text_len == 12
  seen = []
  real = generation.generate_image_tokens

  def spy(params, cfg, input_ids, **kw):
    seen.append(np.shape(input_ids))
    return real(params, cfg, input_ids, **kw)

  monkeypatch.setattr(generation, "generate_image_tokens", spy)
  a = loaded.generate_images(["digit one", "digit two"], image_tokenizer=itok, tokenizer=tok, seed=1)
  b = model.generate_images(["digit one", "digit two"], image_tokenizer=itok, tokenizer=tok, seed=1,
                            max_text_len=12)
  assert seen == [(2, 12 + 16 + 3)] * 2
  np.testing.assert_array_equal(a.codes, b.codes)


def test_out_of_range_codes_are_an_error(setup, monkeypatch):
  model, tok, itok = setup
  real = generation.generate_image_tokens

  def bad(*args, **kw):
    s = real(*args, **kw)
    return s._replace(codes=s.codes.at[0, 3].set(2 ** CODE_BITS + 5))

  monkeypatch.setattr(generation, "generate_image_tokens", bad)
  with pytest.raises(ValueError, match=r"code 69 lies outside the image tokenizer's codebook \[0, 64\)"):
    model.generate_images(["digit one"], image_tokenizer=itok, tokenizer=tok)


def test_layout_and_tokenizer_errors(setup):
  model, tok, itok = setup
  with pytest.raises(ValueError, match="exceeds the model's max_sequence_length"):
    model.generate_images(["one"], image_tokenizer=itok, tokenizer=tok, max_text_len=5000)
  with pytest.raises(ValueError, match="needs an image tokenizer"):
    model.generate_images(["one"], image_tokenizer=None, tokenizer=tok)


def test_deprecated_aliases_warn_and_match(setup):
  model, tok, itok = setup
  kw = dict(tokenizer=tok, gen_length=8, block_length=4, steps=4, temperature=1.0)
  new = model.generate_text(["one"], guidance_scale=1.0, seed=jax.random.key(2), **kw)
  with pytest.warns(DeprecationWarning, match="cfg_scale= is deprecated"):
    old = model.generate_text(["one"], cfg_scale=1.0, key=jax.random.key(2), **kw)
  np.testing.assert_array_equal(old.tokens, new.tokens)
  t2i = dict(image_tokenizer=itok, tokenizer=tok)
  new = model.generate_images(["one"], guidance_scale=1.5, steps=3, seed=7, **t2i)
  with pytest.warns(DeprecationWarning) as record:
    old = model.generate_images(["one"], cfg_scale=1.5, timesteps=3, key=jax.random.key(7), **t2i)
  assert {str(w.message).split(":")[1].split("=")[0].strip() for w in record} == {"cfg_scale", "timesteps", "key"}
  np.testing.assert_array_equal(old.codes, new.codes)


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_mesh_argument(setup):
  from mmada_jax.sharding import make_mesh
  model, tok, itok = setup
  mesh = make_mesh("fsdp=2", jax.devices()[:2])
  kw = dict(tokenizer=tok, gen_length=8, block_length=4, steps=4)
  a = model.generate_text(["what is 2 + 3 ?", "one"], **kw)
  b = model.generate_text(["what is 2 + 3 ?", "one"], mesh=mesh, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  qa = dict(image_tokenizer=itok, tokenizer=tok, gen_length=4, block_length=4, steps=2)
  np.testing.assert_array_equal(model.answer(images, ["a?", "b?"], **qa).tokens,
                                model.answer(images, ["a?", "b?"], mesh=mesh, **qa).tokens)
  t2i = dict(image_tokenizer=itok, tokenizer=tok, seed=3)
  np.testing.assert_array_equal(model.generate_images(["one", "two"], **t2i).codes,
                                model.generate_images(["one", "two"], mesh=mesh, **t2i).codes)

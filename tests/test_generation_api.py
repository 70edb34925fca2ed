"""MMaDA.generate_text / answer / generate_images on a small random model and tokenizers."""
import jax
import numpy as np
import pytest

from mmada_jax import ImageTokenizer, MMaDA
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
  return MMaDA.init(cfg, 0), tok, itok


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
  assert gen.codes.shape == (2, 16) and gen.codes.max() < 2 ** CODE_BITS
  assert gen.trajectory.shape == (4, 2, 16)
  assert (gen.trajectory[0] == -1).sum() > (gen.trajectory[-1] == -1).sum()

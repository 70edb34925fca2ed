"""Samplers: token-exact replay of the reference fixtures, cached/threshold variants, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax.checkpoint.hf_mmada import load_hf_checkpoint
from mmada_jax.model import transformer
from mmada_jax.parity import replay
from mmada_jax.sampling import schedules
from mmada_jax.sampling.cache import generate_text_cached, window_logits
from mmada_jax.sampling.t2i import _generate_image_tokens, generate_image_tokens
from mmada_jax.sampling.text import _generate_core, _generate_text, generate_text

MASK = 126336


@pytest.fixture(scope="module")
def model(tiny_mmada_dir):
  return load_hf_checkpoint(str(tiny_mmada_dir), dtype="float32")


@pytest.fixture(scope="module")
def cases(tiny_mmada_dir):
  return replay.load_cases(str(tiny_mmada_dir / "cases.npz"))


@pytest.mark.parametrize("name", list(replay.TEXT_SETTINGS))
def test_text_gen_fixture_exact(model, cases, name):
  params, cfg = model
  got = replay.run_text_setting(params, cfg, cases, name)
  assert not replay.compare(got, cases, f"text_gen/out/{name}")


@pytest.mark.parametrize("name", list(replay.T2I_SETTINGS))
def test_t2i_gen_fixture_exact(model, cases, name):
  params, cfg = model
  got = replay.run_t2i_setting(params, cfg, cases, name)
  assert not replay.compare(got, cases, f"t2i_gen/out/{name}")
  # The last step re-masks one slot (floor(N cos(pi/2)) < 0 clamps to 1); the codes are complete.
  n = int(cases["t2i_gen/in/num_vq_tokens"])
  assert np.all((got["final_input_ids"][:, -(n + 1):-1] == MASK).sum(1) == 1)


def test_t2i_default_uncond_prefix_is_text_prefix(model, cases):
  params, cfg = model
  inp, out = "t2i_gen/in", "t2i_gen/out/cfg2_t6"
  s = _generate_image_tokens(
      params, cfg, cases[f"{inp}/input_ids"], attention_mask=cases[f"{inp}/attention_mask"],
      uncond_input_ids=cases[f"{inp}/uncond_input_ids"],
      uncond_attention_mask=cases[f"{inp}/uncond_attention_mask"], steps=6, guidance_scale=2.0,
      temperature=1.0, num_vq_tokens=16, multinomial_tape=cases[f"{out}.multinomial"],
      gumbel_tape=cases[f"{out}.gumbel"])
  np.testing.assert_array_equal(np.asarray(s.codes), cases[f"{out}.sampled_ids"])


def test_text_sampler_is_one_program_and_rows_independent(model, cases):
  params, cfg = model
  prompt = cases["text_gen/in/prompt"]
  kw = dict(gen_length=8, block_length=4, steps=4, temperature=0.7, seed=jax.random.key(3))
  both = generate_text(params, cfg, prompt, **kw)
  size = _generate_core._cache_size()
  # New prompt values, same shapes: no recompilation.
  generate_text(params, cfg, prompt[::-1].copy(), **kw)
  assert _generate_core._cache_size() == size
  trip = np.asarray(generate_text(params, cfg, np.concatenate([prompt, prompt[:1]]), **kw).tokens)
  np.testing.assert_array_equal(trip[:2, :prompt.shape[1]], prompt)
  assert not np.any(trip == MASK)
  assert not np.any(np.asarray(both.tokens) == MASK)
  # Greedy rows are independent of the rest of the batch.
  greedy = dict(gen_length=8, block_length=4, steps=4)
  g2 = np.asarray(generate_text(params, cfg, prompt, **greedy).tokens)
  g1 = np.asarray(generate_text(params, cfg, prompt[1:], **greedy).tokens)
  np.testing.assert_array_equal(g2[1:], g1)


@pytest.mark.parametrize("name", ["g16_b8_s4", "g8_b8_s4_cfg1", "g8_b4_s4_padded"])
def test_cache_none_equals_plain(model, cases, name):
  params, cfg = model
  s = replay.TEXT_SETTINGS[name]
  am = cases[f"text_gen/out/{name}.attention_mask"] if s.padded else None
  kw = dict(gen_length=s.gen_length, block_length=s.block_length, steps=s.steps,
            guidance_scale=s.guidance_scale, attention_mask=am, return_trajectory=True)
  prompt = cases[f"text_gen/in/{s.prompt}"]
  for extra in (dict(threshold=None), dict(threshold=1e9, min_transfer="schedule")):
    r = generate_text_cached(params, cfg, prompt, cache="none", **extra, **kw)
    n = int(r.n_forward)
    np.testing.assert_array_equal(np.asarray(r.tokens), cases[f"text_gen/out/{name}.output"])
    np.testing.assert_array_equal(np.asarray(r.trajectory)[:n], cases[f"text_gen/out/{name}.trajectory"])


def test_cache_none_equals_plain_with_noise(model, cases):
  params, cfg = model
  prompt = cases["text_gen/in/prompt"]
  key = jax.random.key(7)
  for kw in (dict(temperature=1.0), dict(remasking="random")):
    a = generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, seed=key, **kw)
    b = generate_text_cached(params, cfg, prompt, gen_length=8, block_length=4, steps=4, seed=key,
                             cache="none", **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("dual", [False, True])
def test_window_logits_match_full_forward_on_fresh_cache(model, cases, dual):
  params, cfg = model
  x = jnp.asarray(cases["text_gen/out/g16_b8_s4.trajectory"][2], jnp.int32)   # mid-generation
  p, kb = cases["text_gen/in/prompt"].shape[1], 8
  full, kv = transformer.forward(params, cfg, x, return_kv=True, return_hidden=True)
  full = transformer.project_logits(params, cfg, full)
  key_ok = jnp.ones(x.shape, bool)
  win_fn = jax.jit(window_logits, static_argnames=("cfg", "block_length", "window", "dual"))
  for start in (p, p + kb):
    # dual with a bare block, or prefix with a window reaching the end: every key is fresh.
    window = kb if dual else x.shape[1] - start
    lg = win_fn(params, cfg, x, kv, jnp.int32(start), key_ok, block_length=kb,
                       window=max(window, kb), dual=dual)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(full[:, start:start + kb]), rtol=1e-5, atol=1e-5)


def test_cached_threshold_decoding(model, cases):
  params, cfg = model
  prompt = cases["text_gen/in/prompt"]
  kw = dict(gen_length=16, block_length=8, steps=4)
  r0 = generate_text_cached(params, cfg, prompt, cache="prefix", threshold=0.0, **kw)
  assert int(r0.n_forward) == 2 and np.asarray(r0.block_steps).tolist() == [1, 1]
  assert not np.any(np.asarray(r0.tokens) == MASK)
  r1 = generate_text_cached(params, cfg, prompt, cache="dual", threshold=1.5, **kw)
  assert np.asarray(r1.block_steps).tolist() == [8, 8] and not np.any(np.asarray(r1.tokens) == MASK)
  r2 = generate_text_cached(params, cfg, prompt, cache="prefix", horizon=4, **kw)
  assert np.asarray(r2.block_steps).tolist() == [2, 2] and not np.any(np.asarray(r2.tokens) == MASK)
  np.testing.assert_array_equal(np.asarray(r2.tokens)[:, :prompt.shape[1]], prompt)


def test_cached_stop_token(model, cases):
  params, cfg = model
  prompt = cases["text_gen/in/prompt"][:1]
  p, kw = prompt.shape[1], dict(gen_length=8, block_length=4, steps=4, cache="prefix")
  full = np.asarray(generate_text_cached(params, cfg, prompt, **kw).tokens)
  stop = int(full[0, p + 3])
  r = generate_text_cached(params, cfg, prompt, stop_token_id=stop, **kw)
  assert int(r.n_forward) == 2 and np.asarray(r.block_steps).tolist() == [2, 0]
  np.testing.assert_array_equal(np.asarray(r.tokens)[0, :p + 4], full[0, :p + 4])
  assert np.all(np.asarray(r.tokens)[0, p + 4:] == MASK)


def test_t2i_with_key(model, cases):
  params, cfg = model
  inp = "t2i_gen/in"
  s = generate_image_tokens(
      params, cfg, cases[f"{inp}/input_ids"], attention_mask=cases[f"{inp}/attention_mask"],
      uncond_input_ids=cases[f"{inp}/uncond_input_ids"],
      uncond_attention_mask=cases[f"{inp}/uncond_attention_mask"], steps=4, guidance_scale=1.5,
      num_vq_tokens=16, seed=jax.random.key(0), compound_temperature=False, return_trajectory=True)
  codes, ids = np.asarray(s.codes), np.asarray(s.input_ids)
  # (codes are drawn over the codebook's logits only, so their range cannot fail.) Sampled, not
  # the loop's zero-initialised buffer: many distinct codes.
  assert codes.shape == (2, 16) and len(np.unique(codes)) > 8
  slots = ids[:, -17:-1]
  np.testing.assert_array_equal(np.where(slots == MASK, codes, slots - 126349), codes)
  assert s.trajectory.shape == (4, 4, 33)


def test_schedules_float32():
  # cos(pi/3) is 0.49999997 in float32: 16 * it floors to 7, and the last step gives -1.
  np.testing.assert_array_equal(schedules.mask_len_table("cosine", 3, 16), [13, 7, -1])
  np.testing.assert_allclose(schedules.temperature_table(1.0, 4), [0.75, 0.375, 0.09375, 0.0])
  np.testing.assert_allclose(schedules.temperature_table(1.0, 4, compound=False), [0.75, 0.5, 0.25, 0.0])
  assert schedules.mask_ratios("linear", 2)[-1] == np.float32(1e-6)
  with pytest.raises(ValueError, match="unknown mask schedule"):
    schedules.get_mask_schedule("nope")


def test_invalid_settings_raise(model, cases):
  params, cfg = model
  prompt = cases["text_gen/in/prompt"]
  with pytest.raises(ValueError, match="not a multiple of block_length"):
    generate_text(params, cfg, prompt, gen_length=10, block_length=4, steps=4)
  with pytest.raises(ValueError, match="multiple of the number of blocks"):
    generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=3)
  with pytest.raises(ValueError, match="exceeds the model's max_sequence_length"):
    g = cfg.max_sequence_length
    generate_text(params, cfg, prompt, gen_length=g, block_length=g, steps=8)
  with pytest.raises(ValueError, match="PRNG key or a rand_tape"):
    _generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, remasking="random")
  with pytest.raises(ValueError, match="remasking"):
    generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, remasking="top")
  with pytest.raises(ValueError, match="threshold decoding"):
    generate_text_cached(params, cfg, prompt, gen_length=8, block_length=4, steps=4, remasking="random",
                         threshold=0.9, seed=jax.random.key(0))
  with pytest.raises(ValueError, match="cache="):
    generate_text_cached(params, cfg, prompt, gen_length=8, block_length=4, steps=4, cache="full")
  ids = cases["t2i_gen/in/input_ids"]
  with pytest.raises(ValueError, match="needs uncond_input_ids"):
    generate_image_tokens(params, cfg, ids, guidance_scale=2.0, num_vq_tokens=16, seed=jax.random.key(0))
  with pytest.raises(ValueError, match="PRNG key or the multinomial"):
    _generate_image_tokens(params, cfg, ids, num_vq_tokens=16)
  with pytest.raises(ValueError, match="gumbel_tape must be"):
    _generate_image_tokens(params, cfg, ids, num_vq_tokens=16, steps=4,
                           multinomial_tape=np.zeros((4, 32), np.int64), gumbel_tape=np.zeros((4, 2, 8)))
  with pytest.raises(TypeError, match="seed must be an int or a jax PRNG key"):
    generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, seed="zero")
  with pytest.raises(TypeError, match="no longer accepts rand_tape="):
    generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, rand_tape=np.zeros((4, 2, 20)))
  with pytest.raises(TypeError, match="no longer accepts multinomial_tape="):
    generate_image_tokens(params, cfg, ids, num_vq_tokens=16, multinomial_tape=np.zeros((4, 32)))
  with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
    generate_image_tokens(params, cfg, ids, num_vq_tokens=16, stepz=4)
  with pytest.raises(TypeError, match="both guidance_scale= and its deprecated alias cfg_scale="):
    generate_text(params, cfg, prompt, gen_length=8, block_length=4, steps=4, guidance_scale=1.0, cfg_scale=1.0)


@pytest.mark.slow  # fast tier < 4 min; CI's slow tier runs it
def test_deprecated_sampler_aliases_warn_and_match(model, cases):
  """cfg_scale= / key= (text samplers) and timesteps= / key= (t2i) still work for one release."""
  params, cfg = model
  prompt = cases["text_gen/in/prompt"]
  kw = dict(gen_length=8, block_length=4, steps=4, temperature=1.0)
  new = generate_text(params, cfg, prompt, guidance_scale=1.0, seed=jax.random.key(5), **kw)
  with pytest.warns(DeprecationWarning, match="cfg_scale= is deprecated"):
    old = generate_text(params, cfg, prompt, cfg_scale=1.0, key=jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(old.tokens), np.asarray(new.tokens))
  with pytest.warns(DeprecationWarning, match="key= is deprecated"):
    old = generate_text_cached(params, cfg, prompt, cache="prefix", key=jax.random.key(5), **kw)
  new = generate_text_cached(params, cfg, prompt, cache="prefix", seed=jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(old.tokens), np.asarray(new.tokens))
  # An int seed is jax.random.key(seed).
  a = generate_text(params, cfg, prompt, seed=3, **kw)
  b = generate_text(params, cfg, prompt, seed=jax.random.key(3), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  inp = "t2i_gen/in"
  t2i = dict(attention_mask=cases[f"{inp}/attention_mask"], num_vq_tokens=16)
  new = generate_image_tokens(params, cfg, cases[f"{inp}/input_ids"], steps=3, seed=4, **t2i)
  with pytest.warns(DeprecationWarning, match="timesteps= is deprecated"):
    old = generate_image_tokens(params, cfg, cases[f"{inp}/input_ids"], timesteps=3, key=jax.random.key(4), **t2i)
  np.testing.assert_array_equal(np.asarray(old.codes), np.asarray(new.codes))


def _full_logits_reference(params, cfg, prompt, *, gen_length, block_length, steps, temperature=0.0,
                           guidance_scale=0.0, remasking="low_confidence", key=None):
  """The plain sampler as the original runs it: the LM head over every position at every step."""
  from mmada_jax.sampling.text import (chosen_probability, initial_sequence, sample_tokens, select_top,
                                       step_key, transfer_count)
  fwd = jax.jit(lambda x: transformer.forward(params, cfg, x))
  x = initial_sequence(prompt, gen_length, MASK)
  b, total = x.shape
  p_len, nb = prompt.shape[1], gen_length // block_length
  s, prompt_index, pos = steps // nb, x != MASK, jnp.arange(total)[None]
  for blk in range(nb):
    start, end = p_len + blk * block_length, p_len + (blk + 1) * block_length
    masked_in_block = jnp.sum((x == MASK) & (pos >= start) & (pos < end), axis=1).astype(jnp.int32)
    for i in range(s):
      if guidance_scale > 0:
        cond, un = jnp.split(fwd(jnp.concatenate([x, jnp.where(prompt_index, MASK, x)])), 2)
        logits = un + (guidance_scale + 1.0) * (cond - un)
      else:
        logits = fwd(x)
      kg, ku = step_key(key, jnp.int32(blk), jnp.int32(i))
      gumbel = jax.random.gumbel(kg, logits.shape, jnp.float32) if temperature > 0 else None
      x0 = sample_tokens(logits, temperature, gumbel)
      p = (chosen_probability(logits, x0) if remasking == "low_confidence"
           else jax.random.uniform(ku, (b, total), jnp.float32))
      mask_index = x == MASK
      conf = jnp.where(mask_index, jnp.where(pos >= end, -jnp.inf, p), -jnp.inf)
      transfer = select_top(conf, transfer_count(masked_in_block, s, jnp.int32(i)), -(-block_length // s))
      x = jnp.where(transfer, jnp.where(mask_index, x0, x), x)
  return np.asarray(x)


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(remasking="random"),
                                dict(guidance_scale=1.5, temperature=0.5), dict(mask_prompt=True)])
def test_block_only_head_equals_full_logits(model, cases, kw):
  """The LM head projected at the block only (or everywhere when a MASK precedes the block) gives
  the tokens of the full-logits algorithm, noise included; the cached sampler's 'none' mode too."""
  params, cfg = model
  kw = dict(kw)
  prompt = np.asarray(cases["text_gen/in/prompt"]).copy()
  if kw.pop("mask_prompt", False):
    prompt[:, 2] = MASK   # eligible on every step: the full projection branch
  key = jax.random.key(11)
  common = dict(gen_length=8, block_length=4, steps=4, **kw)
  ref = _full_logits_reference(params, cfg, prompt, key=key, **common)
  got = generate_text(params, cfg, prompt, seed=key, **common).tokens
  np.testing.assert_array_equal(np.asarray(got), ref)
  cached = generate_text_cached(params, cfg, prompt, seed=key, cache="none", **common).tokens
  np.testing.assert_array_equal(np.asarray(cached), ref)
  if kw == dict(temperature=0.8):   # a replayed Gumbel tape [steps, B, P+G, V] is sliced to the block
    from mmada_jax.sampling.text import step_key
    shape = (prompt.shape[0], prompt.shape[1] + 8, cfg.vocab_size)
    tape = jnp.stack([jax.random.gumbel(step_key(key, jnp.int32(k // 2), jnp.int32(k % 2))[0], shape)
                      for k in range(4)])
    taped = _generate_text(params, cfg, prompt, gumbel_tape=tape, **common).tokens
    np.testing.assert_array_equal(np.asarray(taped), ref)

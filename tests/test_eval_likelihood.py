"""The masked-diffusion log-likelihood estimator against exact values on a tiny random model."""
from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

from mmada_jax import MMaDA
from mmada_jax.eval import likelihood
from mmada_jax.model import MMaDAConfig

MASK = 63


@pytest.fixture(scope="module")
def model() -> MMaDA:
  cfg = MMaDAConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    mask_token_id=MASK, eos_token_id=1, pad_token_id=1, codebook_size=8, num_vq_tokens=4)
  return MMaDA.init(cfg, 3)


def _logits(model: MMaDA, ids: list[int], prompt_len: int, w: float) -> np.ndarray:
  """float64 [L, V] log-probs of ids (with CFG weight w against the prompt masked)."""
  cond = np.asarray(model.logits(np.asarray([ids])), np.float64)[0]
  if w > 0:
    un_ids = [MASK] * prompt_len + ids[prompt_len:]
    un = np.asarray(model.logits(np.asarray([un_ids])), np.float64)[0]
    cond = un + (w + 1) * (cond - un)
  return cond - np.log(np.exp(cond - cond.max(-1, keepdims=True)).sum(-1, keepdims=True)) - cond.max(-1, keepdims=True)


def _exact_bound(model: MMaDA, prompt: list[int], cont: list[int], w: float = 0.0) -> float:
  """-E_k E_S [(n/k) Σ_{j∈S} CE_j] by enumerating every mask subset."""
  n, p = len(cont), len(prompt)
  total = 0.0
  for k in range(1, n + 1):
    subsets = list(itertools.combinations(range(n), k))
    acc = 0.0
    for s in subsets:
      ids = prompt + [MASK if j in s else t for j, t in enumerate(cont)]
      lp = _logits(model, ids, p, w)
      acc += (n / k) * sum(-lp[p + j, cont[j]] for j in s)
    total += acc / len(subsets) / n
  return -total


def test_mask_counts_are_spread_with_an_offset():
  counts = np.asarray(likelihood.mask_counts(jax.random.key(0), np.int32(10), 5))
  assert sorted(counts.tolist()) == sorted(((counts[0] - 1 + np.arange(5) * 2) % 10 + 1).tolist())
  assert counts.min() >= 1 and counts.max() <= 10
  for seed in range(20):
    c = np.asarray(likelihood.mask_counts(jax.random.key(seed), np.int32(3), 8))
    assert c.min() >= 1 and c.max() <= 3
  masks = np.asarray(likelihood.continuation_masks(jax.random.key(1), np.int32(4), 9, jax.numpy.asarray([1, 3, 5])))
  assert not masks[:, :4].any() and masks.sum(1).tolist() == [1, 3, 5]


@pytest.mark.parametrize("w", [0.0, 0.5])
def test_single_token_continuation_is_exact(model, w):
  prompt, tok = [5, 9, 12, 7], 20
  exact = _logits(model, prompt + [MASK], len(prompt), w)[len(prompt), tok]
  for mc_num, batch in ((1, 8), (4, 2), (8, 8)):
    est = likelihood.log_likelihood(model, prompt, [tok], mc_num=mc_num, batch_size=batch, guidance_scale=w, seed=7)
    assert est.log_likelihood == pytest.approx(exact, abs=1e-4) and est.stderr == pytest.approx(0.0, abs=1e-5)


def test_deterministic_for_a_seed(model):
  a = likelihood.log_likelihood(model, [5, 9], [20, 21, 22], mc_num=8, batch_size=4, seed=3)
  b = likelihood.log_likelihood(model, [5, 9], [20, 21, 22], mc_num=8, batch_size=4, seed=3)
  c = likelihood.log_likelihood(model, [5, 9], [20, 21, 22], mc_num=8, batch_size=4, seed=4)
  assert a.log_likelihood == b.log_likelihood and a.log_likelihood != c.log_likelihood
  assert (a.rounds, a.copies) == (2, 4) and a.stderr > 0


@pytest.mark.parametrize("cont,w", [([20, 33], 0.0), ([20, 33, 41], 0.0), ([20, 33, 41], 2.0)])
def test_mean_over_seeds_approaches_the_enumerated_bound(model, cont, w):
  prompt = [5, 9, 12]
  exact = _exact_bound(model, prompt, cont, w)
  ests = [likelihood.log_likelihood(model, prompt, cont, mc_num=8, batch_size=4, guidance_scale=w, seed=s)
          for s in range(40)]
  values = np.array([e.log_likelihood for e in ests])
  sem = values.std(ddof=1) / math.sqrt(len(values))
  assert abs(values.mean() - exact) < 4 * sem + 1e-6, (values.mean(), exact, sem)
  # The reported stderr of one estimate matches the spread across seeds (within a loose factor).
  reported = np.mean([e.stderr for e in ests])
  assert values.std(ddof=1) / 3 < reported < 3 * values.std(ddof=1)


def test_bad_arguments(model):
  with pytest.raises(ValueError, match="mc_num=6 must be a multiple of batch_size=4"):
    likelihood.log_likelihood(model, [1], [2, 3], mc_num=6, batch_size=4)
  with pytest.raises(ValueError, match="continuation_ids is empty"):
    likelihood.log_likelihood(model, [1], [])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    likelihood.log_likelihood(model, [1], [200])

"""Equal-length batching: per-example generations identical for batch size 1 and 8."""
from __future__ import annotations

import numpy as np
import pytest

from mmada_jax import GenerationConfig, MMaDA
from mmada_jax.eval import batching
from mmada_jax.model import MMaDAConfig


def test_equal_length_chunks():
  assert batching.equal_length_chunks([3, 4, 3, 3, 4], 2) == [[0, 2], [3], [1, 4]]
  with pytest.raises(ValueError, match="batch_size"):
    batching.equal_length_chunks([1], 0)


def test_generations_do_not_depend_on_batch_size():
  cfg = MMaDAConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                    mask_token_id=63, eos_token_id=1, pad_token_id=1, codebook_size=8, num_vq_tokens=4,
                    max_sequence_length=64)
  model = MMaDA.init(cfg, 0, generation_config=GenerationConfig(max_text_len=8, num_vq_tokens=4))
  rng = np.random.default_rng(0)
  ids = [list(rng.integers(2, 60, n)) for n in (3, 5, 3, 5, 3, 3, 5, 3)]
  kw = dict(gen_length=4, block_length=2, steps=4, temperature=0.0)
  one = batching.generate_unpadded(model, ids, batch_size=1, **kw)
  eight = batching.generate_unpadded(model, ids, batch_size=8, **kw)
  assert all(np.array_equal(a, b) for a, b in zip(one, eight))
  # padded batching (the original's absolute positions over the left pad) would differ
  alone = [model.generate_from_ids(np.asarray([x]), **kw).tokens[0] for x in ids[:1]]
  assert np.array_equal(alone[0], one[0])

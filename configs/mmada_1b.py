"""A ~1.1B-parameter MMaDA with the 8B model's vocabulary, image tokens and stage recipes.

For single-GPU/TPU-host benchmarks and small-scale experiments: every variant of
``configs/mmada_8b.py`` (``stage1_1`` … ``stage2_2``, ``stage3_grpo*``) with a narrower, shallower
transformer (d_model 1536, 24 layers, 12 heads of 128, MLP 4096; 679M block + 414M embedding and
head parameters). The argument is the 8B file's, e.g.

  python bench/bench_train.py --config=configs/mmada_1b.py:stage1_3,devices=1 --config.optimizer.grad_accum=1
  python bench/bench_samplers.py --config=configs/mmada_1b.py:stage1_3 --param-dtype=bfloat16
  python -m mmada_jax.train --config=configs/mmada_1b.py:stage1_1,devices=8,root=/r,data_root=/d --workdir=/r/s11

There is no pretrained 1B checkpoint: runs start from random weights unless ``--config.init_from``
names one (the 8B variants' ``init_from`` is cleared).
"""
from __future__ import annotations

# mmada_jax.configs is this folder (setup.py's package_dir), installed editable or as a wheel.
from mmada_jax.configs import mmada_8b

VARIANTS = mmada_8b.VARIANTS
ARCH = dict(d_model=1536, n_layers=24, n_heads=12, n_kv_heads=12, mlp_hidden_size=4096)


def get_config(arg: str | None = None):
  c = mmada_8b.get_config(arg)
  c.model.update(ARCH)
  c.init_from = ""
  return c

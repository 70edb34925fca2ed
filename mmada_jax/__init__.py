"""mmada_jax: MMaDA, the multimodal large diffusion language model, in JAX.

Public API::

  from mmada_jax import MMaDA, ImageTokenizer
  model = MMaDA.from_pretrained(path, dtype="float32")
  logits = model.logits(input_ids)
  tok = ImageTokenizer.from_pretrained(path)
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MMaDA": ("mmada_jax.model.mmada", "MMaDA"),
    "MMaDAConfig": ("mmada_jax.model.config", "MMaDAConfig"),
    "ImageTokenizer": ("mmada_jax.image_tokenizer", "ImageTokenizer"),
}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'mmada_jax' has no attribute {name!r}")


__all__ = list(_LAZY)

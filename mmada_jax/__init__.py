"""mmada_jax: MMaDA, the multimodal large diffusion language model, in JAX.

Public API::

  from mmada_jax import MMaDA, ImageTokenizer
  model = MMaDA.from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
  logits = model.logits(input_ids)
  tok = ImageTokenizer.from_pretrained(path)
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MMaDA": ("mmada_jax.api.model", "MMaDA"),
    "MMaDAConfig": ("mmada_jax.model.config", "MMaDAConfig"),
    "ImageTokenizer": ("mmada_jax.api.image_tokenizer", "ImageTokenizer"),
    "GenerationConfig": ("mmada_jax.api.generation_config", "GenerationConfig"),
}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'mmada_jax' has no attribute {name!r}")


__all__ = list(_LAZY)


def _map_checkout_configs() -> None:
  """``mmada_jax.configs`` is the top-level ``configs/`` (setup.py's ``package_dir``). Installs
  map it; a source checkout imported as itself (its own directory first on ``sys.path``, e.g.
  ``python -m pytest`` there beside a non-editable install) gets the same mapping here."""
  import os
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(here)
  init = os.path.join(root, "configs", "__init__.py")
  if ("mmada_jax.configs" in sys.modules or os.path.isdir(os.path.join(here, "configs"))
      or not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py")))):
    return   # an installed wheel (configs inside the package), or not a checkout
  import importlib.util
  spec = importlib.util.spec_from_file_location("mmada_jax.configs", init,
                                                submodule_search_locations=[os.path.dirname(init)])
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  globals()["configs"] = module


_map_checkout_configs()

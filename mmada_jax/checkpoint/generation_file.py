"""``generation_config.json`` of a model directory: our section, beside Hugging Face's fields.

Hugging Face directories may already hold a ``generation_config.json`` (transformers'
``GenerationConfig``: ``eos_token_id``, ``pad_token_id`` …). Ours is the same file with the
sampler settings under one key, ``"mmada_jax"``, so transformers' fields keep their meaning and
ours cannot be mistaken for them. This module reads and writes that section as an opaque dict
(its fields are ``mmada_jax.api.GenerationConfig``'s).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from mmada_jax.checkpoint.safetensors_io import CheckpointError

FILE_NAME = "generation_config.json"
SECTION = "mmada_jax"


def read_section(path: str) -> dict[str, Any] | None:
  """The ``mmada_jax`` section of ``path/generation_config.json``; None when the file is absent or
  holds only Hugging Face's fields. A file that is not a JSON object is a ``CheckpointError``."""
  file = os.path.join(path, FILE_NAME)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{file} must hold a JSON object, got {type(d).__name__}")
  section = d.get(SECTION)
  if section is None:
    return None
  if not isinstance(section, dict):
    raise CheckpointError(f"{file}: the {SECTION!r} entry must be an object, got {type(section).__name__}")
  return section


def write(path: str, section: Mapping[str, Any], *, eos_token_id: int, pad_token_id: int) -> None:
  """Writes ``path/generation_config.json``: transformers' token ids plus our ``section``
  (atomically: a temporary file renamed)."""
  d = {"eos_token_id": int(eos_token_id), "pad_token_id": int(pad_token_id), SECTION: dict(section)}
  tmp = os.path.join(path, f".{FILE_NAME}.tmp")
  with open(tmp, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, os.path.join(path, FILE_NAME))

"""The original MAGVIT-v2 checkpoint layout: load / save a tokenizer directory, and the state dict
(torch key names, OIHW convs) ↔ Flax params pytree (HWIO convs).

A directory holds ``config.json`` (diffusers format, read by ``MagvitConfig``) and
``pytorch_model.safetensors`` (the original's file and key names).

The mapping is derived from the Flax module tree (see ``modules``): a parameter path
``encoder/down_2/block_0/conv1/kernel`` is the torch key ``encoder.down.2.block.0.conv1.weight``.
The expected key set and every shape therefore follow from the config, and loading checks the
checkpoint against them tensor by tensor. The quantizer buffers ``quantize.embedding`` and
``quantize.power_vals`` hold no learned state: they are validated when present and regenerated on export.

Export writes every ``config.json`` field the original's tokenizer classes take
(:data:`ORIGINAL_CONFIG_FIELDS`, docs/export.md). The released class ``MAGVITv2`` takes none: it
builds the released architecture from its components' defaults and ignores the other keys. Any
architecture is fully described by the kwargs of those components, which we write explicitly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from mmada_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from mmada_jax.image_tokenizer import lfq
from mmada_jax.image_tokenizer.config import MagvitConfig
from mmada_jax.image_tokenizer.modules import abstract_params

Params = dict[str, Any]
BUFFER_KEYS = ("quantize.embedding", "quantize.power_vals")
_LEVEL = re.compile(r"(down|up)_(\d+)")
_LEVEL_CHILD = re.compile(r"(block|attn)_(\d+)")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
WEIGHTS_NAME = "pytorch_model.safetensors"
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

VQGAN_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_ch", "out_ch",
                "resolution", "z_channels", "double_z")
"""Keyword arguments of the original's ``VQGANEncoder.__init__`` / ``VQGANDecoder.__init__``
(modeling_magvitv2.py): the keys of ``encoder_config`` / ``decoder_config``."""

ORIGINAL_CONFIG_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("_class_name", "diffusers ConfigMixin (saved with every config; MAGVITv2 for the released architecture)",
     "the class name the tokenizer was loaded with (MagvitConfig.class_name)"),
    ("_diffusers_version", "diffusers ConfigMixin (metadata)", "0.31.0"),
    ("codebook_dim", "LFQuantizer.__init__(codebook_dim=) (modeling_magvitv2.py)", "the model's LFQ bits"),
    ("encoder_config", "VQGANEncoder.__init__ kwargs (modeling_magvitv2.py)",
     "the model's encoder, every key of VQGAN_FIELDS"),
    ("decoder_config", "VQGANDecoder.__init__ kwargs (modeling_magvitv2.py)",
     "the model's decoder, every key of VQGAN_FIELDS"),
)
"""(field, the original's reader, what we write) for a tokenizer's ``config.json``. Not written:
the LFQ's loss weights (``beta``, ``entropy_multiplier``, ``commit_loss_multiplier``) and
``num_codebook_entry``, which the original's classes take from their constructor defaults in
every layout."""


def original_config(config: MagvitConfig) -> dict[str, Any]:
  """The tokenizer's complete ``config.json`` dict (every field of :data:`ORIGINAL_CONFIG_FIELDS`)."""
  out = config.to_hf_config()
  missing = [name for name, _, _ in ORIGINAL_CONFIG_FIELDS if name not in out]
  for part in ("encoder_config", "decoder_config"):
    missing += [f"{part}.{k}" for k in VQGAN_FIELDS if k not in out.get(part, {})]
  if missing:
    raise ValueError(f"image tokenizer config.json export lacks the original's fields {missing}")
  return out


def torch_key(path: tuple[str, ...]) -> str:
  """Flax param path → original torch key (``kernel``/``scale`` → ``weight``; list indices dotted)."""
  parts = []
  for i, seg in enumerate(path[:-1]):
    if i == 1 and _LEVEL.fullmatch(seg):
      seg = seg.replace("_", ".")
    elif i == 2 and _LEVEL.fullmatch(path[1]) and _LEVEL_CHILD.fullmatch(seg):
      seg = seg.replace("_", ".")
    parts.append(seg)
  leaf = path[-1]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1)) if leaf == "kernel" else x


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else tuple(shape)


def _np_dtype(dtype: Any) -> Any:
  name = jnp.dtype(dtype).name
  if name not in _NP_DTYPES:
    raise ValueError(f"unsupported parameter dtype {name!r}; use float32, bfloat16 or float16")
  return _NP_DTYPES[name]


def expected_state_dict_shapes(config: MagvitConfig) -> dict[str, tuple[int, ...]]:
  """Torch key → torch shape of every learned tensor of ``config`` (buffers excluded)."""
  flat = traverse_util.flatten_dict(abstract_params(config))
  return {torch_key(p): _torch_shape(p[-1], tuple(v.shape)) for p, v in flat.items()}


def _validate_buffers(config: MagvitConfig, state_dict: Any, keys: set[str]) -> None:
  k = config.codebook_dim
  if "quantize.embedding" in keys:
    emb = np.asarray(state_dict["quantize.embedding"])
    if emb.shape != (2 ** k, k):
      raise CheckpointError(f"tensor 'quantize.embedding' has shape {emb.shape}, expected {(2 ** k, k)} "
                            f"for codebook_dim={k}")
    if not np.array_equal(emb.astype(np.float32), lfq.codebook(k)):
      raise CheckpointError("tensor 'quantize.embedding' is not the LFQ bit-pattern codebook (MSB first, ±1)")
  if "quantize.power_vals" in keys:
    pv = np.asarray(state_dict["quantize.power_vals"])
    if pv.shape != (k,) or not np.array_equal(pv.astype(np.int64), lfq.power_vals(k)):
      raise CheckpointError(f"tensor 'quantize.power_vals' is not 2^({k - 1}..0) (shape {pv.shape})")


def params_from_state_dict(config: MagvitConfig, state_dict: Any, dtype: Any = jnp.float32) -> Params:
  """Original tensors → Flax params (numpy leaves of ``dtype``).

  ``state_dict``: a mapping torch key → array, or a ``SafetensorsReader``. Raises ``CheckpointError``
  naming the first missing, unexpected or mis-shaped tensor.
  """
  np_dtype = _np_dtype(dtype)
  keys = set(state_dict.keys())
  flat = traverse_util.flatten_dict(abstract_params(config))
  expected = {torch_key(p): p for p in flat}
  missing = sorted(k for k in expected if k not in keys)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint{more}; the config "
                          f"expects {len(expected)} tensors")
  unexpected = sorted(k for k in keys if k not in expected and k not in BUFFER_KEYS)
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in the checkpoint{more}: it does not belong "
                          f"to the architecture described by config.json")
  _validate_buffers(config, state_dict, keys)
  out = {}
  for key, path in expected.items():
    want = _torch_shape(path[-1], tuple(flat[path].shape))
    shape = tuple(state_dict.shape(key)) if hasattr(state_dict, "shape") else tuple(np.shape(state_dict[key]))
    if shape != want:
      raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {want}")
    x = np.asarray(state_dict[key])
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
      raise CheckpointError(f"tensor {key!r} has dtype {x.dtype}, expected a floating type")
    if path[-1] == "kernel":
      x = x.transpose(2, 3, 1, 0)
    out[path] = np.ascontiguousarray(x.astype(np_dtype))
  return traverse_util.unflatten_dict(out)


def iter_state_dict(config: MagvitConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
  """Flax params → (torch key, numpy array in the original layout), buffers last.

  Raises ``ValueError`` naming a parameter missing from, extra in or mis-shaped in ``params``.
  """
  flat = traverse_util.flatten_dict(params)
  expected = traverse_util.flatten_dict(abstract_params(config))
  for path in flat:
    if path not in expected:
      raise ValueError(f"parameter {'/'.join(path)} is not part of the architecture of this config")
  for path, spec in expected.items():
    if path not in flat:
      raise ValueError(f"parameter {'/'.join(path)} ({torch_key(path)}) is missing from params")
    x = np.asarray(jax.device_get(flat[path]))
    if x.shape != tuple(spec.shape):
      raise ValueError(f"parameter {'/'.join(path)} has shape {x.shape}, expected {tuple(spec.shape)}")
    yield torch_key(path), _to_torch_layout(path[-1], x)
  yield "quantize.embedding", lfq.codebook(config.codebook_dim)
  yield "quantize.power_vals", lfq.power_vals(config.codebook_dim)


def state_dict_from_params(config: MagvitConfig, params: Params) -> dict[str, np.ndarray]:
  """Flax params → the original state dict (learned tensors + the two quantizer buffers)."""
  return dict(iter_state_dict(config, params))


# ---------------------------------------------------------------------------------- directories

def stored_dtype(config: MagvitConfig, reader: SafetensorsReader) -> str:
  """The parameter dtype of a checkpoint: that of its first learned tensor ('float32' when it has
  none, so that loading then names the missing tensor)."""
  key = next((k for k in expected_state_dict_shapes(config) if k in reader), None)
  if key is None:
    return "float32"
  stored = reader.dtype(key)
  if stored not in _STORED:
    raise CheckpointError(f"tensor {key!r} has dtype {stored}, expected a floating type")
  return _STORED[stored]


def load_pretrained(path: str, param_dtype: Any = None) -> tuple[MagvitConfig, Params]:
  """Reads a tokenizer directory: ``(config, params)`` with numpy leaves of ``param_dtype``
  (None: as stored). Raises ``CheckpointError`` naming a missing, unexpected or mis-shaped tensor."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"image tokenizer directory not found: {path}")
  config = MagvitConfig.from_pretrained_dir(path)
  with SafetensorsReader(path) as reader:
    dtype = stored_dtype(config, reader) if param_dtype is None else param_dtype
    params = params_from_state_dict(config, reader, dtype)
  return config, params


def save_pretrained(config: MagvitConfig, params: Params, path: str, *, param_dtype: Any = None,
                    overwrite: bool = False) -> None:
  """Writes ``config.json`` and ``pytorch_model.safetensors`` in the original layout (OIHW convs,
  torch key names, plus the ``quantize.embedding`` / ``quantize.power_vals`` buffers), cast to
  ``param_dtype`` (None: as held). Written to ``path.partial`` and renamed when complete; an
  existing non-empty ``path`` is refused unless ``overwrite``."""
  path = os.path.abspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
  cast = None if param_dtype is None else _np_dtype(param_dtype)
  tensors = ((k, v.astype(cast) if cast is not None and k not in BUFFER_KEYS else v)
             for k, v in iter_state_dict(config, params))
  tmp = path + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    write_safetensors(tensors, tmp, base_name=WEIGHTS_NAME)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(original_config(config), f, indent=2, sort_keys=True)
      f.write("\n")
    if os.path.exists(path):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

"""Our own checkpoint format: an Orbax pytree plus the architecture's config.json.

Layout of a model directory::

  DIR/config.json      the original's complete config.json (``hf_mmada.original_config``; read by MMaDAConfig)
  DIR/params/          Orbax StandardCheckpointer pytree (tensorstore/zarr, one array per leaf)
  DIR/generation_config.json
                       optional: prompt layout and sampler defaults (``generation_file``)
  DIR/mmada_jax.json   {"format": "mmada_jax.params", "version": 1, "param_dtype": ...}; written
                       last, so a directory without it is an incomplete save and is refused.
                       A weight-only quantized model (``mmada_jax.quant``) adds "quantization":
                       {"qtype", "lm_head", "tile_size"}; its quantized leaves are stored as
                       {qvalue (int8; int4 widened), scale (float32)} pairs.

Restoring takes an abstract target (shapes, dtypes and, with a mesh, shardings), so each host
reads only its shards and a checkpoint restores onto any mesh.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

import mmada_jax.quant as quant
from mmada_jax.checkpoint import generation_file
from mmada_jax.checkpoint.hf_mmada import original_config
from mmada_jax.checkpoint.safetensors_io import CheckpointError
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig, canonical_dtype
from mmada_jax.sharding import ShardingContext

MARKER = "mmada_jax.json"
FORMAT = "mmada_jax.params"


def is_orbax_model_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "params")) or os.path.isfile(os.path.join(path, MARKER))


def save_params(params: Any, cfg: MMaDAConfig, path: str, *, hf_config: dict[str, Any] | None = None,
                generation_config: Mapping[str, Any] | None = None, overwrite: bool = False,
                save_concurrent_gb: int = 1) -> None:
  """Saves params + config (+ the ``generation_config`` section, when given) to ``path``
  atomically (a temp directory renamed at the end)."""
  transformer.check_params(params, cfg)
  qspec = quant.quantization_of(params)
  if qspec is not None:
    params = quant.to_storage(params)
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
  tmp = path + ".partial"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    # Synchronous save with a bounded number of bytes in flight: the write buffers never hold a
    # second full copy of the weights (the converter's peak memory stays near one copy).
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb))
    ckptr.save(os.path.join(tmp, "params"), args=ocp.args.StandardSave(params))
    hf = original_config(cfg, hf_config)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    if generation_config is not None:
      generation_file.write(tmp, generation_config, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    with open(os.path.join(tmp, MARKER), "w") as f:
      meta = {"format": FORMAT, "version": 1, "param_dtype": cfg.param_dtype, "n_params": cfg.num_params()}
      if qspec is not None:
        meta["quantization"] = qspec.to_dict()
      json.dump(meta, f, indent=2)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_marker(path: str) -> dict[str, Any]:
  marker = os.path.join(path, MARKER)
  if not os.path.isfile(marker):
    raise CheckpointError(f"{path} is not a complete mmada_jax checkpoint ({MARKER} missing: "
                          "the save was interrupted or this is another format)")
  with open(marker) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{marker}: unknown format {meta.get('format')!r}")
  return meta


def stored_quantization(path: str) -> "quant.QuantSpec | None":
  """The weight-only quantization a saved model directory holds (None: float parameters)."""
  q = _read_marker(path).get("quantization")
  return None if q is None else quant.QuantSpec.from_dict(q, where=os.path.join(path, MARKER))


def load_params(path: str, dtype: str | None = None, *, mesh: jax.sharding.Mesh | None = None,
                rules=None, host: bool = False, **config_overrides) -> tuple[Any, MMaDAConfig]:
  """Restores ``(params, cfg)`` from a directory written by :func:`save_params`.

  ``dtype`` casts the (float) parameters on restore (default: the stored dtype). With ``mesh``
  each leaf is restored directly into its sharding; with ``host`` onto the CPU device (host
  memory, e.g. to quantize before placing). A quantized save restores as quantized params.
  """
  meta = _read_marker(path)
  qspec = stored_quantization(path)
  compute = config_overrides.pop("compute_dtype", None)
  pdt = canonical_dtype(dtype or meta["param_dtype"])
  cfg = MMaDAConfig.from_pretrained_dir(path, param_dtype=pdt, dtype=compute or pdt, **config_overrides)
  shapes = transformer.param_shapes(cfg)
  is_shape = lambda t: isinstance(t, tuple) and all(isinstance(i, int) for i in t)
  if qspec is not None:
    structs = quant.abstract_params(cfg, qspec)
    if mesh is None or host:
      dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if host else jax.devices()[0])
      shard = jax.tree.map(lambda _: dev, structs)
    else:
      shard = ShardingContext(mesh, rules).param_shardings(quant.param_axes(qspec, cfg), structs)
    target = quant.storage_target(quant.abstract_params(cfg, qspec, shard))
  elif mesh is None or host:
    dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0] if host else jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jax.numpy.dtype(pdt), sharding=dev),
                          shapes, is_leaf=is_shape)
  else:
    structs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jax.numpy.dtype(pdt)), shapes, is_leaf=is_shape)
    shard = ShardingContext(mesh, rules).param_shardings(transformer.param_axes(cfg), structs)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), structs, shard)
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  except Exception as e:
    raise CheckpointError(f"cannot restore parameters from {path}/params: {e}") from e
  if qspec is not None:
    params = quant.from_storage(params, qspec)
  transformer.check_params(params, cfg)
  return params, cfg

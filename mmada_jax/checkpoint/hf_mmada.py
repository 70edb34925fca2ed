"""The original MMaDA/LLaDA Hugging Face layout ⇄ our parameter pytree.

Original keys (torch ``Linear`` weights are ``(out, in)``)::

  model.transformer.wte.weight                     (V, d)      -> wte            (V, d)
  model.transformer.ln_f.weight                    (d,)        -> ln_f           (d,)
  model.transformer.ff_out.weight                  (V, d)      -> lm_head        (d, V)      transpose
  model.transformer.blocks.{i}.attn_norm.weight    (d,)        -> blocks/attn_norm[i]
  model.transformer.blocks.{i}.q_proj.weight       (n·h, d)    -> blocks/q_proj[i]   (d, n, h)
  model.transformer.blocks.{i}.k_proj.weight       (k·h, d)    -> blocks/k_proj[i]   (d, k, h)
  model.transformer.blocks.{i}.v_proj.weight       (k·h, d)    -> blocks/v_proj[i]   (d, k, h)
  model.transformer.blocks.{i}.attn_out.weight     (d, n·h)    -> blocks/attn_out[i] (n, h, d)
  model.transformer.blocks.{i}.ff_norm.weight      (d,)        -> blocks/ff_norm[i]
  model.transformer.blocks.{i}.ff_proj.weight      (f, d)      -> blocks/ff_proj[i]  (d, f)   gate (SiLU)
  model.transformer.blocks.{i}.up_proj.weight      (f, d)      -> blocks/up_proj[i]  (d, f)
  model.transformer.blocks.{i}.ff_out.weight       (d, f)      -> blocks/ff_out[i]   (f, d)

Loading goes tensor by tensor into preallocated stacked arrays; each finished leaf is placed on
its devices (sharded when a mesh is given) and the host copy released, so peak host memory is
about one copy of the weights plus one stacked leaf.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from mmada_jax.checkpoint import generation_file
from mmada_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig, canonical_dtype
from mmada_jax.sharding import ShardingContext

PREFIX = "model.transformer."
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _block_key(i: int, name: str) -> str:
  return f"{PREFIX}blocks.{i}.{name}.weight"


def _to_ours(name: str, t: np.ndarray, cfg: MMaDAConfig) -> np.ndarray:
  """One original tensor -> our layout (per layer for block tensors)."""
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if name == "q_proj":
    return t.T.reshape(d, n, h)
  if name in ("k_proj", "v_proj"):
    return t.T.reshape(d, k, h)
  if name == "attn_out":
    return t.T.reshape(n, h, d)
  if name in ("ff_proj", "up_proj", "ff_out", "lm_head"):
    return t.T
  return t


def _to_original(name: str, t: np.ndarray, cfg: MMaDAConfig) -> np.ndarray:
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if name == "q_proj":
    return t.reshape(d, n * h).T
  if name in ("k_proj", "v_proj"):
    return t.reshape(d, k * h).T
  if name == "attn_out":
    return t.reshape(n * h, d).T
  if name in ("ff_proj", "up_proj", "ff_out", "lm_head"):
    return t.T
  return t


def original_shapes(cfg: MMaDAConfig) -> dict[str, tuple[int, ...]]:
  """Every original key with its expected shape."""
  ours = transformer.param_shapes(cfg)
  out = {f"{PREFIX}wte.weight": ours["wte"], f"{PREFIX}ln_f.weight": ours["ln_f"],
         f"{PREFIX}ff_out.weight": (cfg.vocab_size, cfg.d_model)}
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden_size
  per_block = {"attn_norm": (d,), "q_proj": (n * h, d), "k_proj": (k * h, d), "v_proj": (k * h, d),
               "attn_out": (d, n * h), "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d),
               "ff_out": (d, f)}
  for i in range(cfg.n_layers):
    for name, shape in per_block.items():
      out[_block_key(i, name)] = shape
  return out


def read_hf_config(path: str) -> dict[str, Any]:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"no config.json in {path}")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e


def stored_dtype(path: str) -> str:
  """The parameter dtype an original checkpoint is stored in ('bfloat16' for the released ones)."""
  with SafetensorsReader(path) as r:
    stored = r.dtype(f"{PREFIX}wte.weight")
  return {"BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")


def load_hf_checkpoint(path: str, dtype: str | None = "float32", *, mesh: jax.sharding.Mesh | None = None,
                       rules=None, progress: bool = False, host: bool = False, **config_overrides):
  """Loads an original-layout checkpoint directory. Returns ``(params, cfg)``.

  ``dtype`` is the parameter storage dtype (None: as stored); the compute dtype defaults to it
  (override with ``compute_dtype=``). With ``mesh`` the parameters are
  placed sharded by the logical-axis ``rules``. With ``host=True`` the leaves stay numpy arrays
  (no device copy), which is what the converter uses to keep peak memory at one copy.
  """
  compute = config_overrides.pop("compute_dtype", None)
  pdt = canonical_dtype(dtype or stored_dtype(path))
  cfg = MMaDAConfig.from_hf_config(read_hf_config(path), param_dtype=pdt, dtype=compute or pdt,
                                   **config_overrides)
  np_dtype = _NP_DTYPES[pdt]
  axes = transformer.param_axes(cfg)
  shapes = transformer.param_shapes(cfg)
  expected = original_shapes(cfg)
  sharding = ShardingContext(mesh, rules)

  with SafetensorsReader(path) as reader:
    unexpected = sorted(set(reader.keys()) - set(expected))
    if unexpected:
      raise CheckpointError(f"unexpected tensors in {path} (not part of a {cfg.n_layers}-layer "
                            f"model): {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    missing = sorted(set(expected) - set(reader.keys()))
    if missing:
      raise CheckpointError(f"tensors missing from {path}: {missing[:5]}{' …' if len(missing) > 5 else ''}")

    def fetch(key: str) -> np.ndarray:
      shape = reader.shape(key)
      if tuple(shape) != tuple(expected[key]):
        raise CheckpointError(f"tensor {key} has shape {tuple(shape)}, expected {tuple(expected[key])} "
                              f"for the architecture in config.json")
      return reader[key]

    def place(arr: np.ndarray, names: tuple[str, ...]) -> jax.Array | np.ndarray:
      if host:
        return arr
      if mesh is None:
        return jax.device_put(arr)
      return jax.device_put(arr, sharding.sharding(names, arr.shape))

    jobs: list[tuple[str, Callable[[], jax.Array]]] = []
    for top, key, name in (("wte", f"{PREFIX}wte.weight", "wte"), ("ln_f", f"{PREFIX}ln_f.weight", "ln_f"),
                           ("lm_head", f"{PREFIX}ff_out.weight", "lm_head")):
      jobs.append((top, lambda key=key, name=name, top=top: place(
          np.ascontiguousarray(_to_ours(name, fetch(key), cfg).astype(np_dtype)), axes[top])))
    for name in transformer.BLOCK_AXES:
      def stacked(name=name):
        buf = np.empty(shapes["blocks"][name], np_dtype)
        for i in range(cfg.n_layers):
          buf[i] = _to_ours(name, fetch(_block_key(i, name)), cfg).astype(np_dtype)
        return place(buf, axes["blocks"][name])
      jobs.append(("blocks/" + name, stacked))

    params: dict[str, Any] = {"blocks": {}}
    it = jobs
    if progress:
      from tqdm import tqdm
      it = tqdm(jobs, desc="loading weights", unit="tensor")
    for where, job in it:
      value = job()
      if where.startswith("blocks/"):
        params["blocks"][where[7:]] = value
      else:
        params[where] = value
  return params, cfg


def iter_original_tensors(params: dict[str, Any], cfg: MMaDAConfig, dtype: str | None = None
                          ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (original key, numpy tensor) one at a time, in the original's order."""
  np_dtype = _NP_DTYPES[canonical_dtype(dtype or cfg.param_dtype)]

  def host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))

  yield f"{PREFIX}wte.weight", host(params["wte"]).astype(np_dtype)
  blocks = params["blocks"]
  for i in range(cfg.n_layers):
    for name in transformer.BLOCK_AXES:
      t = host(blocks[name][i])
      yield _block_key(i, name), np.ascontiguousarray(_to_original(name, t, cfg)).astype(np_dtype)
  yield f"{PREFIX}ln_f.weight", host(params["ln_f"]).astype(np_dtype)
  yield f"{PREFIX}ff_out.weight", np.ascontiguousarray(host(params["lm_head"]).T).astype(np_dtype)


def save_hf_checkpoint(params: dict[str, Any], cfg: MMaDAConfig, out_dir: str, *,
                       dtype: str | None = None, base_config: dict[str, Any] | None = None,
                       generation_config: Mapping[str, Any] | None = None,
                       max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> list[str]:
  """Writes the original layout: config.json + model.safetensors (or shards + index), and
  generation_config.json with the ``generation_config`` section when given."""
  transformer.check_params(params, cfg)
  out_dtype = canonical_dtype(dtype or cfg.param_dtype)
  tensors = iter_original_tensors(params, cfg, out_dtype)
  if progress:
    from tqdm import tqdm
    tensors = tqdm(tensors, total=3 + 9 * cfg.n_layers, desc="writing safetensors", unit="tensor")
  files = write_safetensors(tensors, out_dir, "model.safetensors", max_shard_bytes)
  hf = dict(base_config or {})
  hf.update(cfg.to_hf_config())
  hf["torch_dtype"] = out_dtype
  tmp = os.path.join(out_dir, ".config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, "config.json"))
  files.append("config.json")
  if generation_config is not None:
    generation_file.write(out_dir, generation_config, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    files.append(generation_file.FILE_NAME)
  return files

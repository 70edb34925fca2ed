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

Export writes a ``config.json`` that the original's classes construct from, for any model
(trained here from scratch or imported): :data:`ORIGINAL_CONFIG_FIELDS` lists every field they
read and where our value comes from (docs/export.md has the same table).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from mmada_jax.checkpoint import generation_file
from mmada_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from mmada_jax.checkpoint.staging import staged_directory
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig, canonical_dtype
from mmada_jax.prompting.special_tokens import TOKEN_STRINGS
from mmada_jax.sharding import ShardingContext

PREFIX = "model.transformer."
IMAGE_TOKENIZER_DIR = "image_tokenizer"
"""Sub-folder of an exported model folder that holds its MAGVIT-v2 tokenizer (original layout)."""
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# ------------------------------------------------------------------------- config.json on export

MODEL = "model"
"""This model's value (it changes the computation): from ``MMaDAConfig.to_hf_config``."""
FIXED = "fixed"
"""The one value we implement (it changes the computation; import rejects any other)."""
RELEASED = "released"
"""The released MMaDA-8B's value: no effect on the forward pass (initialisation, precision flags,
options that only act with a feature we do not implement). An imported checkpoint's own value is kept."""
OPTIONAL = "optional"
"""Read by the original only when present; written when the imported config.json had it."""

_LLADA = "ModelConfig dataclass (configuration_llada.py), read field by field by LLaDAModelLM"
_MMADA = "MMadaConfig (modeling_mmada.py), copied when present"
_HF = "transformers PreTrainedModel / PretrainedConfig"


@dataclasses.dataclass(frozen=True)
class ConfigField:
  """One ``config.json`` field the original's model classes read.

  ``read_by``: the original's class (and file) that reads it; ``kind``: one of :data:`MODEL`,
  :data:`FIXED`, :data:`RELEASED`, :data:`OPTIONAL`; ``value``: the written value for ``FIXED`` /
  ``RELEASED`` fields (None for ``MODEL``: it comes from the model's config); ``note``: what it does.
  """
  name: str
  read_by: str
  kind: str
  value: Any = None
  note: str = ""


ORIGINAL_CONFIG_FIELDS: tuple[ConfigField, ...] = (
    # The original's LLaDA ModelConfig: every dataclass field is read with getattr when the
    # model is built, so a config.json without one fails with AttributeError.
    ConfigField("d_model", _LLADA, MODEL, note="hidden size"),
    ConfigField("n_heads", _LLADA, MODEL, note="query heads"),
    ConfigField("n_kv_heads", _LLADA, MODEL, note="key/value heads (grouped-query attention when fewer)"),
    ConfigField("n_layers", _LLADA, MODEL, note="blocks"),
    ConfigField("mlp_ratio", _LLADA, RELEASED, 4, "used only when mlp_hidden_size is null; we always write it"),
    ConfigField("mlp_hidden_size", _LLADA, MODEL, note="MLP width"),
    ConfigField("activation_type", _LLADA, FIXED, "silu", "SiLU on ff_proj (the gate)"),
    ConfigField("block_type", _LLADA, FIXED, "llama", "q/k/v_proj + gated MLP block"),
    ConfigField("block_group_size", _LLADA, FIXED, 1, "key layout blocks.{i}"),
    ConfigField("alibi", _LLADA, FIXED, False, "no ALiBi (RoPE)"),
    ConfigField("alibi_bias_max", _LLADA, RELEASED, 8.0, "used only with alibi"),
    ConfigField("rope", _LLADA, FIXED, True, "rotary embeddings"),
    ConfigField("rope_full_precision", _LLADA, FIXED, True, "RoPE in float32"),
    ConfigField("flash_attention", _LLADA, RELEASED, False, "kernel choice of the original, same maths"),
    ConfigField("attention_dropout", _LLADA, FIXED, 0.0, "the dataclass default is 0.1"),
    ConfigField("multi_query_attention", _LLADA, FIXED, None, "n_kv_heads is given instead"),
    ConfigField("attention_layer_norm", _LLADA, FIXED, False, "no q/k norms"),
    ConfigField("residual_dropout", _LLADA, FIXED, 0.0, "the dataclass default is 0.1"),
    ConfigField("embedding_dropout", _LLADA, FIXED, 0.0, "the dataclass default is 0.1"),
    ConfigField("input_emb_norm", _LLADA, FIXED, False, "no embedding scaling"),
    ConfigField("layer_norm_type", _LLADA, FIXED, "rms", "RMSNorm"),
    ConfigField("layer_norm_with_affine", _LLADA, FIXED, True, "RMSNorm weights"),
    ConfigField("rms_norm_eps", _LLADA, MODEL, note="RMSNorm epsilon"),
    ConfigField("attention_layer_norm_with_affine", _LLADA, RELEASED, True, "used only with attention_layer_norm"),
    ConfigField("max_sequence_length", _LLADA, MODEL, note="RoPE cache length (longer inputs are recomputed)"),
    ConfigField("rope_theta", _LLADA, MODEL, note="RoPE base"),
    ConfigField("include_qkv_bias", _LLADA, FIXED, False, "no q/k/v biases"),
    ConfigField("include_bias", _LLADA, FIXED, False, "no linear biases"),
    ConfigField("bias_for_layer_norm", _LLADA, FIXED, False, "no norm biases"),
    ConfigField("scale_logits", _LLADA, FIXED, False, "no logit scaling"),
    ConfigField("vocab_size", _LLADA, MODEL, note="vocabulary (= embedding_size)"),
    ConfigField("embedding_size", _LLADA, MODEL, note="rows of wte and of the LM head"),
    ConfigField("weight_tying", _LLADA, FIXED, False, "untied LM head (ff_out)"),
    ConfigField("eos_token_id", _LLADA, MODEL, note="end of text"),
    ConfigField("pad_token_id", _LLADA, MODEL, note="text padding (EOS in MMaDA)"),
    ConfigField("mask_token_id", _LLADA, MODEL, note="the diffusion mask token; also read by the MMaDA samplers"),
    ConfigField("init_device", _LLADA, RELEASED, "meta", "initialisation only"),
    ConfigField("init_fn", _LLADA, RELEASED, "mitchell", "initialisation only"),
    ConfigField("init_std", _LLADA, RELEASED, 0.02, "initialisation only"),
    ConfigField("init_cutoff_factor", _LLADA, RELEASED, None, "initialisation only"),
    ConfigField("precision", _LLADA, RELEASED, "amp_bf16", "the original's training precision flag"),
    # MMaDA's own config class keeps these when present.
    ConfigField("llm_vocab_size", _MMADA, MODEL, note="text vocabulary of the base LLM"),
    ConfigField("codebook_size", _MMADA, MODEL, note="image codes"),
    ConfigField("num_vq_tokens", _MMADA, MODEL, note="image tokens per image"),
    ConfigField("num_new_special_tokens", _MMADA, FIXED, 0, "the special tokens reuse reserved ids"),
    ConfigField("new_vocab_size", _MMADA, MODEL, note="= vocab_size"),
    ConfigField("llm_model_path", _MMADA, OPTIONAL, note="where the base LLM came from (training only)"),
    ConfigField("gradient_checkpointing", _MMADA, OPTIONAL, note="training only (unused by the model)"),
    # transformers' side of the model class.
    ConfigField("model_type", _HF, FIXED, "mmada", "selects MMadaConfig"),
    ConfigField("architectures", _HF, FIXED, ["MMadaModelLM"], "the model class"),
    ConfigField("use_cache", "LLaDAModelLM.forward (modeling_llada.py)", FIXED, False, "the model has no KV cache"),
    ConfigField("tie_word_embeddings", _HF, FIXED, False, "transformers' default True would tie ff_out to wte"),
    ConfigField("torch_dtype", _HF, MODEL, note="dtype of the stored tensors"),
    ConfigField("transformers_version", _HF, RELEASED, "4.46.0", "the version the original pins"),
)
"""Every config.json field of the original's MMaDA/LLaDA model classes, in the order above."""


def original_config(cfg: MMaDAConfig, base: Mapping[str, Any] | None = None, *,
                    dtype: str | None = None) -> dict[str, Any]:
  """The complete ``config.json`` of the original's classes for ``cfg``.

  Precedence: the released MMaDA-8B's values (:data:`RELEASED`) < ``base`` (an imported
  checkpoint's config.json: its extra and released-kind fields are kept) < this model's
  architecture (:data:`MODEL` / :data:`FIXED`, from ``cfg``); ``torch_dtype`` is ``dtype``
  (default: ``cfg.param_dtype``).
  """
  out: dict[str, Any] = {f.name: f.value for f in ORIGINAL_CONFIG_FIELDS if f.kind == RELEASED}
  out.update(base or {})
  out.update(cfg.to_hf_config())
  out["torch_dtype"] = canonical_dtype(dtype or cfg.param_dtype)
  missing = [f.name for f in ORIGINAL_CONFIG_FIELDS if f.kind != OPTIONAL and f.name not in out]
  if missing:
    raise ValueError(f"config.json export lacks the original's fields {missing}")
  return out


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
  """Writes the original layout: config.json (every field of :data:`ORIGINAL_CONFIG_FIELDS`, see
  :func:`original_config`) + model.safetensors (or shards + index), and generation_config.json
  with the ``generation_config`` section when given."""
  transformer.check_params(params, cfg)
  out_dtype = canonical_dtype(dtype or cfg.param_dtype)
  tensors = iter_original_tensors(params, cfg, out_dtype)
  if progress:
    from tqdm import tqdm
    tensors = tqdm(tensors, total=3 + 9 * cfg.n_layers, desc="writing safetensors", unit="tensor")
  files = write_safetensors(tensors, out_dir, "model.safetensors", max_shard_bytes)
  hf = original_config(cfg, base_config, dtype=out_dtype)
  tmp = os.path.join(out_dir, ".config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, "config.json"))
  files.append("config.json")
  if generation_config is not None:
    generation_file.write(out_dir, generation_config, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    files.append(generation_file.FILE_NAME)
  return files


def export_pretrained(params: dict[str, Any], cfg: MMaDAConfig, path: str, *, dtype: str | None = None,
                      base_config: dict[str, Any] | None = None,
                      generation_config: Mapping[str, Any] | None = None,
                      companions: Sequence[Callable[[str], Any]] = (), max_shard_bytes: int = 5 * 2**30,
                      progress: bool = False, overwrite: bool = False) -> None:
  """:func:`save_hf_checkpoint` into ``path`` whole or not at all (a staging folder renamed when
  complete). Each of ``companions`` is then called with the staging folder and writes beside the
  weights (the text tokenizer's files, ``image_tokenizer/``). An existing non-empty ``path`` is
  refused unless ``overwrite``."""
  with staged_directory(path, overwrite=overwrite) as tmp:
    save_hf_checkpoint(params, cfg, tmp, dtype=dtype, base_config=base_config,
                       generation_config=generation_config, max_shard_bytes=max_shard_bytes,
                       progress=progress)
    for write in companions:
      write(tmp)


def check_companions(cfg: MMaDAConfig, text_tokenizer: Any = None, codebook_size: int | None = None,
                     where: str = "export") -> None:
  """Checks that a text tokenizer / an image tokenizer's codebook belongs to the model ``cfg``.

  The text tokenizer (``len``, ``eos_token_id``, ``token_to_id``) must leave room for the image
  codes (image code c is token ``c + len(tokenizer)``) and agree on EOS and the mask token;
  ``codebook_size`` must equal the model's. Raises ``ValueError`` naming the mismatch.
  """
  if codebook_size is not None and int(codebook_size) != cfg.codebook_size:
    raise ValueError(f"{where}: the image tokenizer has {codebook_size} codes but the model expects "
                     f"codebook_size={cfg.codebook_size}")
  if text_tokenizer is None:
    return
  n = len(text_tokenizer)
  if n + cfg.codebook_size > cfg.vocab_size:
    raise ValueError(f"{where}: the text tokenizer has {n} tokens; with {cfg.codebook_size} image codes "
                     f"after them that exceeds the model's vocab_size={cfg.vocab_size}")
  eos = text_tokenizer.eos_token_id
  if eos is not None and int(eos) != cfg.eos_token_id:
    raise ValueError(f"{where}: the text tokenizer's EOS id is {eos} but the model's eos_token_id is "
                     f"{cfg.eos_token_id}")
  mask = text_tokenizer.token_to_id(TOKEN_STRINGS["mask"])
  if mask is not None and int(mask) != cfg.mask_token_id:
    raise ValueError(f"{where}: the text tokenizer's {TOKEN_STRINGS['mask']} id is {mask} but the model's "
                     f"mask_token_id is {cfg.mask_token_id}")

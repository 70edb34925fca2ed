"""Model configuration: the LLaDA/MMaDA backbone hyper-parameters.

Built from the original checkpoint's ``config.json`` (``MMaDAConfig.from_hf_config``); every field
whose value we do not implement is rejected with an error naming it, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from mmada_jax.prompting.special_tokens import LLADA_RESERVED_IDS

_MASK_ID, _EOS_ID = LLADA_RESERVED_IDS["mask"], LLADA_RESERVED_IDS["eos"]
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")   # model/attention.py IMPLS
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_out", "minimal")
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def canonical_dtype(name: Any) -> str:
  """Normalises a dtype given as a string or numpy/jax dtype to 'float32' / 'bfloat16' / 'float16'."""
  if not isinstance(name, str):
    name = jnp.dtype(name).name
  key = name.lower().replace("torch.", "")
  if key not in _DTYPES:
    raise ValueError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16")
  return jnp.dtype(_DTYPES[key]).name


@dataclasses.dataclass(frozen=True)
class MMaDAConfig:
  """Hyper-parameters of the bidirectional LLaDA transformer used by MMaDA.

  ``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute dtype of matmuls
  (norms, RoPE, softmax and logits are always computed in float32).
  """
  vocab_size: int = 134656          # rows of the embedding and of the LM head (``embedding_size``)
  d_model: int = 4096
  n_heads: int = 32
  n_kv_heads: int = 32
  n_layers: int = 32
  mlp_hidden_size: int = 12288
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  max_sequence_length: int = 4096
  mask_token_id: int = _MASK_ID
  eos_token_id: int = _EOS_ID
  pad_token_id: int = _EOS_ID       # MMaDA pads text with EOS
  llm_vocab_size: int = 126464
  codebook_size: int = 8192
  num_vq_tokens: int = 1024
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  # 'auto' (splash on TPU, cudnn on GPU where the call suits the kernel, else xla), 'xla' (einsum
  # softmax), 'splash' (Pallas TPU flash kernel) or 'cudnn' (cuDNN flash): model/attention.py.
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"MMaDAConfig.{name} must be positive, got {getattr(self, name)}")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype))
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def replace(self, **kw) -> "MMaDAConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (embedding + blocks + final norm + untied head)."""
    d, f, hd = self.d_model, self.mlp_hidden_size, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    block = attn + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.n_layers * block + d

  def to_hf_config(self) -> dict[str, Any]:
    """The original's config.json fields describing this architecture."""
    return {
        "activation_type": "silu", "alibi": False, "architectures": ["MMadaModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "bias_for_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "codebook_size": self.codebook_size,
        "d_model": self.d_model, "embedding_dropout": 0.0, "embedding_size": self.vocab_size,
        "eos_token_id": self.eos_token_id, "include_bias": False, "include_qkv_bias": False,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "llm_vocab_size": self.llm_vocab_size, "mask_token_id": self.mask_token_id,
        "max_sequence_length": self.max_sequence_length, "mlp_hidden_size": self.mlp_hidden_size,
        "model_type": "mmada", "multi_query_attention": None, "n_heads": self.n_heads,
        "n_kv_heads": self.n_kv_heads, "n_layers": self.n_layers, "new_vocab_size": self.vocab_size,
        "num_new_special_tokens": 0, "num_vq_tokens": self.num_vq_tokens,
        "pad_token_id": self.pad_token_id, "residual_dropout": 0.0, "rms_norm_eps": self.rms_norm_eps,
        "rope": True, "rope_full_precision": True, "rope_theta": self.rope_theta, "scale_logits": False,
        "tie_word_embeddings": False, "torch_dtype": self.param_dtype, "use_cache": False,
        "vocab_size": self.vocab_size, "weight_tying": False,
    }

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "MMaDAConfig":
    """Builds a config from the original's config.json dict, rejecting unsupported settings."""
    _check_supported(hf)
    n_heads = int(hf["n_heads"])
    n_kv = hf.get("n_kv_heads")
    if n_kv is None:
      n_kv = 1 if hf.get("multi_query_attention") else n_heads
    d_model = int(hf["d_model"])
    mlp = hf.get("mlp_hidden_size")
    if mlp is None:
      mlp = int(hf.get("mlp_ratio", 4)) * d_model
    vocab = int(hf.get("embedding_size") or hf["vocab_size"])
    if int(hf.get("vocab_size", vocab)) > vocab:
      raise ValueError(f"config.json: vocab_size={hf['vocab_size']} exceeds embedding_size={vocab}")
    kw = dict(
        vocab_size=vocab, d_model=d_model, n_heads=n_heads, n_kv_heads=int(n_kv),
        n_layers=int(hf["n_layers"]), mlp_hidden_size=int(mlp),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_sequence_length=int(hf.get("max_sequence_length", 4096)),
        mask_token_id=int(hf.get("mask_token_id", _MASK_ID)),
        eos_token_id=int(_EOS_ID if hf.get("eos_token_id") is None else hf["eos_token_id"]),
        pad_token_id=int(_EOS_ID if hf.get("pad_token_id") is None else hf["pad_token_id"]),
        llm_vocab_size=int(hf.get("llm_vocab_size", 126464)),
        codebook_size=int(hf.get("codebook_size", 8192)),
        num_vq_tokens=int(hf.get("num_vq_tokens", 1024)),
    )
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_pretrained_dir(cls, path: str, **overrides) -> "MMaDAConfig":
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"no config.json in {path}")
    try:
      with open(cfg_path) as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    return cls.from_hf_config(hf, **overrides)


# (field, value we implement, what it means): any other value is rejected.
_REQUIRED = (
    ("block_type", "llama", "only the LLaMA-style block (q/k/v/up_proj) is implemented"),
    ("activation_type", "silu", "the llama block applies SiLU to ff_proj (gate)"),
    ("layer_norm_type", "rms", "only RMSNorm is implemented"),
    ("alibi", False, "ALiBi position biases are not implemented (RoPE is)"),
    ("rope", True, "the model requires rotary position embeddings"),
    ("weight_tying", False, "the LM head must be untied (ff_out)"),
    ("tie_word_embeddings", False, "the LM head must be untied (ff_out)"),
    ("include_bias", False, "linear biases are not implemented"),
    ("include_qkv_bias", False, "q/k/v biases are not implemented"),
    ("bias_for_layer_norm", False, "layer-norm biases are not implemented"),
    ("layer_norm_with_affine", True, "RMSNorm weights are required"),
    ("attention_layer_norm", False, "q/k layer norms are not implemented"),
    ("scale_logits", False, "logit scaling is not implemented"),
    ("input_emb_norm", False, "embedding scaling is not implemented"),
    ("block_group_size", 1, "grouped blocks are not implemented"),
    ("rope_full_precision", True, "RoPE is always computed in float32"),
)
_ZERO = ("attention_dropout", "residual_dropout", "embedding_dropout")
_OPTIONAL_NULL = ("clip_qkv",)


def _check_supported(hf: Mapping[str, Any]) -> None:
  for key in ("d_model", "n_heads", "n_layers"):
    if key not in hf:
      raise ValueError(f"config.json: required field {key!r} is missing")
  for key, want, why in _REQUIRED:
    if key in hf and hf[key] is not None and hf[key] != want:
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported ({why}); expected {want!r}")
  for key in _ZERO:
    if key not in hf:
      # The original's dataclass default is 0.1: a config without the field trains with dropout.
      continue
    if float(hf[key]) != 0.0:
      raise ValueError(f"config.json: {key}={hf[key]} is not supported; dropout must be 0.0")
  for key in _OPTIONAL_NULL:
    if hf.get(key) is not None:
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported")
  if "rope_scaling" in hf and hf["rope_scaling"]:
    raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']!r} is not supported")

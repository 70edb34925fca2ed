"""The MMaDA backbone: a bidirectional LLaDA (LLaMA-style) transformer in Flax Linen.

Pure-functional: ``forward(params, cfg, input_ids, ...)`` applies the module to an explicit
parameter pytree. Parameter layout (``L`` = n_layers, stacked for ``lax.scan``)::

  wte      [vocab, embed]                 token embedding
  blocks/  attn_norm [L, embed]; q_proj [L, embed, heads, head_dim];
           k_proj, v_proj [L, embed, kv_heads, head_dim]; attn_out [L, heads, head_dim, embed];
           ff_norm [L, embed]; ff_proj (gate, SiLU) and up_proj [L, embed, mlp]; ff_out [L, mlp, embed]
  ln_f     [embed]
  lm_head  [embed, vocab]                 untied output projection

Optional, for LoRA / QLoRA (:mod:`mmada_jax.train.lora`): a block matrix ``blocks/<name>`` may be
a qwix ``QArray`` (dequantized per layer inside the scan), and ``blocks/<name>_lora_a``
[L, in..., r] / ``blocks/<name>_lora_b`` [L, r, out...] add ``(x·A)·B`` to that projection (the
α/r scale is already folded into B).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from jax.ad_checkpoint import checkpoint_name

from mmada_jax.model import layers
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding.context import constrain

Params = dict[str, Any]
KV = tuple[jax.Array, jax.Array]

# Logical axes of every parameter (without the leading 'layers' axis of the blocks).
BLOCK_AXES = {
    "attn_norm": ("norm",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "attn_out": ("heads", "head_dim", "embed"),
    "ff_norm": ("norm",),
    "ff_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "ff_out": ("mlp", "embed"),
}
TOP_AXES = {"wte": ("vocab", "embed"), "ln_f": ("norm",), "lm_head": ("embed", "vocab")}


def param_axes(cfg: MMaDAConfig) -> Params:
  """Pytree of logical axis-name tuples, matching the parameter pytree."""
  del cfg
  return {"wte": TOP_AXES["wte"], "ln_f": TOP_AXES["ln_f"], "lm_head": TOP_AXES["lm_head"],
          "blocks": {k: ("layers",) + v for k, v in BLOCK_AXES.items()}}


def param_shapes(cfg: MMaDAConfig) -> Params:
  """Pytree of parameter shapes."""
  d, f, n, k, h, L = cfg.d_model, cfg.mlp_hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
  return {
      "wte": (cfg.vocab_size, d), "ln_f": (d,), "lm_head": (d, cfg.vocab_size),
      "blocks": {"attn_norm": (L, d), "q_proj": (L, d, n, h), "k_proj": (L, d, k, h),
                 "v_proj": (L, d, k, h), "attn_out": (L, n, h, d), "ff_norm": (L, d),
                 "ff_proj": (L, d, f), "up_proj": (L, d, f), "ff_out": (L, f, d)},
  }


def _remat_policy(name: str):
  cp = jax.checkpoint_policies
  return {
      "full": cp.nothing_saveable,
      "dots": cp.checkpoint_dots,
      "dots_with_no_batch_dims": cp.dots_with_no_batch_dims_saveable,
      "save_qkv_out": cp.save_only_these_names("q", "k", "v", "attn_out"),
      "minimal": cp.save_only_these_names("attn_out", "mlp_out"),
  }[name]


def _normal_init(fan_in_axes: tuple[int, ...]):
  def init(key, shape, dtype):
    fan_in = 1
    for a in fan_in_axes:
      fan_in *= shape[a]
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)
  return init


def _param(module: nn.Module, name: str, init, shape, dtype, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense(w: Any) -> jax.Array:
  """A block matrix as an array: a quantized one (qwix ``QArray``, a QLoRA base) dequantized."""
  return qwix.dequantize(w) if isinstance(w, qwix.QArray) else w


def _lora(module: nn.Module, name: str, x: jax.Array, y: jax.Array, dt) -> jax.Array:
  """``y + (x·A)·B`` when the params hold ``<name>_lora_a`` [in..., r] and ``<name>_lora_b``
  [r, out...] (x's trailing dims = ``in``); else ``y`` unchanged."""
  if not module.has_variable("params", name + "_lora_a"):
    return y
  a = module.get_variable("params", name + "_lora_a").astype(dt)
  b = module.get_variable("params", name + "_lora_b").astype(dt)
  return y + jnp.tensordot(jnp.tensordot(x, a, axes=a.ndim - 1), b, axes=1).astype(y.dtype)


class Block(nn.Module):
  """One LLaDA llama block: pre-norm bidirectional attention and a gated SiLU MLP."""
  cfg: MMaDAConfig

  @nn.compact
  def __call__(self, x, layer_kv, cos, sin, add, allow):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f, n, k, h = cfg.d_model, cfg.mlp_hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ones = nn.initializers.ones
    w_attn_norm = _param(self, "attn_norm", ones, (d,), pdt, BLOCK_AXES["attn_norm"])
    w_q = _param(self, "q_proj", _normal_init((0,)), (d, n, h), pdt, BLOCK_AXES["q_proj"])
    w_k = _param(self, "k_proj", _normal_init((0,)), (d, k, h), pdt, BLOCK_AXES["k_proj"])
    w_v = _param(self, "v_proj", _normal_init((0,)), (d, k, h), pdt, BLOCK_AXES["v_proj"])
    w_o = _param(self, "attn_out", _normal_init((0, 1)), (n, h, d), pdt, BLOCK_AXES["attn_out"])
    w_ff_norm = _param(self, "ff_norm", ones, (d,), pdt, BLOCK_AXES["ff_norm"])
    w_gate = _param(self, "ff_proj", _normal_init((0,)), (d, f), pdt, BLOCK_AXES["ff_proj"])
    w_up = _param(self, "up_proj", _normal_init((0,)), (d, f), pdt, BLOCK_AXES["up_proj"])
    w_down = _param(self, "ff_out", _normal_init((0,)), (f, d), pdt, BLOCK_AXES["ff_out"])
    w_q, w_k, w_v, w_o, w_gate, w_up, w_down = (
        _dense(w) for w in (w_q, w_k, w_v, w_o, w_gate, w_up, w_down))

    hx = layers.rms_norm(x, w_attn_norm, cfg.rms_norm_eps)
    q = jnp.einsum("bld,dnh->blnh", hx, w_q.astype(dt))
    kk = jnp.einsum("bld,dkh->blkh", hx, w_k.astype(dt))
    v = jnp.einsum("bld,dkh->blkh", hx, w_v.astype(dt))
    q, kk, v = (_lora(self, nm, hx, t, dt) for nm, t in (("q_proj", q), ("k_proj", kk), ("v_proj", v)))
    q = constrain(q, ("batch", "length", "act_heads", None))
    q = layers.apply_rope(q, cos, sin)
    kk = layers.apply_rope(kk, cos, sin)
    q, kk, v = (checkpoint_name(t, nm) for t, nm in ((q, "q"), (kk, "k"), (v, "v")))
    new_kv = (kk, v)
    if layer_kv is not None:
      kk = jnp.concatenate([layer_kv[0].astype(dt), kk], axis=1)
      v = jnp.concatenate([layer_kv[1].astype(dt), v], axis=1)
    a = layers.dot_product_attention(q, kk, v, add, allow, cfg.attention_impl)
    a = _lora(self, "attn_out", a, jnp.einsum("blnh,nhd->bld", a, w_o.astype(dt)), dt)
    a = checkpoint_name(a, "attn_out")
    x = constrain(x + a, ("batch", "length", "act_embed"))

    hx = layers.rms_norm(x, w_ff_norm, cfg.rms_norm_eps)
    gate = jnp.einsum("bld,df->blf", hx, w_gate.astype(dt))
    up = jnp.einsum("bld,df->blf", hx, w_up.astype(dt))
    gate, up = _lora(self, "ff_proj", hx, gate, dt), _lora(self, "up_proj", hx, up, dt)
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    m = _lora(self, "ff_out", hidden, jnp.einsum("blf,fd->bld", hidden, w_down.astype(dt)), dt)
    m = checkpoint_name(m, "mlp_out")
    x = constrain(x + m, ("batch", "length", "act_embed"))
    return x, new_kv


class _ScanBody(nn.Module):
  """Adapts Block to lax.scan: carry = hidden state, per-layer input = optional KV cache."""
  cfg: MMaDAConfig
  collect_kv: bool = False
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, x, layer_kv, cos, sin, add, allow):
    block_cls = Block
    if self.cfg.remat_policy != "none":
      block_cls = nn.remat(Block, policy=_remat_policy(self.cfg.remat_policy), prevent_cse=False)
    y, kv = block_cls(self.cfg, name="block")(x, layer_kv, cos, sin, add, allow)
    out = {}
    if self.collect_kv:
      out["kv"] = kv
    if self.collect_hidden:
      out["hidden"] = x          # the block's input, as the original's output_hidden_states
    return y, out


class Transformer(nn.Module):
  """Embedding → n_layers scanned blocks → final RMSNorm → (optional) untied LM head."""
  cfg: MMaDAConfig
  collect_kv: bool = False
  collect_hidden: bool = False

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(1.0), TOP_AXES["wte"]),
                          (cfg.vocab_size, cfg.d_model), pdt)
    self.ln_f = self.param("ln_f", nn.with_logical_partitioning(nn.initializers.ones, TOP_AXES["ln_f"]),
                           (cfg.d_model,), pdt)
    self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_normal_init((0,)), TOP_AXES["lm_head"]),
                              (cfg.d_model, cfg.vocab_size), pdt)
    scanned = nn.scan(
        _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers, unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    self.blocks_scan = scanned(cfg, self.collect_kv, self.collect_hidden, name="blocks")

  def __call__(self, input_ids, positions, kv_cache, add, allow):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(self.wte, input_ids, axis=0).astype(dt)
    x = constrain(x, ("batch", "length", "act_embed"))
    cos, sin = layers.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x, per_layer = self.blocks_scan(x, kv_cache, cos, sin, add, allow)
    return layers.rms_norm(x, self.ln_f, cfg.rms_norm_eps), per_layer


def _unbox(tree):
  return nn.meta.unbox(tree)


def init_params(cfg: MMaDAConfig, key: jax.Array) -> Params:
  """Random parameters (normal/√fan_in, ones for norms, N(0,1) embedding) in ``cfg.param_dtype``."""
  ids = jnp.zeros((1, 1), jnp.int32)
  pos = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(key, ids, pos, None, None, None)
  return _flatten_blocks(_unbox(variables["params"]))


def _flatten_blocks(p: Params) -> Params:
  out = {k: v for k, v in p.items() if k != "blocks"}
  out["blocks"] = dict(p["blocks"]["block"])
  return out


def _nest_blocks(p: Params) -> Params:
  out = {k: v for k, v in p.items() if k != "blocks"}
  out["blocks"] = {"block": p["blocks"]}
  return out


def check_params(params: Params, cfg: MMaDAConfig) -> None:
  """Raises ValueError naming the first parameter whose presence or shape is wrong."""
  want = param_shapes(cfg)
  for group, shapes in (("", {k: v for k, v in want.items() if k != "blocks"}), ("blocks/", want["blocks"])):
    src = params if not group else params.get("blocks", {})
    for name, shape in shapes.items():
      if name not in src:
        raise ValueError(f"parameter {group}{name} is missing")
      if tuple(src[name].shape) != tuple(shape):
        raise ValueError(f"parameter {group}{name} has shape {tuple(src[name].shape)}, expected {tuple(shape)}")


def forward(params: Params, cfg: MMaDAConfig, input_ids: jax.Array, *,
            attention_mask: jax.Array | None = None, attention_bias: jax.Array | None = None,
            positions: jax.Array | None = None, kv_cache: KV | None = None,
            return_kv: bool = False, return_hidden: bool = False,
            output_hidden_states: bool = False, vocab_start: int = 0, vocab_end: int | None = None):
  """Runs the transformer. Traceable; call it inside ``jax.jit`` with ``cfg`` static.

  Args:
    input_ids: int [B, L].
    attention_mask: [B, L], 1 = token, 0 = padding: hard key-and-query padding mask.
    attention_bias: [B, 1, L, Lc+L]: bool allow-mask or float additive bias.
    positions: int [B, L] or [L] absolute RoPE positions; default 0..L-1.
    kv_cache: (k, v), each [n_layers, B, Lc, n_kv_heads, head_dim], post-RoPE keys/values of
      Lc tokens placed before the current ones.
    return_kv: also return the current tokens' (k, v) [n_layers, B, L, n_kv_heads, head_dim].
    return_hidden: return the final-norm hidden states [B, L, d] instead of logits.
    output_hidden_states: also return [n_layers+1, B, L, d]: each block's input, then the final
      normed state (the original's ``output_hidden_states`` layout).
    vocab_start, vocab_end: compute logits only for this column range.

  Returns:
    logits float32 [B, L, V'] (or hidden states), followed by kv and/or hidden states when
    requested, as a tuple.
  """
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  b, l = input_ids.shape
  lc = 0 if kv_cache is None else kv_cache[0].shape[2]
  if positions is None:
    positions = jnp.arange(lc, lc + l, dtype=jnp.int32)
  positions = jnp.asarray(positions, jnp.int32)
  if positions.ndim == 1:
    positions = positions[None]
  add, allow = layers.attention_masks(attention_mask, attention_bias, l, lc + l)
  model = Transformer(cfg, collect_kv=return_kv, collect_hidden=output_hidden_states)
  variables = {"params": _nest_blocks(params)}
  hidden, per_layer = model.apply(variables, input_ids, positions, kv_cache, add, allow)
  out = hidden if return_hidden else constrain(
      project_logits(params, cfg, hidden, vocab_start, vocab_end), ("batch", "length", "act_vocab"))
  extras = []
  if return_kv:
    extras.append(per_layer["kv"])
  if output_hidden_states:
    extras.append(jnp.concatenate([per_layer["hidden"], hidden[None]], axis=0))
  return (out, *extras) if extras else out


def project_logits(params: Params, cfg: MMaDAConfig, hidden: jax.Array, vocab_start: int = 0,
                   vocab_end: int | None = None) -> jax.Array:
  """LM head on final-norm hidden states [B, L, d] -> float32 [B, L, vocab_end - vocab_start]."""
  w = params["lm_head"][:, vocab_start:vocab_end].astype(jnp.dtype(cfg.dtype))
  if isinstance(w, qwix.QArray):   # weight-only quantized head (mmada_jax.quant): dequantized in dtype
    w = qwix.dequantize(w)
  return jnp.einsum("bld,dv->blv", hidden.astype(jnp.dtype(cfg.dtype)), w,
                    preferred_element_type=jnp.float32)

"""The attention seam: one bidirectional GQA attention, three implementations.

``attention_impl`` (``MMaDAConfig``) selects, when the model is traced:

* ``xla``: an einsum softmax in float32 (materialises [b, heads, l, m] scores); every mask form.
* ``splash``: the Pallas TPU flash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``),
  bidirectional ``FullMask``, padding through kv segment ids, GQA on the kernel's kv heads (K/V
  never repeated), run per shard inside ``jax.shard_map`` over the current mesh (Mosaic kernels
  cannot be partitioned automatically). Sequences are padded to a multiple of 128 inside the
  seam. Supports padding masks (``attention_mask`` [b, l], key-only bool biases [b, 1, 1, m]),
  not dense [b, 1, l, m] masks or float biases. Off TPU it runs in Pallas interpret mode (CPU:
  for tests, slow).
* ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention(...,
  implementation="cudnn", mask=...)``; bf16/fp16 only, GPU only (elsewhere: a ValueError).
* ``auto`` (default): ``splash`` on TPU and ``cudnn`` on GPU where the call's shapes, dtype and
  mask form suit the kernel (splash: ≥ 128 queries, head_dim a multiple of 128, a padding mask;
  cudnn: bf16/fp16, head_dim ≤ 128 and a multiple of 8), else ``xla``. The backend is the
  platform of the current sharding context's mesh (AOT compiles for TPU topologies on a CPU host
  therefore pick splash), else ``jax.default_backend()``.

Every implementation keeps the original's semantics for a query row with no allowed key (a
padding query): the uniform average of all values, never NaN (fp32 and bf16).

Shape legend: b batch, l query length, m key length, n query heads, k kv heads, g = n // k,
h head_dim.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmada_jax.sharding.context import current
from mmada_jax.sharding.rules import logical_to_spec

NEG_INF = float(jnp.finfo(jnp.float32).min)
IMPLS = ("auto", "xla", "splash", "cudnn")
SPLASH_ALIGN = 128          # splash tiles: sequences are padded to a multiple of this
_SPLASH_BLOCKS = (512, 256, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Allow:
  """Which (query, key) pairs may attend: ``q_valid[b, l] & k_valid[b, m] & dense``, each bool,
  None = all. ``dense`` broadcasts to [b, 1, l, m]. Keeping the padding factors separate lets a
  flash kernel take them as segment ids instead of an [l, m] mask."""
  q_valid: jax.Array | None = None
  k_valid: jax.Array | None = None
  dense: jax.Array | None = None

  def materialize(self) -> jax.Array | None:
    """The bool mask, broadcastable to [b, 1, l, m], or None when everything is allowed."""
    out = self.dense
    if self.q_valid is not None:
      qv = self.q_valid[:, None, :, None]
      out = qv if out is None else out & qv
    if self.k_valid is not None:
      kv = self.k_valid[:, None, None, :]
      out = kv if out is None else out & kv
    return out

  @property
  def is_padding(self) -> bool:
    """True when the mask is padding only (no dense part): segment ids express it."""
    return self.dense is None


def attention_masks(attention_mask: jax.Array | None, attention_bias: jax.Array | None,
                    q_len: int, k_len: int) -> tuple[jax.Array | None, Allow | None]:
  """Turns the public mask arguments into (additive float32 bias, :class:`Allow`).

  ``attention_mask`` [b, l] (1 token, 0 padding) gives the hard key-and-query padding mask
  m[:, :, None] & m[:, None, :]; a bool ``attention_bias`` [b, 1, l, m] is an allow-mask ([b, 1,
  1, m]: a key-only mask); a float one is added to the scores as is. The bias broadcasts to
  [b, 1, l, m]; either result may be None.
  """
  add, allow = None, None
  if attention_mask is not None:
    m = attention_mask.astype(bool)
    if m.shape[-1] != k_len or q_len != k_len:
      raise ValueError(f"attention_mask covers {m.shape[-1]} tokens; the query has {q_len} and "
                       f"the keys {k_len}: pass attention_bias [B, 1, {q_len}, {k_len}] instead")
    allow = Allow(q_valid=m, k_valid=m)
  if attention_bias is not None:
    if attention_bias.ndim != 4 or (attention_bias.shape[-2:] != (q_len, k_len) and attention_bias.shape[-2] != 1):
      raise ValueError(f"attention_bias has shape {attention_bias.shape}; expected [B, 1, {q_len}, {k_len}]")
    if attention_bias.dtype == jnp.bool_:
      if attention_bias.shape[1:3] == (1, 1) and attention_bias.shape[-1] == k_len:
        kv = jnp.broadcast_to(attention_bias[:, 0, 0, :], (attention_bias.shape[0], k_len))
        allow = Allow(k_valid=kv) if allow is None else dataclasses.replace(allow, k_valid=allow.k_valid & kv)
      else:
        allow = Allow(dense=attention_bias) if allow is None else dataclasses.replace(allow, dense=attention_bias)
    else:
      # -inf entries would give NaN on fully masked rows; clamp to the most negative finite value.
      add = jnp.maximum(attention_bias.astype(jnp.float32), NEG_INF)
  return add, allow


# ----------------------------------------------------------------------------- selection

def backend_platform() -> str:
  """'tpu' / 'gpu' / 'cpu': the platform the current trace targets (the sharding context's mesh
  devices, else JAX's default backend)."""
  mesh = current().mesh
  if isinstance(mesh, Mesh):
    plat = mesh.devices.flat[0].platform
  else:
    plat = jax.default_backend()
  return "gpu" if plat in ("gpu", "cuda", "rocm") else plat


def _splash_fits(q: jax.Array, add, allow: Allow | None) -> str:
  """'' when splash takes this call, else why not."""
  if add is not None:
    return "a float attention_bias (additive scores) is not a padding mask"
  if allow is not None and not allow.is_padding:
    return ("a dense bool attention_bias [B, 1, L, M] is not a padding mask (give attention_mask [B, L] "
            "or a key-only bias [B, 1, 1, M])")
  return ""


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, add, allow: Allow | None) -> str:
  """The implementation a call runs: ``impl`` checked against the backend, or ``auto`` resolved.

  Raises ValueError when an explicit ``splash`` / ``cudnn`` cannot run this call (never a silent
  fallback); ``auto`` falls back to ``xla`` instead.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
  if impl == "xla":
    return impl
  plat = backend_platform()
  h, l = q.shape[-1], q.shape[1]
  dt = jnp.dtype(q.dtype)
  cudnn_dtype = dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  cudnn_head = h <= 128 and h % 8 == 0
  if impl == "auto":
    if plat == "tpu" and not _splash_fits(q, add, allow) and l >= SPLASH_ALIGN and h % 128 == 0:
      return "splash"
    if plat == "gpu" and cudnn_dtype and cudnn_head:
      return "cudnn"
    return "xla"
  if impl == "splash":
    if plat == "gpu":
      raise ValueError("attention_impl='splash' is the TPU Pallas kernel; this trace targets a GPU: "
                       "use 'cudnn', 'xla' or 'auto'")
    why = _splash_fits(q, add, allow)
    if why:
      raise ValueError(f"attention_impl='splash' cannot take this call: {why}; use 'xla' or 'auto'")
    return impl
  if plat != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a GPU backend; this trace targets {plat!r}: use "
                     "'xla' or 'auto' (auto picks cuDNN on GPU)")
  if not cudnn_dtype:
    raise ValueError(f"attention_impl='cudnn' needs bf16 or fp16 compute (model.dtype); got {dt.name}: "
                     "use 'xla' or 'auto'")
  if not cudnn_head:
    raise ValueError(f"attention_impl='cudnn' needs head_dim <= 128 and a multiple of 8; got {h}")
  return impl


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, add: jax.Array | None,
                          allow: Allow | jax.Array | None, impl: str = "xla") -> jax.Array:
  """Bidirectional grouped-query attention; q [b,l,n,h], k/v [b,m,k,h] -> [b,l,n,h].

  Softmax scale 1/sqrt(h). ``add``: float32 scores bias broadcastable to [b, 1, l, m];
  ``allow``: an :class:`Allow` (or a bool array, taken as its dense part). ``impl``: one of
  :data:`IMPLS` (see the module docstring). A row with every key disallowed gets the uniform
  average of the values, exactly as the original.
  """
  if allow is not None and not isinstance(allow, Allow):
    allow = Allow(dense=allow)
  which = resolve_impl(impl, q, k, add, allow)
  if which == "splash":
    return splash_attention(q, k, v, allow, interpret=backend_platform() != "tpu")
  if which == "cudnn":
    return cudnn_attention(q, k, v, add, allow)
  return xla_attention(q, k, v, add, allow)


# ----------------------------------------------------------------------------- implementations

def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, add: jax.Array | None,
                  allow: Allow | None) -> jax.Array:
  """Einsum attention, float32 softmax; disallowed scores are set to the most negative finite
  float, so a fully masked row is uniform rather than NaN."""
  b, l, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  mask = None if allow is None else allow.materialize()
  qg = q.reshape(b, l, kv, g, h)
  scores = jnp.einsum("blkgh,bmkh->bkglm", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(h)))
  if add is not None:
    scores = jnp.maximum(scores + add[:, :, None], NEG_INF)   # add: [b,1,l,m] -> [b,1,1,l,m]
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkglm,bmkh->blkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, l, n, h).astype(q.dtype)


def _uniform_rows(out: jax.Array, v: jax.Array, dead: jax.Array) -> jax.Array:
  """``out`` [b,l,n,h] with the rows where ``dead`` [b, l] replaced by the mean of ``v`` [b,m,k,h]
  over all keys (the softmax of a fully masked row), per query head's kv head."""
  b, l, n, h = out.shape
  kv = v.shape[2]
  mean = jnp.mean(v.astype(jnp.float32), axis=1).astype(out.dtype)        # [b, k, h]
  mean = jnp.broadcast_to(mean[:, None, :, None, :], (b, l, kv, n // kv, h)).reshape(b, l, n, h)
  return jnp.where(dead[:, :, None, None], mean, out)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, add: jax.Array | None,
                    allow: Allow | None) -> jax.Array:
  """cuDNN flash attention: the allow-mask as ``mask=`` (bool [b, 1, l, m]), the float bias as
  ``bias=`` clamped to the compute dtype's finite range (never −inf), GQA on the kernel's kv
  heads; fully masked rows are set to the uniform average afterwards."""
  b, l, n, h = q.shape
  m = k.shape[1]
  dt = q.dtype
  mask = None if allow is None else allow.materialize()
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, 1, l, m))
  bias = None
  if add is not None:
    bias = jnp.broadcast_to(jnp.maximum(add, float(jnp.finfo(dt).min)).astype(dt), (b, 1, l, m))
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
  if mask is None and add is None:
    return out
  ok = jnp.ones((b, 1, l, m), bool) if mask is None else mask
  if add is not None:
    ok = ok & (jnp.broadcast_to(add, (b, 1, l, m)) > NEG_INF)
  return _uniform_rows(out, v, ~jnp.any(ok, axis=-1)[:, 0])


def _round_up(x: int, to: int) -> int:
  return -(-x // to) * to


def _block(length: int) -> int:
  return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  """A bidirectional (FullMask) splash MHA kernel for [heads, q_len, h] queries against kv heads."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bkv = _block(q_len), _block(kv_len)
  # Built per trace, not cached: its mask tables become arrays of the trace it is built in.
  sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, allow: Allow | None, *,
                     interpret: bool = False) -> jax.Array:
  """Splash flash attention (padding masks only); per shard of the current mesh in ``shard_map``.

  Queries are pre-scaled by 1/sqrt(h); l and m are padded to multiples of 128 (padded keys get
  kv segment id 0, every query id 1, so a query attends exactly the valid keys); rows with no
  valid key (padding queries, or a batch row without valid keys) are then set to the uniform
  average of the values, as the original.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, l, n, h = q.shape
  m, kv = k.shape[1], k.shape[2]
  lp, mp = _round_up(l, SPLASH_ALIGN), _round_up(m, SPLASH_ALIGN)
  k_valid = None if allow is None else allow.k_valid
  q_valid = None if allow is None else allow.q_valid
  in_range = jnp.arange(mp) < m
  if k_valid is None:
    kv_seg = jnp.broadcast_to(in_range, (b, mp))
    any_key = None
  else:
    any_key = jnp.any(k_valid, axis=-1)                                   # [b]
    kvp = jnp.pad(k_valid, ((0, 0), (0, mp - m)))
    kv_seg = jnp.where(any_key[:, None], kvp, in_range[None])             # never an empty row
  kv_seg = kv_seg.astype(jnp.int32)
  q_seg = jnp.ones((b, lp), jnp.int32)
  qs = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).astype(q.dtype)
  qt = jnp.pad(qs, ((0, 0), (0, lp - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3)   # [b, n, lp, h]
  kt = jnp.pad(k, ((0, 0), (0, mp - m), (0, 0), (0, 0))).transpose(0, 2, 1, 3)    # [b, k, mp, h]
  vt = jnp.pad(v, ((0, 0), (0, mp - m), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  def local(qt, kt, vt, q_seg, kv_seg):
    kernel = _splash_kernel(qt.shape[1], lp, mp, interpret)
    one = lambda q1, k1, v1, s1, t1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, t1))
    return jax.vmap(one)(qt, kt, vt, q_seg, kv_seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = local(qt, kt, vt, q_seg, kv_seg)
  else:
    rules, shape = current().rules, dict(mesh.shape)
    batch = logical_to_spec(("batch",), rules, shape, (b,))[0]
    qh = logical_to_spec(("act_heads",), rules, shape, (n,))[0]
    kh = logical_to_spec(("act_kv_heads",), rules, shape, (kv,))[0]
    heads = qh if qh == kh else None           # kv head j serves query heads j*g..: split both alike
    hs, ss = P(batch, heads, None, None), P(batch, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(hs, hs, hs, ss, ss), out_specs=hs,
                        check_vma=False)(qt, kt, vt, q_seg, kv_seg)
  out = out.transpose(0, 2, 1, 3)[:, :l].astype(q.dtype)                   # [b, l, n, h]
  if q_valid is None and any_key is None:
    return out
  dead = jnp.zeros((b, l), bool)
  if q_valid is not None:
    dead = dead | ~q_valid
  if any_key is not None:
    dead = dead | ~any_key[:, None]
  return _uniform_rows(out, v, dead)

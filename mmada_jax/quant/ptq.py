"""Weight-only post-training quantization (PTQ) of the transformer's matmul weights, with qwix.

A quantized parameter pytree is the ordinary one (``model.transformer`` layout) in which the
attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``attn_out``), the MLP projections
(``ff_proj``, ``up_proj``, ``ff_out``) and optionally the LM head are qwix ``QArray`` leaves
(``qvalue`` int8 / int4 of the weight's shape, float32 ``scale``). ``transformer.forward``
consumes them directly (each layer's weight is dequantized inside the layer scan, the head's
inside ``project_logits``), so logits, every sampler and the eval harness run unchanged on it.

Scales (absmax, symmetric, as qwix's ``HowToQuantize``): one per output channel, i.e. per entry of
every non-contracting axis of the weight's einsum, and per layer of the stacked ``layers`` axis;

* int8: over the whole contraction (per-channel);
* int4: subchannel, one scale per ``tile_size`` (default 128) entries of the last contracting axis
  (per-channel when that axis is not a multiple of the tile larger than one tile).

Not quantized: ``wte`` (the embedding is a gather, not a matmul; its rows enter the residual
stream unscaled; 0.5 GiB of 16 GiB in the 8B, kept in the parameter dtype), the RMSNorm weights,
and the LM head unless ``lm_head=True``.

Quantization runs on the host CPU one layer slice at a time (a float32 copy of one
``[in..., out...]`` matrix at most), so a checkpoint loaded as numpy (``load_hf_checkpoint(...,
host=True)``) is quantized tensor by tensor and each finished leaf placed on its devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig

QArray = qwix.QArray
QTYPES = ("int8", "int4")
_QDTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_TILE = {"int8": None, "int4": 128}

# The einsum each weight enters (per layer, as in transformer.Block / project_logits); its
# contracting axes are the weight's subscripts absent from the output.
EINSUMS = {
    "q_proj": "bld,dnh->blnh", "k_proj": "bld,dkh->blkh", "v_proj": "bld,dkh->blkh",
    "attn_out": "blnh,nhd->bld", "ff_proj": "bld,df->blf", "up_proj": "bld,df->blf",
    "ff_out": "blf,fd->bld",
}
LM_HEAD_EINSUM = "bld,dv->blv"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """What is quantized: ``qtype`` ('int8' | 'int4') of the block projections, the LM head too when
  ``lm_head``, and the int4 subchannel ``tile_size`` (None: per-channel scales)."""
  qtype: str
  lm_head: bool = False
  tile_size: int | None = None

  def __post_init__(self):
    if self.qtype not in QTYPES:
      raise ValueError(f"unknown quantization {self.qtype!r}; use one of {QTYPES}")
    if self.tile_size is not None and (isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int)
                                       or self.tile_size <= 0):
      raise ValueError(f"tile_size must be a positive int or None, got {self.tile_size!r}")

  @classmethod
  def make(cls, qtype: "str | QuantSpec", lm_head: bool = False, tile_size: int | None | str = "default"
           ) -> "QuantSpec":
    """A spec from a qtype name (tile size: the qtype's default) or an existing spec."""
    if isinstance(qtype, QuantSpec):
      return qtype
    if not isinstance(qtype, str):
      raise TypeError(f"quantize must be one of {QTYPES} or a QuantSpec, got {type(qtype).__name__}")
    if qtype not in QTYPES:
      raise ValueError(f"unknown quantization {qtype!r}; use one of {QTYPES}")
    return cls(qtype, bool(lm_head), DEFAULT_TILE[qtype] if tile_size == "default" else tile_size)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "quantization") -> "QuantSpec":
    unknown = sorted(set(d) - {"qtype", "lm_head", "tile_size"})
    if unknown or "qtype" not in d:
      raise ValueError(f"{where}: bad quantization record {dict(d)!r} (keys qtype, lm_head, tile_size)")
    return cls(str(d["qtype"]), bool(d.get("lm_head", False)), d.get("tile_size"))

  def targets(self) -> tuple[str, ...]:
    """Paths ('blocks/q_proj', …, 'lm_head') of the quantized leaves."""
    return tuple("blocks/" + k for k in EINSUMS) + (("lm_head",) if self.lm_head else ())


def is_quantized(x: Any) -> bool:
  return isinstance(x, QArray)


def _axes_of(einsum: str, stacked: bool, shape: tuple[int, ...], tile_size: int | None
             ) -> tuple[tuple[int, ...], dict[int, int]]:
  """(channelwise axes, tiled axes {axis: tile}) of a weight of ``shape`` (the stacked one when
  ``stacked``: axis 0 = layers, channelwise) in ``einsum``'s right operand."""
  lhs_rhs, out = einsum.split("->")
  rhs = lhs_rhs.split(",")[1]
  off = 1 if stacked else 0
  channel = [0] if stacked else []
  contract = []
  for i, c in enumerate(rhs):
    (contract if c not in out else channel).append(i + off)
  tiled = {}
  if tile_size:
    last = contract[-1]
    if shape[last] % tile_size == 0 and shape[last] > tile_size:
      tiled[last] = tile_size
  return tuple(channel), tiled


def scale_shape(shape: tuple[int, ...], channel: tuple[int, ...], tiled: Mapping[int, int]) -> tuple[int, ...]:
  """Scale shape: full on channelwise axes, ``size / tile`` on tiled ones, 1 elsewhere."""
  return tuple(s if a in channel else (s // tiled[a] if a in tiled else 1) for a, s in enumerate(shape))


def _leaf_layout(path: str, shape: tuple[int, ...], spec: QuantSpec):
  einsum = LM_HEAD_EINSUM if path == "lm_head" else EINSUMS[path.split("/", 1)[1]]
  return _axes_of(einsum, path != "lm_head", tuple(shape), spec.tile_size)


@functools.lru_cache(maxsize=None)
def _quantizer(qtype: str, channel: tuple[int, ...], tiled: tuple[tuple[int, int], ...]):
  """A jitted float32 array -> (qvalue, scale) by qwix's absmax quantization."""
  def fn(x):
    q = qwix.quantize(x, _QDTYPES[qtype], channelwise_axes=channel, tiled_axes=dict(tiled))
    return q.qvalue, q.scale.astype(jnp.float32)
  return jax.jit(fn)


def quantize_array(w: Any, path: str, spec: QuantSpec) -> QArray:
  """One weight (numpy or jax, stacked ``[L, ...]`` for 'blocks/*') -> a host (numpy) ``QArray``.

  Runs on the CPU backend one layer slice at a time in float32; the result's leaves are numpy
  arrays (int8 / ml_dtypes int4 qvalue, float32 scale).
  """
  shape = tuple(w.shape)
  channel, tiled = _leaf_layout(path, shape, spec)
  stacked = path != "lm_head"
  cpu = jax.devices("cpu")[0]
  qdt = np.dtype(_QDTYPES[spec.qtype])
  qvalue = np.empty(shape, qdt)
  scale = np.empty(scale_shape(shape, channel, tiled), np.float32)
  # Per layer (axis 0 of a stacked weight) the axes shift down by one.
  sub_c = tuple(a - 1 for a in channel if a) if stacked else channel
  sub_t = tuple(sorted((a - 1, t) for a, t in tiled.items())) if stacked else tuple(sorted(tiled.items()))
  fn = _quantizer(spec.qtype, sub_c, sub_t)
  for i in range(shape[0] if stacked else 1):
    x = w[i] if stacked else w
    x = jax.device_put(np.asarray(jax.device_get(x), np.float32), cpu)
    qv, sc = fn(x)
    if stacked:
      qvalue[i], scale[i] = np.asarray(qv), np.asarray(sc)
    else:
      qvalue[...], scale[...] = np.asarray(qv), np.asarray(sc)
    del x, qv, sc
  return QArray(qvalue, scale, None, _QDTYPES[spec.qtype])


def _get(params: Mapping[str, Any], path: str) -> Any:
  top, _, sub = path.partition("/")
  return params[top][sub] if sub else params[top]


def _set(params: dict[str, Any], path: str, value: Any) -> None:
  top, _, sub = path.partition("/")
  if sub:
    params[top][sub] = value
  else:
    params[top] = value


def quantize_params(params: Mapping[str, Any], cfg: MMaDAConfig, qtype: "str | QuantSpec" = "int8", *,
                    lm_head: bool = False, place: Callable[[str, QArray], Any] | None = None,
                    in_place: bool = False) -> dict[str, Any]:
  """Float parameter pytree -> the pytree with the :class:`QuantSpec`'s weights as ``QArray`` leaves.

  Args:
    params: float parameters (``transformer`` layout; numpy or jax leaves).
    qtype: 'int8', 'int4' or a :class:`QuantSpec` (then ``lm_head`` is ignored).
    lm_head: also quantize the LM head.
    place: called as ``place(path, host_qarray)`` for each quantized leaf, returns what is stored
      (default: ``jax.device_put`` to the default device).
    in_place: replace the leaves inside ``params`` itself (its dicts are mutated), so each float
      leaf is released as soon as its quantized one exists: peak host memory stays near one copy.

  Returns the (new, or with ``in_place`` the same) pytree; the other leaves are passed through.
  """
  spec = QuantSpec.make(qtype, lm_head)
  transformer.check_params(params, cfg)
  if quantization_of(params) is not None:
    raise ValueError("these parameters are already quantized (quantize the float checkpoint instead)")
  out = params if in_place else {**params, "blocks": dict(params["blocks"])}
  put = place or (lambda path, q: jax.device_put(q))
  for path in spec.targets():
    w = _get(out, path)
    _set(out, path, None)        # drop our reference first (in place: the float leaf can be freed)
    q = quantize_array(w, path, spec)
    del w
    _set(out, path, put(path, q))
  return out


def dequantize_params(params: Mapping[str, Any], dtype: Any = None) -> dict[str, Any]:
  """The float pytree of a quantized one (``dtype``: default each scale's float32)."""
  def deq(x):
    if not is_quantized(x):
      return x
    y = qwix.dequantize(x)
    return y if dtype is None else y.astype(dtype)
  return jax.tree.map(deq, dict(params), is_leaf=is_quantized)


def quantization_of(params: Mapping[str, Any]) -> QuantSpec | None:
  """The :class:`QuantSpec` a parameter pytree carries (None for float parameters).

  Raises ValueError when only some block projections are quantized or their qtypes differ.
  """
  blocks = params.get("blocks", {}) if isinstance(params, Mapping) else {}
  leaves = {k: blocks.get(k) for k in EINSUMS}
  q = {k: v for k, v in leaves.items() if is_quantized(v)}
  head = params.get("lm_head") if isinstance(params, Mapping) else None
  if not q:
    if is_quantized(head):
      raise ValueError("the LM head is quantized but the block projections are not")
    return None
  if len(q) != len(leaves):
    raise ValueError(f"only some block projections are quantized: {sorted(q)} of {sorted(leaves)}")
  names = {k: jnp.dtype(v.qvalue.dtype).name for k, v in q.items()}
  if len(set(names.values())) != 1 or next(iter(names.values())) not in QTYPES:
    raise ValueError(f"mixed or unknown quantized dtypes: {names}")
  qtype = next(iter(names.values()))
  tile = None
  for k, v in q.items():
    channel, _ = _axes_of(EINSUMS[k], True, tuple(v.shape), None)
    for a, (s, t) in enumerate(zip(v.shape, v.scale.shape)):
      if a not in channel and t > 1:
        tile = s // t
  return QuantSpec(qtype, is_quantized(head), tile)


# ----------------------------------------------------------------------------- layout

def param_axes(params_or_spec: Any, cfg: MMaDAConfig) -> dict[str, Any]:
  """Logical axes tree matching a (possibly quantized) pytree, or the pytree a :class:`QuantSpec`
  gives: a ``QArray`` node where the parameter is one, its ``qvalue`` with the weight's axes, its
  ``scale`` with the same names except None on axes of size 1."""
  axes = transformer.param_axes(cfg)
  spec = params_or_spec if isinstance(params_or_spec, QuantSpec) or params_or_spec is None else (
      quantization_of(params_or_spec))
  if spec is None:
    return axes
  shapes = transformer.param_shapes(cfg)
  for path in spec.targets():
    names = _get(axes, path)
    shape = _get(shapes, path)
    channel, tiled = _leaf_layout(path, shape, spec)
    sshape = scale_shape(shape, channel, tiled)
    _set(axes, path, QArray(names, tuple(n if s > 1 else None for n, s in zip(names, sshape)), None,
                            _QDTYPES[spec.qtype]))
  return axes


def abstract_params(cfg: MMaDAConfig, spec: QuantSpec | None, shardings: Any = None) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` pytree of the parameters quantized by ``spec`` (None: float),
  with ``shardings`` (a matching tree of shardings) attached when given."""
  shapes = transformer.param_shapes(cfg)
  is_shape = lambda t: isinstance(t, tuple) and all(isinstance(i, int) for i in t)
  pdt = jnp.dtype(cfg.param_dtype)
  out = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, pdt), shapes, is_leaf=is_shape)
  if spec is not None:
    for path in spec.targets():
      shape = _get(shapes, path)
      channel, tiled = _leaf_layout(path, shape, spec)
      _set(out, path, QArray(jax.ShapeDtypeStruct(shape, jnp.dtype(_QDTYPES[spec.qtype])),
                             jax.ShapeDtypeStruct(scale_shape(shape, channel, tiled), jnp.float32), None,
                             _QDTYPES[spec.qtype]))
  if shardings is not None:
    out = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), out, shardings)
  return out


def cast_float(params: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """``params`` with every float (non-quantized) leaf cast to ``dtype``; ``QArray`` leaves kept."""
  return jax.tree.map(lambda x: x if is_quantized(x) else x.astype(dtype), dict(params), is_leaf=is_quantized)


def num_params(params: Any) -> int:
  """Logical parameter count (a ``QArray`` counts as its weight's elements)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def nbytes(params: Any) -> int:
  """Bytes the parameter leaves occupy (int4 counted as half a byte)."""
  total = 0.0
  for x in jax.tree.leaves(params):
    dt = jnp.dtype(x.dtype)
    total += np.prod(x.shape) * (0.5 if dt.name in ("int4", "uint4") else dt.itemsize)
  return int(total)


# ----------------------------------------------------------------------------- storage

def to_storage(params: Mapping[str, Any]) -> dict[str, Any]:
  """The pytree as plain dicts for Orbax: each ``QArray`` -> ``{'qvalue', 'scale'}`` with int4
  values widened to int8 (lossless; int4 is not a tensorstore dtype)."""
  def conv(x):
    if not is_quantized(x):
      return x
    qv = x.qvalue
    if jnp.dtype(qv.dtype).name == "int4":
      qv = qv.astype(np.int8) if isinstance(qv, np.ndarray) else qv.astype(jnp.int8)
    return {"qvalue": qv, "scale": x.scale}
  return jax.tree.map(conv, dict(params), is_leaf=is_quantized)


def storage_target(abstract: Mapping[str, Any]) -> dict[str, Any]:
  """:func:`to_storage` of an abstract quantized pytree (its restore target)."""
  def conv(x):
    if not is_quantized(x):
      return x
    qv = x.qvalue
    return {"qvalue": jax.ShapeDtypeStruct(qv.shape, jnp.int8, sharding=qv.sharding), "scale": x.scale}
  return jax.tree.map(conv, dict(abstract), is_leaf=is_quantized)


def from_storage(stored: Mapping[str, Any], spec: QuantSpec) -> dict[str, Any]:
  """Inverse of :func:`to_storage`: the ``spec``'s leaves back to ``QArray`` (int4 narrowed)."""
  out = {**stored, "blocks": dict(stored["blocks"])}
  for path in spec.targets():
    d = _get(out, path)
    if not (isinstance(d, Mapping) and set(d) == {"qvalue", "scale"}):
      raise ValueError(f"stored parameter {path} is not a quantized {{qvalue, scale}} pair")
    qv = d["qvalue"]
    if spec.qtype == "int4":
      qv = qv.astype(jnp.int4)
    _set(out, path, QArray(qv, d["scale"], None, _QDTYPES[spec.qtype]))
  return out


# ----------------------------------------------------------------------------- placement

def placer(cfg: MMaDAConfig, spec: QuantSpec | None, mesh: jax.sharding.Mesh | None = None,
           rules=None) -> Callable[[str, Any], Any]:
  """``place(path, leaf)``: puts one (host) leaf, float array or ``QArray``, on the default
  device, or sharded over ``mesh`` by its logical axes (:func:`param_axes`) and ``rules``."""
  from mmada_jax.sharding import ShardingContext
  axes = param_axes(spec, cfg)
  ctx = None if mesh is None else ShardingContext(mesh, rules)

  def place(path: str, leaf: Any) -> Any:
    if ctx is None:
      return jax.device_put(leaf, jax.devices()[0])
    return ctx.place(leaf, _get(axes, path))
  return place


def leaf_paths(cfg: MMaDAConfig) -> tuple[str, ...]:
  """Every parameter path ('wte', 'blocks/q_proj', …) of the transformer."""
  shapes = transformer.param_shapes(cfg)
  return tuple(k for k in shapes if k != "blocks") + tuple("blocks/" + k for k in shapes["blocks"])


def quantize_and_place(params: dict[str, Any], cfg: MMaDAConfig, spec: QuantSpec,
                       mesh: jax.sharding.Mesh | None = None, rules=None) -> dict[str, Any]:
  """Host parameters (numpy or CPU arrays, e.g. ``load_hf_checkpoint(..., host=True)``) ->
  quantized and placed, tensor by tensor and in place (each host leaf released once placed)."""
  place = placer(cfg, spec, mesh, rules)
  quantize_params(params, cfg, spec, place=place, in_place=True)
  targets = set(spec.targets())
  for path in leaf_paths(cfg):
    if path not in targets:
      leaf = _get(params, path)
      _set(params, path, None)
      _set(params, path, place(path, leaf))
      del leaf
  return params

"""LoRA and QLoRA fine-tuning: the ``config.lora`` section and what the trainer does with it.

With ``lora.rank > 0`` the trainer trains low-rank adapters of the block matrices named by
``lora.targets`` and nothing else:

* **adapters** (the TrainState's ``params``, fp32 masters; the only leaves AdamW sees):
  ``blocks/<name>_lora_a`` [L, in..., r] and ``blocks/<name>_lora_b`` [L, r, out...], where
  ``in`` / ``out`` are the base matrix's input (contracted) and output dims; A ~ N(0, 1/fan_in),
  B = 0, so training starts at the base model. A carries the base's input logical axes, B its
  output axes, the rank axis is replicated (the sharding rules of the base apply unchanged).
* **base** (the step's frozen argument, never donated nor updated): the model's parameters in
  the compute dtype ``model.dtype`` (the forward casts every weight to it, so this is exact) and,
  with ``lora.base_qtype`` int8 / int4 (QLoRA), every block matrix a qwix ``QArray`` (weight-only,
  absmax scales per output channel; int4 also per 128-input group), dequantized layer by layer
  inside the scanned forward. ``wte``, ``lm_head`` and the norms stay in ``model.dtype``.
* the forward sees ``base ∪ adapters`` (:meth:`LoraPlan.compose`, the α/r scale folded into B):
  ``y = x·W + (x·A)·B·α/r`` per adapted projection (:mod:`mmada_jax.model.transformer`). Every
  stage's loss, rollouts and samplers therefore run unchanged (:meth:`LoraPlan.wrap_stage`); a
  stage's copy of the initial params (UniGRPO's π_ref) *is* the base, adapters off, at no cost.
* checkpoints hold the adapters; their ``meta`` item records ``lora`` (config, base path,
  :func:`fingerprint` of the base); a resume against another base is a :class:`BaseMismatch`.
* :meth:`LoraPlan.merge`: ``W + A·B·α/r`` for export (``convert to-hf --merge-lora``).

Why not qwix's ``LoraProvider``: it rewrites a Flax model's ``einsum`` / ``dot_general`` calls
by intercepting module methods, and creates the adapters as new params in the intercepted
module. The model here is a Linen module applied functionally inside every sampler, loss and
AOT program with layer-stacked params (``nn.scan``), so the provider would have to wrap the
module at each of those call sites and would key adapters on the identity of intercepted weights.
An explicit adapter pytree keeps the params functional: adapters are ordinary leaves with
logical axes, the optimizer state and checkpoint hold exactly them, and merging is a tensordot.
qwix is used for what it does well here: the quantized base (``qwix.quantize`` /
``qwix.dequantize``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig
from mmada_jax.sharding import ShardingContext

ADAPTABLE = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
"""Block matrices that take adapters (and that QLoRA quantizes)."""
N_IN = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "attn_out": 2, "ff_proj": 1, "up_proj": 1, "ff_out": 1}
"""Input (contracted) dims of each block matrix after its leading layer axis."""
QTYPES = {"none": None, "int8": jnp.int8, "int4": jnp.int4}
INT4_GROUP = 128


class BaseMismatch(ValueError):
  """The adapters were trained on another base model than the one given."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The ``config.lora`` section. ``rank``: adapter rank r (0 = off: full fine-tuning).
  ``alpha``: the update is scaled by alpha / rank. ``targets``: a regular expression matched in
  full against the block matrix names (``q_proj k_proj v_proj attn_out ff_proj up_proj
  ff_out``). ``base_qtype``: 'none' (LoRA: base in ``model.dtype``), 'int8' or 'int4' (QLoRA)."""
  rank: int = 0
  alpha: float = 16.0
  targets: str = "q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out"
  base_qtype: Literal["none", "int8", "int4"] = "none"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 = off)")
    if self.rank and self.alpha <= 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")


def parse_lora(section: Any) -> LoraConfig:
  """The ``config.lora`` ConfigDict (or mapping) as a :class:`LoraConfig`."""
  from mmada_jax.config_schema import parse
  return parse(LoraConfig, section, "config.lora")


def match_targets(pattern: str) -> tuple[str, ...]:
  """The block matrices whose names ``pattern`` matches in full (ValueError if none or invalid)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"lora.targets={pattern!r} is not a regular expression: {e}") from e
  names = tuple(n for n in ADAPTABLE if rx.fullmatch(n))
  if not names:
    raise ValueError(f"lora.targets={pattern!r} matches no block matrix; adaptable: {'|'.join(ADAPTABLE)}")
  return names


@dataclasses.dataclass(frozen=True)
class LoraPlan:
  """``config.lora`` resolved against the model: adapter shapes / axes, base layout, wrappers."""
  cfg: LoraConfig
  model_cfg: MMaDAConfig
  targets: tuple[str, ...]

  @classmethod
  def create(cls, cfg: LoraConfig, model_cfg: MMaDAConfig) -> "LoraPlan":
    if cfg.rank <= 0:
      raise ValueError("LoraPlan needs lora.rank > 0")
    return cls(cfg, model_cfg, match_targets(cfg.targets))

  @property
  def scale(self) -> float:
    return float(self.cfg.alpha) / int(self.cfg.rank)

  @property
  def qtype(self):
    return QTYPES[self.cfg.base_qtype]

  # ------------------------------------------------------------------ adapters

  def adapter_shapes(self) -> dict:
    """``{"blocks": {"<name>_lora_a": (L, *in, r), "<name>_lora_b": (L, r, *out)}}``."""
    base, r = transformer.param_shapes(self.model_cfg)["blocks"], int(self.cfg.rank)
    out = {}
    for n in self.targets:
      shape, k = base[n], 1 + N_IN[n]
      out[f"{n}_lora_a"] = (*shape[:k], r)
      out[f"{n}_lora_b"] = (shape[0], r, *shape[k:])
    return {"blocks": out}

  def adapter_axes(self) -> dict:
    """Logical axes: A = the base's (layers, input axes) + replicated rank; B = (layers,
    replicated rank) + the base's output axes."""
    out = {}
    for n in self.targets:
      axes, k = ("layers",) + transformer.BLOCK_AXES[n], 1 + N_IN[n]
      out[f"{n}_lora_a"] = (*axes[:k], None)
      out[f"{n}_lora_b"] = (axes[0], None, *axes[k:])
    return {"blocks": out}

  def abstract_adapters(self) -> dict:
    dt = jnp.dtype(self.model_cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), self.adapter_shapes(),
                        is_leaf=lambda x: isinstance(x, tuple))

  def init_adapters(self, key: jax.Array) -> dict:
    """A ~ N(0, 1/fan_in) (fan_in = the base input size), B = 0: the adapted model starts equal
    to the base. Traceable."""
    dt = jnp.dtype(self.model_cfg.param_dtype)
    out = {}
    for i, (name, shape) in enumerate(sorted(self.adapter_shapes()["blocks"].items())):
      if name.endswith("_lora_b"):
        out[name] = jnp.zeros(shape, dt)
      else:
        fan_in = int(np.prod(shape[1:-1]))
        out[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) / np.sqrt(fan_in)).astype(dt)
    return {"blocks": out}

  def compose(self, base: Any, adapters: Any) -> Any:
    """The forward's params: ``base`` with the adapters added to ``blocks`` (B scaled by α/r)."""
    extra = {k: (v * self.scale if k.endswith("_lora_b") else v) for k, v in adapters["blocks"].items()}
    return {**base, "blocks": {**base["blocks"], **extra}}

  def merge(self, base: Any, adapters: Any) -> Any:
    """Plain params ``W + A·B·α/r`` (the adapted matrices in float32; a quantized W dequantized
    first): the adapted model as an ordinary checkpoint."""
    blocks = dict(base["blocks"])
    for n in self.targets:
      w = blocks[n]
      w = qwix.dequantize(w) if isinstance(w, qwix.QArray) else jnp.asarray(w)
      a = jnp.asarray(adapters["blocks"][f"{n}_lora_a"], jnp.float32)
      b = jnp.asarray(adapters["blocks"][f"{n}_lora_b"], jnp.float32)
      delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b) * self.scale
      blocks[n] = w.astype(jnp.float32) + delta
    return {**base, "blocks": blocks}

  # ------------------------------------------------------------------ base

  def base_dtype(self) -> str:
    return str(self.model_cfg.dtype)

  def quantize_base(self, base: Any) -> Any:
    """``base`` with every block matrix a qwix QArray of ``lora.base_qtype`` (unchanged for
    'none'): absmax scales per layer and output channel (int4: also per 128-input group or per
    head). Traceable."""
    if self.qtype is None:
      return base
    blocks = dict(base["blocks"])
    for n in ADAPTABLE:
      w = blocks[n]
      channel, tiled = (0, *range(1 + N_IN[n], w.ndim)), None
      if self.qtype == jnp.int4:
        if N_IN[n] == 2:                 # attn_out [L, heads, head_dim, d]: one scale per head
          channel = (0, 1, *channel[1:])
        elif w.shape[1] > INT4_GROUP and w.shape[1] % INT4_GROUP == 0:
          tiled = {1: INT4_GROUP}
      blocks[n] = qwix.quantize(w, self.qtype, channelwise_axes=channel, tiled_axes=tiled, scale_dtype=w.dtype)
    return {**base, "blocks": blocks}

  def abstract_base(self, ctx: ShardingContext, quantized: bool = True) -> Any:
    """The base's ShapeDtypeStructs with shardings (quantized per ``base_qtype`` unless
    ``quantized=False``)."""
    dt = jnp.dtype(self.base_dtype())
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), transformer.param_shapes(self.model_cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    if quantized:
      shapes = jax.eval_shape(self.quantize_base, shapes)
    sh = self.base_shardings(ctx, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)

  def base_shardings(self, ctx: ShardingContext, base: Any) -> Any:
    """NamedShardings of a (possibly quantized) base: a QArray's value takes its matrix's
    logical axes, its scale the same axes with its size-1 dims replicated."""
    axes = transformer.param_axes(self.model_cfg)

    def one(path, leaf):
      keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      names = axes["blocks"][keys[1]] if keys[0] == "blocks" else axes[keys[0]]
      if keys[-1] in ("scale", "zero_point"):
        names = tuple(None if s == 1 else a for a, s in zip(names, leaf.shape))
      return ctx.sharding(names, leaf.shape)
    return jax.tree_util.tree_map_with_path(one, base)

  def place_base(self, params: Any, ctx: ShardingContext) -> Any:
    """``params`` (any float dtype, any placement) as the frozen base: cast to ``model.dtype``,
    sharded, quantized per ``base_qtype`` (on device, layer-stacked matrices one at a time)."""
    plain = self.abstract_base(ctx, quantized=False)
    dt = jnp.dtype(self.base_dtype())
    base = jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x).astype(dt) if x.dtype != dt else x, a.sharding),
                        params, plain)
    if self.qtype is None:
      return base
    target = self.base_shardings(ctx, jax.eval_shape(self.quantize_base, plain))
    return jax.jit(self.quantize_base, out_shardings=target, donate_argnums=0)(base)

  # ------------------------------------------------------------------ trainer hooks

  def wrap_stage(self, stage: Any) -> Any:
    """``stage`` over the adapters: the wrapped stage's params are the adapters and its frozen
    pytree is ``{"base": base, "stage": the stage's own frozen pytree}`` (:meth:`init_frozen`);
    its loss, pre-step (rollouts) and frozen state see ``compose(base, adapters)``."""
    from mmada_jax.train.stages import Stage
    plan = self
    holes: list[str] = []      # keys of the stage's frozen dict that hold a copy of the params (π_ref)

    def stage_frozen(frozen):
      inner = frozen["stage"]
      return {**inner, **{k: frozen["base"] for k in holes}} if holes else inner

    def loss_fn(adapters, batch, rng, frozen):
      return stage.loss_fn(plan.compose(frozen["base"], adapters), batch, rng, stage_frozen(frozen))

    def init_frozen(base):
      inner = None
      if stage.init_frozen is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), base)
        shape = stage.init_frozen(abstract)
        treedef = jax.tree.structure(base)
        holes[:] = ([k for k, v in shape.items() if jax.tree.structure(v) == treedef]
                    if isinstance(shape, dict) else [])
        if isinstance(shape, dict) and set(holes) == set(shape):
          inner = {}
        else:
          inner = stage.init_frozen(base)
          inner = {k: v for k, v in inner.items() if k not in holes} if holes else inner
      return {"base": base, "stage": inner}

    pre_step = None
    if stage.pre_step is not None:
      def pre_step(ctx, batch):
        params = plan.compose(ctx.frozen["base"], ctx.state.params)
        inner = dataclasses.replace(ctx, state=ctx.state.replace(params=params), frozen=stage_frozen(ctx.frozen))
        return stage.pre_step(inner, batch)

    return Stage(name=stage.name, loss_fn=loss_fn, make_batches=stage.make_batches, sequences=stage.sequences,
                 batch_spec=stage.batch_spec, pre_step=pre_step, init_frozen=init_frozen,
                 logit_shape=stage.logit_shape)

  def meta(self, base_path: str, base_hash: str) -> dict:
    """What a checkpoint records about the adapters and their base."""
    return {"config": dataclasses.asdict(self.cfg), "targets": list(self.targets), "base_path": base_path,
            "base_hash": base_hash, "base_dtype": self.base_dtype()}

  def check_meta(self, meta: Any, base_path: str, base_hash: str, where: str) -> None:
    """Raises :class:`BaseMismatch` when the checkpoint ``meta`` (its ``lora`` entry) was written
    for another base or adapter layout than this run's."""
    got = meta.get("lora") if isinstance(meta, dict) else None
    if not got:
      raise BaseMismatch(f"{where} holds no LoRA adapters (its meta has no 'lora' entry): it is not a "
                         "LoRA checkpoint; set lora.rank=0 or use another workdir")
    if got["base_hash"] != base_hash:
      raise BaseMismatch(f"{where} holds adapters of the base {got['base_path'] or '(seeded random init)'!r} "
                         f"(content hash {got['base_hash'][:16]}…), but this run's base "
                         f"{base_path or '(seeded random init)'!r} hashes to {base_hash[:16]}…: the "
                         "adapters only apply to the base they were trained on")
    if list(got["targets"]) != list(self.targets) or int(got["config"]["rank"]) != int(self.cfg.rank):
      raise BaseMismatch(f"{where} holds rank-{got['config']['rank']} adapters of {got['targets']}, this run "
                         f"configures rank {self.cfg.rank} on {list(self.targets)}")


def plan_from_config(config: Any, model_cfg: MMaDAConfig) -> LoraPlan | None:
  """The run's :class:`LoraPlan`, or None when ``config.lora.rank`` is 0 (full fine-tuning)."""
  cfg = parse_lora(config.lora)
  return LoraPlan.create(cfg, model_cfg) if cfg.rank > 0 else None


# ---------------------------------------------------------------------- fingerprint

def _leaf_sums(x: jax.Array) -> jax.Array:
  """Two uint32 checksums of a leaf's bits: Σ bits and Σ bits·(2654435761·i + 1), both mod 2³²
  (exact integer sums: the same on every mesh and backend)."""
  bits = x.dtype.itemsize * 8 if x.dtype != jnp.int4 else 4
  if jnp.issubdtype(x.dtype, jnp.floating):
    u = jax.lax.bitcast_convert_type(x, {16: jnp.uint16, 32: jnp.uint32}[bits]).astype(jnp.uint32)
  else:
    u = x.astype(jnp.int32).astype(jnp.uint32)
  u = u.reshape(-1)
  idx = jax.lax.iota(jnp.uint32, u.shape[0])
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * (idx * jnp.uint32(2654435761) + 1), dtype=jnp.uint32)])


def fingerprint(params: Any) -> str:
  """Content hash (hex sha256) of a parameter pytree: every leaf's path, shape, dtype and two
  exact bit checksums computed on device (no host copy of the weights)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sums = jax.device_get(jax.jit(lambda xs: [_leaf_sums(x) for x in xs])([x for _, x in leaves]))
  h = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{jnp.dtype(x.dtype).name}|{int(s[0])}|{int(s[1])};"
             .encode())
  return h.hexdigest()


# ---------------------------------------------------------------------- export

def read_checkpoint_meta(path: str) -> tuple[str, dict]:
  """(step directory, its meta item) of a trainer workdir / checkpoints dir / step dir."""
  from mmada_jax.train.checkpointing import resolve_init_from
  kind, where = resolve_init_from(path)
  if kind != "train_step":
    raise ValueError(f"--merge-lora {path!r} is not a training workdir or checkpoint step")
  meta_file = os.path.join(where, "meta", "metadata")
  if not os.path.isfile(meta_file):
    raise FileNotFoundError(f"{where} has no meta item ({meta_file})")
  with open(meta_file) as f:
    return where, json.load(f)


def load_adapters(path: str, model_cfg: MMaDAConfig) -> tuple[LoraPlan, dict, dict]:
  """(plan, adapters as host arrays, the checkpoint's ``lora`` meta) of a LoRA training checkpoint."""
  from mmada_jax.train.checkpointing import load_init_params
  where, meta = read_checkpoint_meta(path)
  lm = meta.get("lora")
  if not lm:
    raise ValueError(f"{where} is not a LoRA checkpoint (its meta has no 'lora' entry)")
  plan = LoraPlan.create(LoraConfig(**lm["config"]), model_cfg)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), plan.abstract_adapters())
  adapters = load_init_params(where, model_cfg, abstract, None)
  return plan, adapters, lm


def merge_checkpoint(base: Any, model_cfg: MMaDAConfig, lora_path: str, *, check_hash: bool = True) -> Any:
  """``base`` params merged with the adapters of the LoRA checkpoint ``lora_path``; the base's
  content hash (in the training's base dtype) must match the checkpoint's."""
  plan, adapters, lm = load_adapters(lora_path, model_cfg)
  held = jax.tree.map(lambda x: jnp.asarray(x).astype(lm["base_dtype"]), base)
  if check_hash:
    got = fingerprint(held)
    if got != lm["base_hash"]:
      raise BaseMismatch(f"the base given hashes to {got[:16]}… but the adapters in {lora_path} were trained "
                         f"on {lm['base_path'] or '(seeded random init)'!r} (hash {lm['base_hash'][:16]}…)")
  merged = plan.merge(plan.quantize_base(held) if plan.qtype is not None else held, adapters)
  return jax.tree.map(lambda m, b: m.astype(jnp.asarray(b).dtype), merged, base)

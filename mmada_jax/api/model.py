"""``MMaDA``: the user-facing model object (checkpoint loading, validated inputs, jitted calls).

Holds an explicit parameter pytree, a static config and the checkpoint's generation config;
every computation is a pure jitted function of ``(params, inputs)``. The generation methods
(``generate_text``, ``answer``, ``generate_images``) come from ``mmada_jax.api.generation``.

dtypes follow Flax: ``param_dtype`` is the storage dtype of the parameters, ``dtype`` the compute
dtype of the matmuls (RMSNorm, RoPE, softmax and logits are always float32).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.api.generation import GenerationMixin
import mmada_jax.quant as quant
from mmada_jax.api.generation_config import GenerationConfig
from mmada_jax.checkpoint import generation_file, hf_mmada, orbax_io
from mmada_jax.model import transformer
from mmada_jax.model.config import MMaDAConfig, canonical_dtype
from mmada_jax.sampling.arguments import prng_key, renamed_kwargs
from mmada_jax.sharding.context import ShardingContext, use_sharding
from mmada_jax.sharding.rules import DEFAULT_RULES, shard_params
from mmada_jax.sharding.transfer import place_batch

FORMATS = ("orbax", "hf")


class MMaDA(GenerationMixin):
  """A loaded MMaDA model.

  Attributes:
    params: parameter pytree (see ``transformer`` for the layout).
    config: ``MMaDAConfig`` (static, hashable).
    generation_config: ``GenerationConfig``: prompt layout (``max_text_len``, ``num_vq_tokens``)
      and sampler defaults; derived (and logged) when none is given.
    mesh: optional ``jax.sharding.Mesh`` the parameters are sharded over.
    rules: the logical-axis rules used with ``mesh``.
    quantization: the ``quant.QuantSpec`` of weight-only quantized parameters (None: float).
  """

  def __init__(self, params: Any, config: MMaDAConfig, *, mesh: jax.sharding.Mesh | None = None,
               rules=None, hf_config: dict[str, Any] | None = None,
               generation_config: GenerationConfig | None = None):
    transformer.check_params(params, config)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
      raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
    self.config = config
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
    self.hf_config = dict(hf_config or {})
    self.params = params
    self.quantization = quant.quantization_of(params)
    self.generation_config = (generation_config if generation_config is not None
                              else GenerationConfig.derive(config, self.hf_config, where="this MMaDA model"))

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, param_dtype: str | None = None,
                      dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, rules=None,
                      generation_config: GenerationConfig | None = None, progress: bool = False,
                      quantize: str | None = None, quantize_lm_head: bool = False,
                      **overrides: Any) -> "MMaDA":
    """Loads an original Hugging Face-layout directory or an Orbax directory from the converter.

    Args:
      path: directory with config.json + model.safetensors (or shards + index), or one written
        by ``save_pretrained`` / ``python -m mmada_jax.convert``.
      param_dtype: parameter storage dtype ("float32", "bfloat16", "float16"); None keeps the
        stored dtype.
      dtype: compute dtype of the matmuls (default: ``param_dtype``); norms, RoPE, softmax and
        logits stay float32. NOTE: before this release ``dtype=`` meant the storage dtype; it now
        means compute, as in Flax (``compute_dtype=`` is its deprecated old name).
      mesh: shard parameters over this mesh by the logical-axis ``rules``.
      generation_config: overrides the checkpoint's saved one (default: ``generation_config.json``,
        else derived from config.json and logged).
      quantize: 'int8' | 'int4': weight-only PTQ of the attention and MLP projections
        (``mmada_jax.quant``), done on the host tensor by tensor while loading (each float
        tensor is quantized, placed and released; the float model never sits on a device). A
        quantized save loads as stored with None or its own qtype; another request is an error.
      quantize_lm_head: also quantize the LM head (the embedding is never quantized).
      overrides: ``MMaDAConfig`` fields, e.g. ``remat_policy="full"``, ``scan_layers=False``.
    """
    if "compute_dtype" in overrides:
      new = renamed_kwargs("MMaDA.from_pretrained", {"compute_dtype": overrides.pop("compute_dtype")},
                           {"compute_dtype": "dtype"}, current={"dtype": (dtype, None)})
      dtype = new["dtype"]
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"model directory not found: {path}")
    if dtype is not None:
      overrides["compute_dtype"] = canonical_dtype(dtype)
    pdt = None if param_dtype is None else canonical_dtype(param_dtype)
    if quantize is None and quantize_lm_head:
      raise ValueError("quantize_lm_head=True needs quantize='int8' or 'int4'")
    want = None if quantize is None else quant.QuantSpec.make(quantize, quantize_lm_head)
    is_orbax = orbax_io.is_orbax_model_dir(path)
    stored = orbax_io.stored_quantization(path) if is_orbax else None
    if stored is not None and want is not None and (want.qtype, want.lm_head) != (stored.qtype, stored.lm_head):
      raise ValueError(f"{path} holds a {stored.qtype}-quantized model (LM head "
                       f"{'quantized' if stored.lm_head else 'float'}); it cannot be loaded with "
                       f"quantize={quantize!r}, quantize_lm_head={quantize_lm_head}: pass quantize=None to "
                       f"load it as stored, or load the float checkpoint to quantize it differently")
    on_host = want is not None and stored is None     # quantize while loading: float weights stay on the host
    if is_orbax:
      params, cfg = orbax_io.load_params(path, pdt, mesh=mesh, rules=rules, host=on_host, **overrides)
    else:
      params, cfg = hf_mmada.load_hf_checkpoint(path, pdt, mesh=mesh, rules=rules, progress=progress,
                                                host=on_host, **overrides)
    if on_host:
      params = quant.quantize_and_place(params, cfg, want, mesh, rules)
    hf = hf_mmada.read_hf_config(path)
    if generation_config is None:
      section = generation_file.read_section(path)
      if section is not None:
        generation_config = GenerationConfig.from_dict(
            section, where=os.path.join(path, generation_file.FILE_NAME))
      else:
        generation_config = GenerationConfig.derive(cfg, hf, where=path)
    return cls(params, cfg, mesh=mesh, rules=rules, hf_config=hf, generation_config=generation_config)

  @classmethod
  def init(cls, config: MMaDAConfig, seed: int | jax.Array = 0, *, param_dtype: str | None = None,
           dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, rules=None,
           generation_config: GenerationConfig | None = None, **deprecated: Any) -> "MMaDA":
    """A randomly initialised model (for tests, benchmarks and training from scratch).

    ``seed``: int or jax PRNG key; ``param_dtype`` / ``dtype`` replace the config's storage /
    compute dtypes. Deprecated: ``key=`` (``seed``).
    """
    if deprecated:
      seed = renamed_kwargs("MMaDA.init", deprecated, {"key": "seed"}, current={"seed": (seed, 0)})["seed"]
    if param_dtype is not None:
      config = config.replace(param_dtype=canonical_dtype(param_dtype))
    if dtype is not None:
      config = config.replace(dtype=canonical_dtype(dtype))
    params = jax.jit(transformer.init_params, static_argnums=0)(config, prng_key(seed))
    if mesh is not None:
      params = shard_params(params, transformer.param_axes(config), mesh, rules)
    return cls(params, config, mesh=mesh, rules=rules, generation_config=generation_config)

  def quantize(self, qtype: str = "int8", *, lm_head: bool = False) -> "MMaDA":
    """A weight-only quantized copy ('int8' | 'int4'; ``lm_head``: the LM head too) on this
    model's mesh; ``self`` is unchanged. See ``MMaDA.from_pretrained(quantize=...)`` to quantize
    while loading (lower peak memory)."""
    if self.quantization is not None:
      raise ValueError(f"this model is already {self.quantization.qtype}-quantized")
    spec = quant.QuantSpec.make(qtype, lm_head)
    params = quant.quantize_params(self.params, self.config, spec,
                                   place=quant.placer(self.config, spec, self.mesh, self.rules))
    return type(self)(params, self.config, mesh=self.mesh, rules=self.rules, hf_config=self.hf_config,
                      generation_config=self.generation_config)

  def save_pretrained(self, path: str | os.PathLike, *, format: str = "orbax", param_dtype: str | None = None,
                      overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, tokenizer: Any = None,
                      image_tokenizer: Any = None, **deprecated: Any) -> None:
    """Writes the model with its ``generation_config.json``: ``format="orbax"`` (ours) or
    ``"hf"`` (the original's layout: safetensors and a config.json with every field the
    original's model classes read, ``hf_mmada.ORIGINAL_CONFIG_FIELDS``); ``param_dtype`` casts
    the stored parameters (default: as held). An existing non-empty ``path`` is refused unless
    ``overwrite``; nothing is left half-written.

    With ``format="hf"`` the folder can also hold the tokenizers, as the original's inference
    scripts expect: ``tokenizer`` (a ``TextTokenizer``) writes tokenizer.json,
    tokenizer_config.json (with the chat template) and special_tokens_map.json beside the
    weights; ``image_tokenizer`` (an ``ImageTokenizer``) writes ``image_tokenizer/``. Both are
    checked against the model (vocabulary room, EOS / mask ids, codebook size).
    Deprecated: ``dtype=`` (``param_dtype``; it always meant storage here)."""
    if deprecated:
      param_dtype = renamed_kwargs("MMaDA.save_pretrained", deprecated, {"dtype": "param_dtype"},
                                   current={"param_dtype": (param_dtype, None)})["param_dtype"]
    if format not in FORMATS:
      raise ValueError(f"unknown format {format!r}; use one of {FORMATS}")
    if format != "hf" and (tokenizer is not None or image_tokenizer is not None):
      raise ValueError("tokenizer= / image_tokenizer= are written with format='hf' only")
    if format == "hf" and self.quantization is not None:
      raise ValueError(f"this model is {self.quantization.qtype}-quantized: it saves in the orbax format only "
                       "(format='hf' is the original's float layout; export the float checkpoint instead)")
    path = os.fspath(path)
    gen = self.generation_config.to_dict()
    pdt = canonical_dtype(param_dtype or self.config.param_dtype)
    if format == "orbax":
      params = self.params
      if pdt != self.config.param_dtype:
        params = quant.cast_float(params, pdt)    # quantized leaves keep their qtype
      orbax_io.save_params(params, self.config.replace(param_dtype=pdt), path, hf_config=self.hf_config,
                           generation_config=gen, overwrite=overwrite)
    else:
      companions = []
      if tokenizer is not None:
        companions.append(tokenizer.save)
      if image_tokenizer is not None:
        companions.append(lambda d: image_tokenizer.save_pretrained(os.path.join(d, hf_mmada.IMAGE_TOKENIZER_DIR)))
      codebook = None if image_tokenizer is None else image_tokenizer.config.codebook_size
      hf_mmada.check_companions(self.config, tokenizer, codebook, where="MMaDA.save_pretrained")
      hf_mmada.export_pretrained(self.params, self.config, path, dtype=pdt, base_config=self.hf_config,
                                 generation_config=gen, companions=companions, max_shard_bytes=max_shard_bytes,
                                 overwrite=overwrite)

  # ------------------------------------------------------------------ properties
  @property
  def num_params(self) -> int:
    return quant.num_params(self.params)

  def param_summary(self) -> list[tuple[str, tuple[int, ...], str, tuple]]:
    """(path, shape, dtype, logical axes) for every parameter."""
    axes = transformer.param_axes(self.config)
    flat, _ = jax.tree_util.tree_flatten_with_path(self.params, is_leaf=quant.is_quantized)
    out = []
    for path, leaf in flat:
      keys = [p.key for p in path]
      ax = axes
      for k in keys:
        ax = ax[k]
      dt = str(leaf.qvalue.dtype) if quant.is_quantized(leaf) else str(leaf.dtype)
      out.append(("/".join(keys), tuple(leaf.shape), dt, ax))
    return out

  # ------------------------------------------------------------------ validation
  def check_ids(self, input_ids: Any, name: str = "input_ids") -> jax.Array:
    """Validates token ids: integer, rank 2, inside the vocabulary."""
    arr = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if arr.ndim != 2:
      raise ValueError(f"{name} must have rank 2 [batch, length], got shape {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    if arr.size:
      lo, hi = int(arr.min()), int(arr.max())
      if lo < 0 or hi >= self.config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains token id {bad} outside the vocabulary [0, {self.config.vocab_size})")
    return jnp.asarray(arr, jnp.int32)

  def _check_mask(self, attention_mask: Any, shape: tuple[int, int]) -> jax.Array | None:
    if attention_mask is None:
      return None
    m = np.asarray(attention_mask) if not isinstance(attention_mask, jax.Array) else attention_mask
    if tuple(m.shape) != shape:
      raise ValueError(f"attention_mask must have shape {shape} (like input_ids), got {tuple(m.shape)}")
    if not (jnp.issubdtype(m.dtype, jnp.integer) or m.dtype == bool):
      raise TypeError(f"attention_mask must be bool or 0/1 integers, got dtype {m.dtype}")
    if m.size and (int(m.min()) < 0 or int(m.max()) > 1):
      raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
    return jnp.asarray(m, jnp.int32)

  def _check_bias(self, attention_bias: Any, shape: tuple[int, int]) -> jax.Array | None:
    if attention_bias is None:
      return None
    bias = np.asarray(attention_bias) if not isinstance(attention_bias, jax.Array) else attention_bias
    b, l = shape
    if bias.ndim != 4 or bias.shape[0] not in (1, b) or bias.shape[1] != 1 or tuple(bias.shape[2:]) != (l, l):
      raise ValueError(f"attention_bias must have shape [{b}, 1, {l}, {l}], got {tuple(bias.shape)}")
    if bias.dtype == bool:
      return jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"attention_bias must be bool (allow-mask) or float (additive), got {bias.dtype}")
    return jnp.asarray(bias, jnp.float32)

  # ------------------------------------------------------------------ placement
  def _place_batch(self, x: jax.Array | None) -> jax.Array | None:
    return place_batch(x, ShardingContext(self.mesh, self.rules))

  @contextlib.contextmanager
  def _on_mesh(self, mesh: jax.sharding.Mesh | None = None
               ) -> Iterator[tuple[Any, Callable[[Any], Any]]]:
    """``(params, place)`` for running on ``mesh`` (default: the model's), with its sharding
    context installed; parameters are resharded onto a mesh other than the model's for the call."""
    if mesh is None or (self.mesh is not None and mesh == self.mesh):
      mesh, params = self.mesh, self.params
    else:
      params = shard_params(self.params, quant.param_axes(self.params, self.config), mesh, self.rules)
    if mesh is None:
      yield params, lambda x: x
      return
    ctx = ShardingContext(mesh, self.rules)
    with use_sharding(ctx):
      yield params, (self._place_batch if mesh == self.mesh else (lambda x: place_batch(x, ctx)))

  # ------------------------------------------------------------------ compute
  @functools.cached_property
  def _logits_fn(self):
    cfg = self.config

    def fn(params, ids, mask, bias):
      return transformer.forward(params, cfg, ids, attention_mask=mask, attention_bias=bias)
    return jax.jit(fn)

  def logits(self, input_ids: Any, attention_mask: Any = None, attention_bias: Any = None, *,
             mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Full-vocabulary logits, float32 [B, L, vocab_size].

    Args:
      input_ids: int [B, L] (numpy or jax).
      attention_mask: [B, L], 1 = token, 0 = padding: hard key-and-query padding mask (padded
        query rows get a uniform softmax, no NaN).
      attention_bias: [B, 1, L, L] bool allow-mask (True may attend) or float additive bias.
      mesh: run on this mesh (default: the model's).
    """
    ids = self.check_ids(input_ids)
    mask = self._check_mask(attention_mask, tuple(ids.shape))
    bias = self._check_bias(attention_bias, tuple(ids.shape))
    with self._on_mesh(mesh) as (params, place):
      return self._logits_fn(params, place(ids), place(mask), place(bias))

  def __repr__(self) -> str:
    c = self.config
    return (f"MMaDA(n_layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
            f"vocab={c.vocab_size}, params={self.num_params:,}, param_dtype={c.param_dtype}, dtype={c.dtype}"
            + (f", quantized={self.quantization.qtype}" if self.quantization is not None else "") + ")")

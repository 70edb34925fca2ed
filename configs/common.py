"""Config fragments shared by every experiment file (``get_config(arg)`` convention).

Each experiment file builds ``base_config()`` and changes only what differs. Sections:

* top level: ``seed``, ``steps`` (optimizer steps), ``log_every``, ``checkpoint_every`` (0 = only at
  the end), ``mesh_shape`` ("fsdp=4,tensor=2"; one axis may be -1), ``sharding_rules`` (overrides
  "logical=axis[+axis],...", "none" = replicated), ``init_from`` (params only: an original HF
  directory, an mmada_jax params directory, or a trainer workdir / step directory),
  ``data_source`` ('records' = the grain pipeline over ``data``; 'toy' = the built-in toy source),
  ``peak_flops_per_device`` (0 = look up by device kind), ``tensorboard``, ``progress_bar``.
* ``model``: MMaDAConfig fields (param_dtype = master-weight dtype, dtype = compute dtype).
* ``stage``: objective (see ``stage_config``). ``data``: ``mmada_jax.data.config``. ``toy``.
* ``optimizer``, ``checkpoint``, ``distributed``, ``sampling``.
"""
from __future__ import annotations

import ml_collections

from mmada_jax.data.config import default_data_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``"sft,steps=10,records"`` -> ConfigDict; bare words set True, the first bare word is also
  ``variant``. Values are cast to the type of the default."""
  out = ml_collections.ConfigDict(dict(defaults, variant=defaults.get("variant", "")))
  for i, part in enumerate([p for p in (arg or "").split(",") if p]):
    key, _, value = part.partition("=")
    if not _:
      if i == 0 and "variant" in defaults:
        out.variant = key
        continue
      value = "True"
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
    kind = type(out[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def model_config(**overrides) -> ml_collections.ConfigDict:
  """MMaDA-8B architecture (spec §1.2), fp32 master weights and bf16 compute."""
  m = ml_collections.ConfigDict(dict(
      vocab_size=134656, d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
      rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096, mask_token_id=126336,
      eos_token_id=126081, pad_token_id=126081, llm_vocab_size=126464, codebook_size=8192,
      num_vq_tokens=1024, param_dtype="float32", dtype="bfloat16", remat_policy="none",
      scan_layers=True, attention_impl="xla"))
  m.update(overrides)
  return m


def stage_config(**overrides) -> ml_collections.ConfigDict:
  """The mixed objective. ``name`` selects a registered stage ('pretrain', 'sft', …) and
  ``module`` is imported first (stages defined outside ``mmada_jax.train`` register there).

  coeff_*: loss weights. lm_format: 'lm' (pre-training formula Σ CE/p / (B·L)) or 'lm_chat'
  (prompt never noised, 1/(p·ans_len)). t2i_attention: 'hard' padding mask or the original's
  'original_additive' float bias (QUIRK). mask_schedule / min_masking_rate: image noising.
  text_eps: ε of p = (1-ε)t + ε. min_answer_length_lm: clamp of ans_len (stage 2.2: 1; 0 = off).
  logits_chunk: > 0 applies the LM head + cross-entropy to this many positions at a time (same
  loss, no full [B, L, V] float32 logits in memory); 0 = full logits.
  """
  s = ml_collections.ConfigDict(dict(
      name="pretrain", module="", coeff_t2i=1.0, coeff_lm=0.1, coeff_mmu=1.0, lm_format="lm",
      t2i_attention="hard", mask_schedule="cosine", min_masking_rate=0.0, text_eps=1e-3,
      min_answer_length_lm=0, logits_chunk=0))
  s.update(overrides)
  return s


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """AdamW + warm-up/cosine (spec §5). grad_accum: micro-batches per step (lax.scan).

  weight_decay_mask: 'all' (QUIRK, the original decays every parameter), 'matrices' (no decay on
  norms and the embedding) or 'none'. schedule_steps: cosine horizon (0 = ``steps``).
  honour_min_lr_scale: False reproduces the original (min_lr_scale ignored: cosine to 0).
  """
  o = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, weight_decay_mask="all",
      warmup_steps=5000, schedule_steps=0, min_lr_scale=0.1, honour_min_lr_scale=False,
      clip_grad_norm=1.0, grad_accum=1))
  o.update(overrides)
  return o


def checkpoint_config(**overrides) -> ml_collections.ConfigDict:
  """Orbax CheckpointManager policy: keep the newest ``max_to_keep`` (0 = all) plus every
  ``keep_period``-th step (0 = none); ``async_save`` writes in the background."""
  c = ml_collections.ConfigDict(dict(max_to_keep=3, keep_period=0, async_save=True))
  c.update(overrides)
  return c


def distributed_config() -> ml_collections.ConfigDict:
  """``mode``: auto (initialise on TPU pods / SLURM / MPI or with a coordinator), on, off.
  Explicit coordinator: ``coordinator_address`` host:port, ``num_processes``, ``process_id``
  (or MMADA_COORDINATOR_ADDRESS / MMADA_NUM_PROCESSES / MMADA_PROCESS_ID)."""
  return ml_collections.ConfigDict(dict(mode="auto", coordinator_address="", num_processes=0,
                                        process_id=-1, initialization_timeout=300))


def sampling_config(**overrides) -> ml_collections.ConfigDict:
  """Periodic samples (every ``every`` steps; 0 = off) written to WORKDIR/samples and TensorBoard.

  text_prompts / t2i_prompts: strings (tokenised with ``data.text_tokenizer``; the toy source
  uses its own prompts). image_tokenizer: MAGVIT-v2 directory to decode image tokens to pixels
  ("" = save a false-colour map of the code grid instead).
  """
  s = ml_collections.ConfigDict(dict(
      every=0, seed=0, text_prompts=["Describe a sunny day at the beach."],
      t2i_prompts=["A red bicycle leaning on a wall.", "A bowl of fruit."], gen_length=64,
      block_length=32, text_steps=64, temperature=0.0, t2i_timesteps=12, guidance_scale=3.0,
      t2i_temperature=1.0, image_tokenizer=""))
  s.update(overrides)
  return s


def toy_config(**overrides) -> ml_collections.ConfigDict:
  """The built-in toy source (``data_source='toy'``): codebook size, caption classes, and
  whether lm rows are chat-formatted (SFT)."""
  t = ml_collections.ConfigDict(dict(codebook_size=64, classes=8, chat_lm=False))
  t.update(overrides)
  return t


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 10086
  c.steps = 1000
  c.log_every = 10
  c.checkpoint_every = 1000
  c.mesh_shape = "fsdp=-1"
  c.sharding_rules = ""
  c.init_from = ""
  c.data_source = "records"
  c.peak_flops_per_device = 0.0
  c.tensorboard = True
  c.progress_bar = True
  c.model = model_config()
  c.stage = stage_config()
  c.data = default_data_config()
  c.toy = toy_config()
  c.optimizer = optimizer_config()
  c.checkpoint = checkpoint_config()
  c.distributed = distributed_config()
  c.sampling = sampling_config()
  return c


def rl_config() -> ml_collections.ConfigDict:
  """UniGRPO section (spec §8), read by the RL stage (``stage.name='unigrpo'``); every field and
  its default is defined by ``mmada_jax.rl.grpo.default_rl_config`` (see docs/unigrpo.md)."""
  from mmada_jax.rl.grpo import default_rl_config
  return default_rl_config()
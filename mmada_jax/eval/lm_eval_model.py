"""An lm-evaluation-harness model class for MMaDA, registered as ``mmada_jax``.

Importing this module registers the class (``lm_eval.api.registry.register_model``), so

    import mmada_jax.eval.lm_eval_model
    lm_eval.simple_evaluate(model="mmada_jax", model_args="pretrained=DIR,tokenizer=PATH,mc_num=128",
                            tasks=[...], batch_size=8)

works; from the command line ``python -m mmada_jax.eval.lm_eval_cli`` is lm-eval's own command
with the class registered (lm-eval's ``--include_path`` adds tasks, not models).

Requests:

* ``loglikelihood``: the Monte-Carlo estimate of :func:`mmada_jax.eval.likelihood.log_likelihood`
  of the continuation after ``BOS + context`` (``mc_num`` samples, ``mc_batch_size`` copies per
  forward pass, CFG weight ``cfg``); ``is_greedy``: the argmax of one pass with the whole
  continuation masked equals the continuation. Each request's seed is ``seed`` folded with a
  CRC32 of its text, so a result depends neither on the order nor on the batch of requests.
* ``loglikelihood_rolling``: the same bound on the whole text after BOS (empty context). A
  masked-diffusion model has no left-to-right factorisation, so the text is not cut into rolling
  windows: a text longer than the model's context is an error, not a sum of windows.
* ``generate_until``: the block sampler (``MMaDA.generate_from_ids``) after ``BOS + context``;
  ``gen_length`` = model_args ``gen_length``, else the request's ``max_gen_toks``, else the
  checkpoint's generation config; ``block_length`` (default: ``gen_length``) and ``steps``
  (default: ``gen_length``, one token per step) from model_args; ``temperature`` from the request
  (``do_sample=False`` → 0). The text is cut at EOS and at the first of the ``until`` strings.
  Prompts are batched ``batch_size`` at a time among prompts of equal length only
  (:mod:`mmada_jax.eval.batching`), so outputs do not depend on the batch size.

Chat templates (``simple_evaluate(..., apply_chat_template=True)`` / lm-eval's
``--apply_chat_template``): :meth:`MMaDALM.apply_chat_template` renders the conversation in the
project's LLaDA chat format (:data:`mmada_jax.prompting.text_tokenizer.CHAT_TEMPLATE`: BOS, then
``<|start_header_id|>role<|end_header_id|>\ncontent<|eot_id|>`` per turn and the assistant
header); a context that already begins with BOS is not given a second one. ``chat_template``
returns that Jinja template (the one template; lm-eval names it in its results) and
``tokenizer_name`` the tokenizer path (lm-eval's cache fingerprint).

model_args: ``pretrained`` (MMaDA directory), ``tokenizer`` (text tokenizer file or directory),
``mc_num`` (128), ``mc_batch_size`` (8), ``cfg`` (0.0), ``gen_length``, ``block_length``,
``steps``, ``cache`` (none|prefix|dual), ``threshold``, ``seed`` (0). lm-eval's ``batch_size``
is the number of prompts per sampler call ("auto" is refused); ``device`` / ``max_batch_size`` are
not used (JAX places the model on its default devices; lm-eval's command line always passes a
device).
"""
from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mmada_jax.eval import batching, likelihood
from mmada_jax.eval.runner import _split

NAME = "mmada_jax"


def _opt_int(v: Any, name: str) -> int | None:
  if v is None or v == "":
    return None
  try:
    out = int(v)
  except (TypeError, ValueError):
    raise ValueError(f"{NAME}: model_args {name}={v!r} is not an integer") from None
  if out < 1:
    raise ValueError(f"{NAME}: model_args {name}={out} must be >= 1")
  return out


def _cut(text: str, until: list[str]) -> str:
  """``text`` up to the first occurrence of any stop string."""
  cut = len(text)
  for s in until:
    if s:
      i = text.find(s)
      if i >= 0:
        cut = min(cut, i)
  return text[:cut]


@register_model(NAME)
class MMaDALM(LM):
  """``lm_eval`` model over an ``MMaDA`` checkpoint (module docstring for the request types)."""

  def __init__(self, pretrained: str = "", tokenizer: str = "", mc_num: int = 128, mc_batch_size: int = 8,
               cfg: float = 0.0, gen_length: int | None = None, block_length: int | None = None,
               steps: int | None = None, cache: str = "none", threshold: float | None = None, seed: int = 0,
               batch_size: int | str | None = 1, max_batch_size: int | None = None, device: str | None = None,
               model: Any = None, text_tokenizer: Any = None) -> None:
    super().__init__()
    del device, max_batch_size          # JAX places the model on its default devices (lm-eval's CLI sets cuda:0)
    if str(batch_size).startswith("auto"):
      raise ValueError(f"{NAME}: batch_size={batch_size!r}: give a number (prompts per sampler call)")
    self.batch_size = _opt_int(batch_size, "batch_size") or 1
    self.mc_num, self.mc_batch_size = int(mc_num), int(mc_batch_size)
    likelihood.mc_layout(self.mc_num, self.mc_batch_size)          # validates
    self.cfg, self.seed = float(cfg), int(seed)
    if self.cfg < 0:
      raise ValueError(f"{NAME}: cfg={self.cfg} must be >= 0")
    self.gen_length = _opt_int(gen_length, "gen_length")
    self.block_length = _opt_int(block_length, "block_length")
    self.steps = _opt_int(steps, "steps")
    if cache not in ("none", "prefix", "dual"):
      raise ValueError(f"{NAME}: cache={cache!r} is not one of none, prefix, dual")
    self.cache = cache
    self.threshold = None if threshold in (None, "") else float(threshold)
    if model is None:
      if not pretrained or not tokenizer:
        raise ValueError(f"{NAME}: model_args need pretrained=DIR and tokenizer=PATH")
      from mmada_jax.api.model import MMaDA
      model = MMaDA.from_pretrained(pretrained)
    if text_tokenizer is None:
      if not tokenizer:
        raise ValueError(f"{NAME}: model_args need tokenizer=PATH")
      from mmada_jax.prompting import TextTokenizer
      text_tokenizer = TextTokenizer.from_file(tokenizer)
    self.model, self.tokenizer = model, text_tokenizer
    self._tokenizer_path = str(tokenizer)
    from mmada_jax.prompting.special_tokens import SpecialTokens
    self.specials = SpecialTokens.from_tokenizer(text_tokenizer)

  # ------------------------------------------------------------------ chat template
  @property
  def tokenizer_name(self) -> str:
    """The tokenizer's path with ``/`` as ``__`` (lm-eval keys its request cache on it)."""
    return (self._tokenizer_path or type(self.tokenizer).__name__).replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    """The Jinja chat template (the project's LLaDA format); None when ``chat_template`` is
    False/None. A name other than ``"default"`` is refused: there is one template."""
    if chat_template is False or chat_template is None:
      return None
    if isinstance(chat_template, str) and chat_template not in ("default", "True", "true"):
      raise ValueError(f"{NAME}: chat template {chat_template!r} is not available; the model has one (\"default\")")
    from mmada_jax.prompting.text_tokenizer import CHAT_TEMPLATE
    return CHAT_TEMPLATE

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as prompt text in the chat format. ``add_generation_prompt=False``
    continues the last message (an assistant prefill): its closing ``<|eot_id|>`` is left off."""
    text = self.tokenizer.apply_chat_template(list(chat_history), add_generation_prompt=add_generation_prompt,
                                              tokenize=False)
    if not add_generation_prompt and chat_history:
      from mmada_jax.prompting.special_tokens import TOKEN_STRINGS
      text = text.removesuffix(TOKEN_STRINGS["eot_id"])
    return text

  def _context_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(BOS + context ids, continuation ids)``; a context rendered by the chat template keeps its own BOS."""
    ctx, cont = _split(self.tokenizer, context, continuation)
    if ctx[:1] == [self.specials.bos]:
      ctx = ctx[1:]
    return [self.specials.bos] + ctx, cont

  # ------------------------------------------------------------------ likelihood
  def _key(self, *texts: str) -> jax.Array:
    h = zlib.crc32("\x00".join(texts).encode("utf-8"))
    return jax.random.fold_in(jax.random.key(self.seed), h & 0x7FFFFFFF)

  def _greedy(self, ctx: list[int], cont: list[int]) -> bool:
    seq = np.asarray([ctx + [self.model.config.mask_token_id] * len(cont)], np.int32)
    logits = np.asarray(self.model.logits(seq))[0, len(ctx):]
    return bool(np.array_equal(logits.argmax(-1), np.asarray(cont)))

  def _score(self, ctx: list[int], cont: list[int], *texts: str) -> tuple[float, bool]:
    est = likelihood.log_likelihood(self.model, ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                    guidance_scale=self.cfg, seed=self._key(*texts))
    return est.log_likelihood, self._greedy(ctx, cont)

  def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    out = []
    for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
      context, continuation = req.args
      ctx, cont = self._context_ids(context, continuation)
      if not cont:
        raise ValueError(f"{NAME}: continuation {continuation!r} has no tokens")
      res = self._score(ctx, cont, context, continuation)
      out.append(res)
      self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
    return out

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    out = []
    limit = self.model.config.max_sequence_length
    for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
      (text,) = req.args
      ids = self.tokenizer.encode(text, add_special_tokens=False)
      if not ids:
        raise ValueError(f"{NAME}: loglikelihood_rolling of an empty text")
      if len(ids) + 1 > limit:
        raise ValueError(f"{NAME}: loglikelihood_rolling: the text has {len(ids)} tokens + BOS, more than the "
                         f"model's max_sequence_length {limit}; a masked-diffusion model's likelihood does not "
                         f"factor into rolling windows")
      ll = likelihood.log_likelihood(self.model, [self.specials.bos], ids, mc_num=self.mc_num,
                                     batch_size=self.mc_batch_size, guidance_scale=0.0,
                                     seed=self._key(text)).log_likelihood
      out.append(ll)
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
    return out

  # ------------------------------------------------------------------ generation
  def _sampler_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(gen_kwargs)
    kw.pop("until", None)
    max_toks = kw.pop("max_gen_toks", None)
    do_sample = kw.pop("do_sample", False)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not do_sample:
      temperature = 0.0
    if kw:
      raise ValueError(f"{NAME}: unsupported generation kwargs {sorted(kw)} (supported: until, max_gen_toks, "
                       f"do_sample, temperature)")
    gen = self.gen_length or _opt_int(max_toks, "max_gen_toks") or int(self.model.generation_config.gen_length)
    out = dict(gen_length=gen, block_length=self.block_length or gen, steps=self.steps or gen,
               temperature=temperature, seed=self.seed)
    if self.cfg > 0:
      out["guidance_scale"] = self.cfg
    if self.cache != "none":
      out["cache"] = self.cache
    if self.threshold is not None:
      out["threshold"] = self.threshold
    return out

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    groups: dict[str, list[int]] = {}
    settings: dict[str, dict[str, Any]] = {}
    untils: list[list[str]] = []
    for i, req in enumerate(requests):
      _, gen_kwargs = req.args
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      untils.append(until)
      kw = self._sampler_kwargs(gen_kwargs)
      key = repr(sorted(kw.items()))
      settings[key] = kw
      groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
    for key, idx in groups.items():
      ids = [batching.prompt_ids(self.tokenizer, requests[i].args[0], chat=False) for i in idx]
      tokens = batching.generate_unpadded(self.model, ids, batch_size=self.batch_size, **settings[key])
      for i, text in zip(idx, batching.decode(self.model, self.tokenizer, tokens)):
        out[i] = _cut(text, untils[i])
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
      bar.update(len(idx))
    bar.close()
    return out

"""Parity check against the original implementation's recorded outputs.

  python -m mmada_jax.parity DIR [DIR ...] [--json]

DIR is a fixture folder: an MMaDA one (config.json with ``model_type: mmada`` + model.safetensors
+ cases.npz with any of the cases ``logits``, ``losses``, ``text_gen``, ``t2i_gen``) or a MAGVIT-v2
one (config.json with encoder/decoder settings + pytorch_model.safetensors + cases.npz with case
``magvit``), of any configuration, or a folder of such folders (each one is checked). Every
case found is run and its error printed; the exit status is 0 only if every case matches
(floats within tolerance, integers exactly) and at least one ran.
The sampler cases replay the recorded noise through ``mmada_jax.parity.replay``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

LOGITS_TOL = 1e-4      # logits / logsumexp / hidden states (float32 end to end)
LOSS_RTOL = 1e-5       # the original reproduces its own losses to 1e-5
MAGVIT_LATENT_TOL = 1e-4
MAGVIT_DECODE_TOL = 2e-4


@dataclasses.dataclass
class CaseResult:
  name: str
  ok: bool
  error: float | None = None      # max abs (or relative, for losses) error; None for exact checks
  tolerance: float | None = None
  detail: str = ""
  seconds: float = 0.0


def _max_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return float("inf")
  return float(np.abs(got - want).max()) if got.size else 0.0


def _timed(fn: Callable[[], CaseResult]) -> CaseResult:
  t0 = time.perf_counter()
  try:
    res = fn()
  except Exception as e:  # a crash in one case is a failed case, not a crashed command
    res = CaseResult(name=getattr(fn, "case_name", "?"), ok=False, detail=f"{type(e).__name__}: {e}")
  res.seconds = time.perf_counter() - t0
  return res


def _case(name: str):
  def deco(fn):
    fn.case_name = name
    return fn
  return deco


def detect_kind(path: str) -> str:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (not a fixture folder)")
  if not os.path.isfile(os.path.join(path, "cases.npz")):
    raise FileNotFoundError(f"{path}: no cases.npz (not a fixture folder)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if cfg.get("model_type") in ("mmada", "llada") or "d_model" in cfg:
    return "mmada"
  if "encoder_config" in cfg or "MAGVIT" in str(cfg.get("_class_name", "")).upper():
    return "magvit"
  raise ValueError(f"{cfg_path}: neither an MMaDA nor a MAGVIT-v2 config")


# ------------------------------------------------------------------------------------ MMaDA
def check_mmada(path: str) -> list[CaseResult]:
  import jax
  import jax.numpy as jnp
  from mmada_jax.checkpoint.hf_mmada import load_hf_checkpoint
  from mmada_jax.model import transformer
  from mmada_jax.parity import replay

  params, cfg = load_hf_checkpoint(path, dtype="float32")
  cases = replay.load_cases(os.path.join(path, "cases.npz"))
  results: list[CaseResult] = []
  fwd = jax.jit(lambda p, ids, bias: transformer.forward(p, cfg, ids, attention_bias=bias,
                                                         output_hidden_states=True))

  variants = sorted({k.split("/")[-1].split(".")[0] for k in cases
                     if k.startswith("logits/out/") and k.endswith(".logits_cols")})
  for variant in variants:
    @_case(f"logits/{variant}")
    def run(variant=variant):
      out = lambda n: cases[f"logits/out/{variant}.{n}"]  # noqa: E731
      bias_key = f"logits/out/{variant}.attention_bias"
      bias = jnp.asarray(cases[bias_key]) if bias_key in cases else None
      logits, hidden = fwd(params, jnp.asarray(cases["logits/in/input_ids"], jnp.int32), bias)
      logits = np.asarray(logits)
      errs = {"logits_cols": _max_err(logits[..., cases["logits_columns"]], out("logits_cols")),
              "logsumexp": _max_err(jax.nn.logsumexp(logits, -1), out("logsumexp")),
              "max": _max_err(logits.max(-1), out("max"))}
      if f"logits/out/{variant}.hidden_states" in cases:
        errs["hidden_states"] = _max_err(hidden, out("hidden_states"))
      if f"logits/out/{variant}.logits_full_pos0to1" in cases:
        errs["logits_full_pos0to1"] = _max_err(logits[:, :2], out("logits_full_pos0to1"))
      argmax_bad = int((logits.argmax(-1) != out("argmax")).sum())
      worst = max(errs, key=errs.get)
      ok = errs[worst] <= LOGITS_TOL and argmax_bad == 0
      return CaseResult(f"logits/{variant}", ok, errs[worst], LOGITS_TOL,
                        f"worst={worst}, argmax mismatches={argmax_bad}")
    results.append(_timed(run))

  if "losses/in/input_ids" in cases:
    results.extend(_check_losses(params, cfg, cases))

  text_names, t2i_names = replay.discover_settings(cases)
  for name in text_names:
    @_case(f"text_gen/{name}")
    def run(name=name):
      problems = replay.compare(replay.run_text_setting(params, cfg, cases, name), cases, f"text_gen/out/{name}")
      return CaseResult(f"text_gen/{name}", not problems, None, None, "; ".join(problems) or "tokens exact")
    results.append(_timed(run))
  for name in t2i_names:
    @_case(f"t2i_gen/{name}")
    def run(name=name):
      problems = replay.compare(replay.run_t2i_setting(params, cfg, cases, name), cases, f"t2i_gen/out/{name}")
      return CaseResult(f"t2i_gen/{name}", not problems, None, None, "; ".join(problems) or "tokens exact")
    results.append(_timed(run))
  return results


def _check_losses(params: Any, cfg: Any, cases: Mapping[str, np.ndarray]) -> list[CaseResult]:
  import jax.numpy as jnp
  from mmada_jax.diffusion import LossCoefficients, mixed_loss
  from mmada_jax.model import transformer
  from mmada_jax.prompting import training_attention_bias

  c = {k[len("losses/"):]: v for k, v in cases.items() if k.startswith("losses/")}
  sizes = tuple(int(x) for x in c["in/batch_sizes"])
  out = []
  for chat in (False, True):
    sfx = "_chat" if chat else ""
    if "in/input_ids" + sfx not in c:
      continue
    name = "losses/lm_chat" if chat else "losses/lm"

    @_case(name)
    def run(chat=chat, sfx=sfx, name=name):
      batch = {"input_ids": c["in/input_ids" + sfx], "labels": c["in/labels" + sfx],
               "p_mask_lm": c["in/p_mask_lm_chat" if chat else "in/p_mask_lm"],
               "p_mask_mmu": c["in/p_mask_mmu"], "answer_lengths": c["in/answer_lengths"]}
      if chat:
        batch["answer_lengths_lm"] = c["in/answer_lengths_lm"]
      b, length = batch["input_ids"].shape
      masks = np.concatenate([c["in/t2i_masks"], np.ones((b - sizes[0], length), np.int64)])
      # The training forward's float additive bias, as the original builds it.
      bias = training_attention_bias(masks, sizes[0], mode="original_additive")
      logits = transformer.forward(params, cfg, jnp.asarray(batch["input_ids"], jnp.int32), attention_bias=bias)
      _, parts = mixed_loss(logits, batch, batch_sizes=sizes, max_text_len=int(c["in/max_seq_length"]),
                            mask_id=cfg.mask_token_id, coeffs=LossCoefficients(1.0, 1.0, 1.0))
      pre, lm_key = ("chat.", "loss_lm_chat") if chat else ("", "loss_lm")
      want = {"loss_t2i": c[f"out/{pre}loss_t2i"], "loss_lm": c[f"out/{pre}{lm_key}"],
              "loss_mmu": c[f"out/{pre}loss_mmu"]}
      rel = {k: abs(float(parts[k]) - float(v)) / max(abs(float(v)), 1e-12) for k, v in want.items()}
      worst = max(rel, key=rel.get)
      detail = ", ".join(f"{k}={float(parts[k]):.6g} (ref {float(want[k]):.6g})" for k in want)
      return CaseResult(name, rel[worst] <= LOSS_RTOL, rel[worst], LOSS_RTOL, "relative; " + detail)
    out.append(_timed(run))
  return out


# ------------------------------------------------------------------------------------ MAGVIT
def check_magvit(path: str) -> list[CaseResult]:
  import jax.numpy as jnp
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.image_tokenizer import lfq

  tok = ImageTokenizer.from_pretrained(path)
  with np.load(os.path.join(path, "cases.npz")) as f:
    c = {k[len("magvit/"):]: f[k] for k in f.files if k.startswith("magvit/")}
  if not c:
    return []
  nhwc = lambda x: np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))  # noqa: E731
  bits = tok.config.codebook_dim
  results = []

  @_case("magvit/encode")
  def encode():
    x = nhwc(c["in/images"])
    latent = np.asarray(tok.encode_latent(x))
    ref = nhwc(c["out/latent"])
    err = _max_err(latent, ref)
    codes = np.asarray(tok.encode(x))
    got_bits = np.asarray(lfq.code_to_bits(jnp.asarray(codes), bits)).reshape(ref.shape) > 0
    safe = np.abs(ref) > MAGVIT_LATENT_TOL
    bit_bad = int((got_bits[safe] != (ref > 0)[safe]).sum())
    code_bad = int((codes != c["out/codes"]).sum())
    # A code may differ only through a bit whose reference latent is within tolerance of 0.
    ok = err <= MAGVIT_LATENT_TOL and bit_bad == 0
    return CaseResult("magvit/encode", ok, err, MAGVIT_LATENT_TOL,
                      f"latent; sign bits wrong where |latent|>{MAGVIT_LATENT_TOL}: {bit_bad}; "
                      f"codes differing: {code_bad} (only near-zero latents may differ)")
  results.append(_timed(encode))

  for codes_key, out_key in (("out/codes", "out/decoded"), ("in/random_indices", "out/decoded_random")):
    if out_key not in c:
      continue
    name = "magvit/" + out_key.split("/")[1]

    @_case(name)
    def decode(codes_key=codes_key, out_key=out_key, name=name):
      got = np.asarray(tok.decode(c[codes_key]))
      err = _max_err(got, nhwc(c[out_key]))
      return CaseResult(name, err <= MAGVIT_DECODE_TOL, err, MAGVIT_DECODE_TOL)
    results.append(_timed(decode))

  @_case("magvit/quantizer")
  def quantizer():
    ref = jnp.asarray(nhwc(c["out/latent"]))
    grid = tuple(ref.shape[1:3])
    exact = [np.array_equal(np.asarray(lfq.quantize(ref)), nhwc(c["out/z_q"])),
             np.array_equal(np.asarray(lfq.codes_to_latent(jnp.asarray(c["out/codes"]), bits, grid)),
                            nhwc(c["out/z_q_from_codes"]))]
    losses = lfq.lfq_losses(ref)
    err = max(abs(float(losses["quantizer_loss"]) - float(c["out/quantizer_loss"])),
              abs(float(losses["entropy_loss"]) - float(c["out/entropy_loss"])))
    return CaseResult("magvit/quantizer", all(exact) and err <= MAGVIT_LATENT_TOL, err, MAGVIT_LATENT_TOL,
                      f"z_q exact={exact[0]}, codebook lookup exact={exact[1]}; error = LFQ losses")
  results.append(_timed(quantizer))
  return results


def expand_dirs(path: str) -> list[str]:
  """``[path]`` for a fixture folder; for a folder without config.json, its subfolders that hold
  config.json + cases.npz (sorted); otherwise ``[path]`` (reported as not a fixture folder)."""
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    subs = sorted(os.path.join(path, n) for n in os.listdir(path)
                  if os.path.isfile(os.path.join(path, n, "config.json"))
                  and os.path.isfile(os.path.join(path, n, "cases.npz")))
    if subs:
      return subs
  return [path]


def run_folder(path: str) -> list[CaseResult]:
  kind = detect_kind(path)
  return check_mmada(path) if kind == "mmada" else check_magvit(path)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.parity", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dirs", nargs="+", help="fixture folders (or folders of fixture folders)")
  p.add_argument("--json", action="store_true", help="print one JSON line per case")
  args = p.parse_args(argv)
  all_ok, n = True, 0
  for d in [f for d in args.dirs for f in expand_dirs(d)]:
    try:
      results = run_folder(d)
    except Exception as e:
      print(f"{d}: error: {e}", file=sys.stderr)
      all_ok = False
      continue
    print(f"== {d}")
    for r in results:
      n += 1
      all_ok &= r.ok
      if args.json:
        print(json.dumps({"dir": d, **dataclasses.asdict(r)}))
      else:
        err = "exact" if r.error is None else f"{r.error:.3e} (tol {r.tolerance:.0e})"
        print(f"  {'PASS' if r.ok else 'FAIL'}  {r.name:40s} {err:26s} {r.seconds:6.2f}s  {r.detail}")
  if n == 0:
    print("no cases found", file=sys.stderr)
    return 1
  print(f"all {n} cases match" if all_ok else f"parity FAILED ({n} cases run)")
  return 0 if all_ok else 1

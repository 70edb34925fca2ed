"""Human-readable lines of an AOT report (:func:`mmada_jax.aot.estimate.estimate`'s dict)."""
from __future__ import annotations

from typing import Any, Mapping

from mmada_jax.aot.topology import GIB


def _oom_line(r: Mapping[str, Any]) -> str:
  """The report line of a program that XLA could not fit in HBM."""
  used = r.get("hbm_per_chip_bytes")
  return ("does NOT fit: XLA could not compile it in HBM"
          + (f" (used {used / GIB:.2f} GiB of {r['hbm_capacity_bytes'] / GIB:.2f} GiB)" if used else "")
          + f": {r.get('compile_error', '')}")


def format_report(r: Mapping[str, Any]) -> str:
  """Human-readable lines of an :func:`estimate` report."""
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"topology {r['topology']}: {r['chips']} chips ({r['device_kind']}, {r['hbm_capacity_bytes'] / GIB:.1f} GiB HBM, "
      f"{r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 each); mesh {mesh}"
      + (f"; rules {r['sharding_rules']}" if r["sharding_rules"] else ""),
      f"stage {r['stage']}: {r['rows_per_step']} rows × {r['seq_len']} tokens per step, grad_accum {r['grad_accum']} "
      f"→ {r['rows_per_shard_micro']:g} rows per data shard per micro-batch; remat {r['remat_policy']}, "
      f"{'scanned' if r['scan_layers'] else 'unrolled'} layers, logits "
      + (f"at the {r['logit_positions']} response positions" if r["logit_positions"] != r["seq_len"]
         else f"in chunks of {r['logits_chunk']}" if r["logits_chunk"] else "full [B, L, V]"),
  ]
  if r.get("memory") is None:
    return "\n".join(lines + [_oom_line(r)])
  m = r["memory"]
  lines.append(
      f"HBM per chip (arguments + outputs + temps − aliased): {r['hbm_per_chip_bytes'] / GIB:.2f} GiB of "
      f"{r['hbm_capacity_bytes'] / GIB:.1f} GiB ({100 * r['hbm_headroom']:.0f}% free) → "
      f"{'fits' if r['fits'] else 'does NOT fit'}")
  lines.append("  " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in m.items()))
  lines.append(f"FLOPs per step: analytical {r['step_flops']:.3e} (6·N_matmul·tokens + attention)"
               + (f", XLA {r['xla_step_flops']:.3e} (all chips, loops scaled, remat recompute included)"
                  if r.get("xla_step_flops") else ""))
  if r.get("cost_model_note"):
    lines.append(r["cost_model_note"])
  if r.get("roofline_step_seconds"):
    lines.append(f"roofline of XLA's totals (max of FLOPs/peak, bytes/HBM bandwidth): {r['roofline_step_seconds']:.3f} s, "
                 f"a lower bound → MFU ≤ {100 * r['roofline_mfu_bound']:.1f}%")
  if r.get("estimated_step_seconds"):
    lines.append(f"XLA cost-model step time {r['estimated_step_seconds']:.3f} s (an optimistic bound, not a "
                 f"measurement) → estimated MFU {100 * r['estimated_mfu']:.1f}%, "
                 f"{r['estimated_tokens_per_second']:.3g} tokens/s")
  return "\n".join(lines)


def format_sampler_report(r: Mapping[str, Any]) -> str:
  """Human-readable lines of an :func:`~mmada_jax.aot.estimate.estimate_sampler` report."""
  s = r["shapes"]
  what = (f"prompt {s['prompt_len']} + gen {s['gen_length']} tokens, block {s['block_length']}, "
          f"{s['steps']} steps, {s['cache']} cache" if r["program"] == "text_sampler" else
          f"{s['text_len']} text + {s['image_tokens']} image tokens, {s['t2i_steps']} steps"
          + (", CFG (2 rows per image)" if s["cfg"] else ""))
  lines = [f"topology {r['topology']}: {r['chips']} chips ({r['device_kind']}, {r['hbm_capacity_bytes'] / GIB:.1f} "
           f"GiB HBM); {r['program']} batch {s['batch']}: {what}; weights "
           f"{'bfloat16' if r['quantize'] == 'none' else r['quantize'] + ' (weight-only)'}, "
           f"{r['param_bytes'] / GIB:.2f} GiB"]
  if r.get("memory") is None:
    return "\n".join(lines + [_oom_line(r)])
  lines.append(f"HBM per chip (arguments + outputs + temps − aliased): {r['hbm_per_chip_bytes'] / GIB:.2f} GiB of "
               f"{r['hbm_capacity_bytes'] / GIB:.1f} GiB ({100 * r['hbm_headroom']:.0f}% free) → "
               f"{'fits' if r['fits'] else 'does NOT fit'}")
  lines.append("  " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in r["memory"].items()))
  return "\n".join(lines)

"""Replays the reference fixtures' ``text_gen`` and ``t2i_gen`` settings with their recorded noise.

Used by the sampler tests and by the parity command. Each ``run_*`` returns the sampler's outputs
as numpy arrays under the fixture's output names; ``compare`` lists the mismatches.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from mmada_jax.model import MMaDAConfig
from mmada_jax.sampling.t2i import generate_image_tokens
from mmada_jax.sampling.text import generate_text


@dataclasses.dataclass(frozen=True)
class TextSetting:
  prompt: str                # key under text_gen/in/
  steps: int
  gen_length: int
  block_length: int
  cfg_scale: float = 0.0
  remasking: str = "low_confidence"
  padded: bool = False       # uses <name>.attention_mask
  random_tape: bool = False  # uses <name>.torch_rand


@dataclasses.dataclass(frozen=True)
class T2ISetting:
  guidance_scale: float
  timesteps: int
  temperature: float


# The fixture README's settings tables (inputs of the recorded runs, not results).
TEXT_SETTINGS: dict[str, TextSetting] = {
    "g8_b8_s8": TextSetting("prompt", 8, 8, 8),
    "g12_b12_s6": TextSetting("prompt", 6, 12, 12),
    "g16_b8_s4": TextSetting("prompt", 4, 16, 8),
    "g10_b5_s4": TextSetting("prompt", 4, 10, 5),
    "g8_b8_s4_cfg1": TextSetting("prompt", 4, 8, 8, cfg_scale=1.0),
    "g8_b4_s4_padded": TextSetting("prompt_padded", 4, 8, 4, padded=True),
    "mmu_g8_b4_s4": TextSetting("prompt_mmu", 4, 8, 4),
    "mmu_g8_b8_s4_fn_generate": TextSetting("prompt_mmu", 4, 8, 8),
    "g8_b4_s4_random": TextSetting("prompt", 4, 8, 4, remasking="random", random_tape=True),
}

T2I_SETTINGS: dict[str, T2ISetting] = {
    "cfg0_t4": T2ISetting(0.0, 4, 1.0),
    "cfg2_t6": T2ISetting(2.0, 6, 1.0),
    "cfg0_t3_temp0": T2ISetting(0.0, 3, 0.0),
}


def load_cases(path: str) -> dict[str, np.ndarray]:
  """Loads a ``cases.npz`` into a dict of numpy arrays."""
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def run_text_setting(params: Any, cfg: MMaDAConfig, cases: Mapping[str, np.ndarray], name: str
                     ) -> dict[str, np.ndarray]:
  """Runs ``text_gen`` setting ``name``; returns {'output' [B, P+G], 'trajectory' [T, B|2B, P+G]}."""
  s = TEXT_SETTINGS[name]
  out = f"text_gen/out/{name}"
  sample = generate_text(
      params, cfg, cases[f"text_gen/in/{s.prompt}"], gen_length=s.gen_length,
      block_length=s.block_length, steps=s.steps, cfg_scale=s.cfg_scale, remasking=s.remasking,
      attention_mask=cases[f"{out}.attention_mask"] if s.padded else None,
      rand_tape=cases[f"{out}.torch_rand"] if s.random_tape else None, return_trajectory=True)
  return {"output": np.asarray(sample.tokens), "trajectory": np.asarray(sample.trajectory)}


def run_t2i_setting(params: Any, cfg: MMaDAConfig, cases: Mapping[str, np.ndarray], name: str
                    ) -> dict[str, np.ndarray]:
  """Runs ``t2i_gen`` setting ``name`` with its tapes; returns sampled_ids, final_input_ids, trajectory.

  The fixtures use resolution R = S, so the original's uncond prefix R + 1 is S + 1.
  """
  s = T2I_SETTINGS[name]
  inp, out = "t2i_gen/in", f"t2i_gen/out/{name}"
  use_cfg = s.guidance_scale > 0
  sample = generate_image_tokens(
      params, cfg, cases[f"{inp}/input_ids"], attention_mask=cases[f"{inp}/attention_mask"],
      uncond_input_ids=cases[f"{inp}/uncond_input_ids"] if use_cfg else None,
      uncond_attention_mask=cases[f"{inp}/uncond_attention_mask"] if use_cfg else None,
      timesteps=s.timesteps, guidance_scale=s.guidance_scale, temperature=s.temperature,
      noise_schedule="cosine", num_vq_tokens=int(cases[f"{inp}/num_vq_tokens"]),
      uncond_prefix_len=int(cases[f"{inp}/max_text_len"]) + 1, compound_temperature=True,
      multinomial_tape=cases[f"{out}.multinomial"], gumbel_tape=cases[f"{out}.gumbel"],
      return_trajectory=True)
  return {"sampled_ids": np.asarray(sample.codes), "final_input_ids": np.asarray(sample.input_ids),
          "trajectory": np.asarray(sample.trajectory)}


def compare(got: Mapping[str, np.ndarray], cases: Mapping[str, np.ndarray], prefix: str) -> list[str]:
  """Mismatch descriptions of ``got`` against ``cases[prefix + '.' + key]`` (integers, exact)."""
  problems = []
  for k, v in got.items():
    want = cases[f"{prefix}.{k}"]
    if v.shape != want.shape:
      problems.append(f"{prefix}.{k}: shape {v.shape} != {want.shape}")
      continue
    bad = np.argwhere(v != want)
    if bad.size:
      problems.append(f"{prefix}.{k}: {len(bad)} of {v.size} entries differ, first at {tuple(bad[0])}: "
                      f"{v[tuple(bad[0])]} != {want[tuple(bad[0])]}")
  return problems


def replay_all(params: Any, cfg: MMaDAConfig, cases: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
  """Every text_gen and t2i_gen setting -> its list of mismatches (empty = exact)."""
  report = {}
  for name in TEXT_SETTINGS:
    report[f"text_gen/{name}"] = compare(run_text_setting(params, cfg, cases, name), cases, f"text_gen/out/{name}")
  for name in T2I_SETTINGS:
    report[f"t2i_gen/{name}"] = compare(run_t2i_setting(params, cfg, cases, name), cases, f"t2i_gen/out/{name}")
  return report

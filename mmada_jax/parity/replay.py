"""Replays the reference fixtures' ``text_gen`` and ``t2i_gen`` settings with their recorded noise.

Used by the parity command and the sampler tests. The recorded noise (uniform remasking scores,
Gumbel noise, multinomial draws) enters through the samplers' internal entries
(``sampling.text._generate_text``, ``sampling.t2i._generate_image_tokens``); the public samplers
take only a seed. Each ``run_*`` returns the sampler's outputs as numpy arrays under the
fixture's output names; ``compare`` lists the mismatches.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from mmada_jax.model import MMaDAConfig
from mmada_jax.sampling.t2i import _generate_image_tokens
from mmada_jax.sampling.text import _generate_text


@dataclasses.dataclass(frozen=True)
class TextSetting:
  prompt: str                # key under text_gen/in/
  steps: int
  gen_length: int
  block_length: int
  guidance_scale: float = 0.0
  remasking: str = "low_confidence"
  padded: bool = False       # uses <name>.attention_mask
  random_tape: bool = False  # uses <name>.torch_rand


@dataclasses.dataclass(frozen=True)
class T2ISetting:
  guidance_scale: float
  steps: int
  temperature: float


# The fixture README's settings tables (inputs of the recorded runs, not results).
TEXT_SETTINGS: dict[str, TextSetting] = {
    "g8_b8_s8": TextSetting("prompt", 8, 8, 8),
    "g12_b12_s6": TextSetting("prompt", 6, 12, 12),
    "g16_b8_s4": TextSetting("prompt", 4, 16, 8),
    "g10_b5_s4": TextSetting("prompt", 4, 10, 5),
    "g8_b8_s4_cfg1": TextSetting("prompt", 4, 8, 8, guidance_scale=1.0),
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


_NUM = r"(\d+(?:[.p]\d+)?)"
_TEXT_RE = re.compile(rf"^(?P<mmu>mmu_)?g(?P<g>\d+)_b(?P<b>\d+)_s(?P<s>\d+)(?:_cfg(?P<cfg>{_NUM}))?")
_T2I_RE = re.compile(rf"^cfg(?P<cfg>{_NUM})_t(?P<t>\d+)(?:_temp(?P<temp>{_NUM}))?")


def _num(text: str | None, default: float) -> float:
  return default if text is None else float(text.replace("p", "."))


def text_setting(name: str, cases: Mapping[str, np.ndarray]) -> TextSetting:
  """The settings of a recorded ``text_gen`` run, read from its name and arrays.

  Names follow ``[mmu_]g{gen}_b{block}_s{steps}[_cfg{w}][...]``; the prompt, padding mask and
  random-remasking tape are recognised by the arrays present, and lengths are checked against
  the recorded output, so settings beyond the documented table replay too.
  """
  out = f"text_gen/out/{name}"
  m = _TEXT_RE.match(name)
  if m is None:
    if name in TEXT_SETTINGS:
      return TEXT_SETTINGS[name]
    raise ValueError(f"text_gen setting {name!r}: cannot read gen/block/steps from its name")
  padded = f"{out}.attention_mask" in cases
  random_tape = f"{out}.torch_rand" in cases
  prompt = "prompt_mmu" if m.group("mmu") or "_mmu" in name else ("prompt_padded" if padded else "prompt")
  if f"text_gen/in/{prompt}" not in cases:
    raise ValueError(f"text_gen setting {name!r}: input text_gen/in/{prompt} is missing")
  setting = TextSetting(prompt, int(m.group("s")), int(m.group("g")), int(m.group("b")),
                        guidance_scale=_num(m.group("cfg"), 0.0),
                        remasking="random" if random_tape else "low_confidence",
                        padded=padded, random_tape=random_tape)
  want = cases[f"{out}.output"].shape[1] - cases[f"text_gen/in/{prompt}"].shape[1]
  if want != setting.gen_length:
    raise ValueError(f"text_gen setting {name!r}: name says gen_length={setting.gen_length} but the "
                     f"recorded output has {want} generated tokens")
  return setting


def t2i_setting(name: str, cases: Mapping[str, np.ndarray]) -> T2ISetting:
  """The settings of a recorded ``t2i_gen`` run: ``cfg{w}_t{steps}[_temp{tau}]`` (tau default 1)."""
  m = _T2I_RE.match(name)
  if m is None:
    if name in T2I_SETTINGS:
      return T2I_SETTINGS[name]
    raise ValueError(f"t2i_gen setting {name!r}: cannot read guidance/timesteps from its name")
  setting = T2ISetting(_num(m.group("cfg"), 0.0), int(m.group("t")), _num(m.group("temp"), 1.0))
  steps = cases[f"t2i_gen/out/{name}.multinomial"].shape[0]
  if steps != setting.steps:
    raise ValueError(f"t2i_gen setting {name!r}: name says {setting.steps} steps, tape has {steps}")
  return setting


def discover_settings(cases: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
  """Names of every recorded text_gen and t2i_gen setting in ``cases``."""
  text = sorted({k[len("text_gen/out/"):-len(".output")] for k in cases
                 if k.startswith("text_gen/out/") and k.endswith(".output")})
  t2i = sorted({k[len("t2i_gen/out/"):-len(".sampled_ids")] for k in cases
                if k.startswith("t2i_gen/out/") and k.endswith(".sampled_ids")})
  return text, t2i


def run_text_setting(params: Any, cfg: MMaDAConfig, cases: Mapping[str, np.ndarray], name: str
                     ) -> dict[str, np.ndarray]:
  """Runs ``text_gen`` setting ``name``; returns {'output' [B, P+G], 'trajectory' [T, B|2B, P+G]}."""
  s = text_setting(name, cases)
  out = f"text_gen/out/{name}"
  sample = _generate_text(
      params, cfg, cases[f"text_gen/in/{s.prompt}"], gen_length=s.gen_length,
      block_length=s.block_length, steps=s.steps, guidance_scale=s.guidance_scale, remasking=s.remasking,
      attention_mask=cases[f"{out}.attention_mask"] if s.padded else None,
      rand_tape=cases[f"{out}.torch_rand"] if s.random_tape else None, return_trajectory=True)
  return {"output": np.asarray(sample.tokens), "trajectory": np.asarray(sample.trajectory)}


def run_t2i_setting(params: Any, cfg: MMaDAConfig, cases: Mapping[str, np.ndarray], name: str
                    ) -> dict[str, np.ndarray]:
  """Runs ``t2i_gen`` setting ``name`` with its tapes; returns sampled_ids, final_input_ids, trajectory.

  The fixtures use resolution R = S, so the original's uncond prefix R + 1 is S + 1.
  """
  s = t2i_setting(name, cases)
  inp, out = "t2i_gen/in", f"t2i_gen/out/{name}"
  use_cfg = s.guidance_scale > 0
  sample = _generate_image_tokens(
      params, cfg, cases[f"{inp}/input_ids"], attention_mask=cases[f"{inp}/attention_mask"],
      uncond_input_ids=cases[f"{inp}/uncond_input_ids"] if use_cfg else None,
      uncond_attention_mask=cases[f"{inp}/uncond_attention_mask"] if use_cfg else None,
      steps=s.steps, guidance_scale=s.guidance_scale, temperature=s.temperature,
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
  text_names, t2i_names = discover_settings(cases)
  for name in text_names:
    report[f"text_gen/{name}"] = compare(run_text_setting(params, cfg, cases, name), cases, f"text_gen/out/{name}")
  for name in t2i_names:
    report[f"t2i_gen/{name}"] = compare(run_t2i_setting(params, cfg, cases, name), cases, f"t2i_gen/out/{name}")
  return report

"""The evaluation run: read a benchmark, score a model on it, write results, resume when interrupted.

Task kinds: ``generate`` (gsm8k, math: text sampling, then the task's scorer), ``mmu`` (vqav2,
pope, mmmu: ``MMaDA.answer`` on the example's image) and ``likelihood`` (mmlu, arc_c: the choice
with the highest Monte-Carlo log-likelihood, :mod:`mmada_jax.eval.likelihood`), ``t2i`` (geneval,
clip_score: images in GenEval's layout, optionally CLIP-scored, :mod:`mmada_jax.eval.t2i`).
Text sampling batches only prompts of equal token length (:mod:`mmada_jax.eval.batching`), so a
generation task's per-example outputs do not depend on ``batch_size``, nor on ``mesh_shape`` (the
model sharded over this process's devices, batches by the batch rule).

Outputs in the workdir: ``samples.jsonl`` (one row per example in data order: ``index``,
``prompt``, ``output``, ``target``, ``score``; rewritten atomically after every batch),
``run.json`` (the settings the samples were made with; a rerun with other settings is refused)
and ``results.json`` (``task``, ``metrics``, ``stderr``, ``n``, ``settings``, ``model`` {path,
params_hash}, ``wall_s``, ``tokens_per_s``: generated tokens per second for sampling tasks,
scored sequence tokens (copies × length) per second for likelihood tasks, this invocation only).
A rerun continues after the last finished batch without recomputing it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from mmada_jax.config_schema import parse
from mmada_jax.eval import batching, data, likelihood, scoring
from mmada_jax.eval.config import EvalConfig

KINDS = {"gsm8k": "generate", "math": "generate", "mmlu": "likelihood", "arc_c": "likelihood",
         "vqav2": "mmu", "pope": "mmu", "mmmu": "mmu", "geneval": "t2i", "clip_score": "t2i"}
FORMAT = {"gsm8k": "gsm8k", "math": "math", "mmlu": "mmlu", "arc_c": "arc", "vqav2": "vqa", "pope": "pope",
          "mmmu": "mmmu"}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


# ------------------------------------------------------------------ prompts

def _options(ex: data.Example) -> str:
  return "".join(f"\n{scoring.LETTERS[i]}. {c}" for i, c in enumerate(ex.choices or ()))


def render(task: str, ex: data.Example, shots: list[data.Example]) -> str:
  """The prompt text of ``ex`` after ``shots`` (few-shot examples with their answers)."""
  if task == "gsm8k":
    return "".join(f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots) + \
        f"Question: {ex.question}\nAnswer:"
  if task == "math":
    return "".join(f"Problem: {s.question}\nSolution: {s.solution}\n\n" for s in shots) + \
        f"Problem: {ex.question}\nSolution:"
  if task == "mmlu":
    head = f"The following are multiple choice questions (with answers) about {ex.subject.replace('_', ' ')}.\n\n"
    return head + "".join(f"{s.question}{_options(s)}\nAnswer: {s.target}\n\n" for s in shots) + \
        f"{ex.question}{_options(ex)}\nAnswer:"
  if task == "arc_c":
    return "".join(f"Question: {s.question}\nAnswer: {s.choices[scoring.LETTERS.index(s.target)]}\n\n"
                   for s in shots) + f"Question: {ex.question}\nAnswer:"
  if task in ("vqav2", "pope"):
    return ex.question + SHORT_ANSWER
  if task == "mmmu":
    return ex.question + _options(ex) + LETTER_ANSWER
  raise ValueError(f"unknown task {task!r}")


def continuations(task: str, ex: data.Example) -> list[str]:
  """The continuation text of each choice (likelihood tasks)."""
  if task == "mmlu":
    return [f" {scoring.LETTERS[i]}" for i in range(len(ex.choices))]
  return [f" {c}" for c in ex.choices]


def score(task: str, ex: data.Example, output: str) -> float:
  """The example's score (1/0 correctness; VQAv2 accuracy)."""
  if task == "gsm8k":
    return scoring.gsm8k_score(output, ex.target)
  if task == "math":
    return scoring.math_score(output, ex.target)
  if task == "vqav2":
    return scoring.vqa_accuracy(scoring.short_answer(output), ex.answers)
  if task == "pope":
    return float(scoring.yes_no(output) == ex.target)
  if task in ("mmmu", "mmlu", "arc_c"):
    return scoring.choice_score(output, ex.target, ex.choices)
  raise ValueError(f"unknown task {task!r}")


# ------------------------------------------------------------------ the model side

@dataclasses.dataclass
class Loaded:
  """The model and tokenizers of a run; ``scorer``: an image–text scorer for text-to-image tasks
  (:class:`mmada_jax.eval.clip.ImageTextScorer`; None: CLIP from ``clip_model`` when set)."""
  model: Any
  tokenizer: Any
  image_tokenizer: Any = None
  scorer: Any = None


def load(ec: EvalConfig) -> Loaded:
  """Loads ``ec.model`` / ``ec.text_tokenizer`` (and ``ec.image_tokenizer`` for image tasks)."""
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.api.model import MMaDA
  from mmada_jax.prompting import TextTokenizer
  images = KINDS[ec.task] in ("mmu", "t2i")
  for name in ("model", "text_tokenizer", "data") + (("image_tokenizer",) if images else ()):
    if not getattr(ec, name):
      raise ValueError(f"config.{name} is not set (--config.{name}=PATH)")
    if not os.path.exists(getattr(ec, name)):
      raise FileNotFoundError(f"config.{name}: {getattr(ec, name)!r} does not exist")
  itok = ImageTokenizer.from_pretrained(ec.image_tokenizer) if images else None
  return Loaded(MMaDA.from_pretrained(ec.model, mesh=_mesh(ec)), TextTokenizer.from_file(ec.text_tokenizer), itok)


def _mesh(ec: EvalConfig) -> jax.sharding.Mesh | None:
  """The mesh ``ec.mesh_shape`` over this process's devices (None for '')."""
  from mmada_jax.sharding import make_mesh
  return make_mesh(ec.mesh_shape, jax.local_devices()) if ec.mesh_shape else None


def on_mesh(ec: EvalConfig, lo: Loaded) -> Loaded:
  """``lo`` with its model's parameters sharded over ``_mesh(ec)`` (as given without
  ``mesh_shape`` or when the model already has a mesh)."""
  m = lo.model
  if not ec.mesh_shape or m.mesh is not None:
    return lo
  from mmada_jax.model import transformer
  from mmada_jax.sharding import shard_params
  mesh = _mesh(ec)
  params = shard_params(m.params, transformer.param_axes(m.config), mesh, m.rules)
  model = type(m)(params, m.config, mesh=mesh, rules=m.rules, hf_config=m.hf_config,
                  generation_config=m.generation_config)
  return dataclasses.replace(lo, model=model)


def params_hash(params: Any) -> str:
  """blake2b (16 bytes, hex) of every parameter's path, shape, dtype and bytes."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _sampler_kwargs(ec: EvalConfig) -> dict[str, Any]:
  kw = dict(gen_length=ec.gen_length, block_length=ec.block_length, steps=ec.steps, seed=ec.seed)
  if ec.cache != "none":
    kw["cache"] = ec.cache
  if ec.threshold is not None:
    kw["threshold"] = ec.threshold
  return kw


def _pad(items: list, size: int) -> list:
  """``items`` padded to ``size`` by repeating the last one (one compiled batch shape)."""
  return items + [items[-1]] * (size - len(items))


def _image_array(ex: data.Example, lo: Loaded) -> np.ndarray:
  from mmada_jax.data.images import preprocess_image
  grid = lo.model.generation_config.grid
  f = lo.image_tokenizer.config.downsample_factor
  if grid[0] != grid[1]:
    raise ValueError(f"image tasks need a square code grid, the model's is {grid}")
  try:
    return preprocess_image(ex.image, grid[0] * f)
  except (OSError, ValueError) as e:
    raise data.DataError(f"record {ex.index}: field 'image' cannot be read ({e})") from e


def _split(tok: Any, context: str, cont: str) -> tuple[list[int], list[int]]:
  """Token ids of ``context`` and of ``cont`` after it (split from the encoding of both)."""
  ctx = tok.encode(context, add_special_tokens=False)
  whole = tok.encode(context + cont, add_special_tokens=False)
  if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
    return ctx, whole[len(ctx):]
  return ctx, tok.encode(cont, add_special_tokens=False)


def _likelihood_rows(ec: EvalConfig, lo: Loaded, batch: list[data.Example], prompts: list[str]
                     ) -> tuple[list[dict[str, Any]], int]:
  from mmada_jax.prompting.special_tokens import SpecialTokens
  sp = SpecialTokens.from_tokenizer(lo.tokenizer)
  rows, tokens = [], 0
  for ex, prompt in zip(batch, prompts):
    lls = []
    for j, cont in enumerate(continuations(ec.task, ex)):
      if ec.chat:
        ctx = lo.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        cids = lo.tokenizer.encode(cont.strip(), add_special_tokens=False)
      else:
        ctx, cids = _split(lo.tokenizer, prompt, cont)
        ctx = [sp.bos] + ctx
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ec.seed), ex.index), j)
      est = likelihood.log_likelihood(lo.model, ctx, cids, mc_num=ec.mc_num, batch_size=ec.batch_size,
                                      guidance_scale=ec.cfg, seed=key)
      tokens += est.copies * est.rounds * (len(ctx) + len(cids))
      lls.append(est.log_likelihood)
    pick = scoring.LETTERS[int(np.argmax(lls))]
    norm = [ll / max(1, len(c.strip())) for ll, c in zip(lls, continuations(ec.task, ex))]
    rows.append(dict(index=ex.index, prompt=prompt, output=pick, target=ex.target,
                     score=float(pick == ex.target), score_norm=float(scoring.LETTERS[int(np.argmax(norm))] == ex.target),
                     loglik=lls))
  return rows, tokens


def run_batch(ec: EvalConfig, lo: Loaded, batch: list[data.Example], shots: list[data.Example]
              ) -> tuple[list[dict[str, Any]], int]:
  """Sample rows of ``batch`` and the number of tokens processed."""
  prompts = [ec.prompt.format(question=ex.question) if ec.prompt else render(ec.task, ex, shots) for ex in batch]
  kind = KINDS[ec.task]
  if kind == "likelihood":
    return _likelihood_rows(ec, lo, batch, prompts)
  n = len(batch)
  if kind == "generate":
    ids = [batching.prompt_ids(lo.tokenizer, p, chat=ec.chat) for p in prompts]
    gen = batching.generate_unpadded(lo.model, ids, batch_size=ec.batch_size, **_sampler_kwargs(ec))
    texts = batching.decode(lo.model, lo.tokenizer, gen)
    rows = [dict(index=ex.index, prompt=p, output=t, target=ex.target, score=score(ec.task, ex, t))
            for ex, p, t in zip(batch, prompts, texts)]
    return rows, n * ec.gen_length
  else:
    images = np.stack(_pad([_image_array(ex, lo) for ex in batch], ec.batch_size))
    out = lo.model.answer(images, _pad(prompts, ec.batch_size), image_tokenizer=lo.image_tokenizer,
                          tokenizer=lo.tokenizer, **_sampler_kwargs(ec))
  rows = [dict(index=ex.index, prompt=p, output=t, target=ex.target, score=score(ec.task, ex, t))
          for ex, p, t in zip(batch, prompts, out.texts[:n])]
  return rows, n * ec.gen_length


# ------------------------------------------------------------------ files and resume

def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _settings(ec: EvalConfig) -> dict[str, Any]:
  return dataclasses.asdict(ec)


# settings that do not change a run's samples (a resumed run may differ in them)
_FREE = ("limit", "mesh_shape")


def _finished(workdir: str, ec: EvalConfig, examples: list[data.Example]) -> list[dict[str, Any]]:
  """Rows of ``samples.jsonl`` from an earlier run of the same settings (checked), else []."""
  run_file, samples = os.path.join(workdir, "run.json"), os.path.join(workdir, "samples.jsonl")
  settings = {k: v for k, v in _settings(ec).items() if k not in _FREE}
  if os.path.exists(run_file):
    with open(run_file, encoding="utf-8") as f:
      before = json.load(f)
    diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if diff:
      changes = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in diff)
      raise ValueError(f"{workdir} holds a run with other settings ({changes}); use another --workdir")
  else:
    os.makedirs(workdir, exist_ok=True)
    _write_atomic(run_file, json.dumps(settings, indent=1, sort_keys=True) + "\n")
  if not os.path.exists(samples):
    return []
  with open(samples, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for i, r in enumerate(rows[:len(examples)]):
    if r.get("index") != examples[i].index:
      raise ValueError(f"{samples}: row {i} is example {r.get('index')}, expected {examples[i].index}")
  return rows


def _metrics(task: str, rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
  acc, se = scoring.mean_and_stderr([r["score"] for r in rows])
  metrics, stderr = {"accuracy": acc}, {"accuracy": se}
  if task in ("mmlu", "arc_c"):
    metrics["accuracy_norm"], stderr["accuracy_norm"] = scoring.mean_and_stderr([r["score_norm"] for r in rows])
  if task == "pope":
    pm = scoring.pope_metrics([scoring.yes_no(r["output"]) for r in rows], [r["target"] for r in rows])
    metrics.update({k: v for k, v in pm.items() if k != "accuracy"})
  return metrics, stderr


def markdown(result: dict[str, Any]) -> str:
  """The results as a markdown table (metric, value, stderr)."""
  lines = [f"| {result['task']} (n={result['n']}) | value | stderr |", "|---|---|---|"]
  for k, v in result["metrics"].items():
    se = result["stderr"].get(k)
    lines.append(f"| {k} | {v:.4f} | {'' if se is None else f'{se:.4f}'} |")
  return "\n".join(lines)


def _run_t2i(ec: EvalConfig, workdir: str, loaded: Loaded | None, t0: float) -> dict[str, Any]:
  from mmada_jax.eval import t2i
  if ec.task == "clip_score" and not ec.clip_model:
    raise ValueError("task clip_score needs config.clip_model (a local Hugging Face CLIP directory)")
  t2i.read_prompts(ec.data, ec.limit)                           # bad data fails before loading
  _finished(workdir, ec, [])
  lo = on_mesh(ec, loaded or load(ec))
  t_run = time.perf_counter()
  rows, metrics, stderr, made = t2i.run_t2i(ec, workdir, lo)
  elapsed = time.perf_counter() - t_run
  _write_atomic(os.path.join(workdir, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  n_tok = made * lo.model.generation_config.num_vq_tokens
  result = dict(task=ec.task, metrics=metrics, stderr=stderr, n=len(rows), images=sum(len(r["images"]) for r in rows),
                settings=_settings(ec),
                model=dict(path=os.path.abspath(ec.model) if ec.model else "", params_hash=params_hash(lo.model.params)),
                wall_s=time.perf_counter() - t0, tokens_per_s=(n_tok / elapsed if n_tok and elapsed > 0 else 0.0),
                resumed=len(rows) - made // ec.n_samples)
  _write_atomic(os.path.join(workdir, "results.json"), json.dumps(result, indent=1) + "\n")
  return result


def run(eval_cfg: Any, workdir: str, *, loaded: Loaded | None = None,
        on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs the evaluation ``eval_cfg`` (a ConfigDict, mapping or :class:`EvalConfig`) into
  ``workdir`` and returns the results dict (also written to ``results.json``). ``loaded``: an
  already loaded model/tokenizers; ``on_batch(i)``: called after batch i is written (tests)."""
  ec = parse(EvalConfig, eval_cfg, "config")
  t0 = time.perf_counter()
  if KINDS[ec.task] == "t2i":
    return _run_t2i(ec, workdir, loaded, t0)
  examples = data.read_examples(FORMAT[ec.task], ec.data, ec.limit)
  if not examples:
    raise data.DataError(f"{ec.data}: no examples")
  shots: list[data.Example] = []
  if ec.num_fewshot:
    if not ec.fewshot_data:
      raise ValueError(f"config.num_fewshot={ec.num_fewshot} needs config.fewshot_data (the file the shots come from)")
    shots = data.read_examples(FORMAT[ec.task], ec.fewshot_data, ec.num_fewshot)
    if len(shots) < ec.num_fewshot:
      raise data.DataError(f"{ec.fewshot_data}: {len(shots)} records for num_fewshot={ec.num_fewshot}")
  rows = _finished(workdir, ec, examples)
  lo = on_mesh(ec, loaded or load(ec))
  samples = os.path.join(workdir, "samples.jsonl")
  done, tokens, t_run = len(rows), 0, time.perf_counter()
  todo = examples[done:]
  from tqdm import tqdm
  bar = tqdm(total=len(examples), initial=min(done, len(examples)), desc=ec.task, unit="ex", file=sys.stderr)
  for b, start in enumerate(range(0, len(todo), ec.batch_size)):
    new, n_tok = run_batch(ec, lo, todo[start:start + ec.batch_size], shots)
    rows.extend(new)
    tokens += n_tok
    _write_atomic(samples, "".join(json.dumps(r) + "\n" for r in rows))
    bar.update(len(new))
    if on_batch is not None:
      on_batch(b)
  bar.close()
  rows = rows[:len(examples)]
  metrics, stderr = _metrics(ec.task, rows)
  elapsed = time.perf_counter() - t_run
  result = dict(task=ec.task, metrics=metrics, stderr=stderr, n=len(rows), settings=_settings(ec),
                model=dict(path=os.path.abspath(ec.model) if ec.model else "", params_hash=params_hash(lo.model.params)),
                wall_s=time.perf_counter() - t0, tokens_per_s=(tokens / elapsed if tokens and elapsed > 0 else 0.0),
                resumed=done)
  _write_atomic(os.path.join(workdir, "results.json"), json.dumps(result, indent=1) + "\n")
  return result

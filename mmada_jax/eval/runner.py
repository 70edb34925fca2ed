"""The evaluation run: read a benchmark, score a model on it, write results, resume when interrupted.

Task kinds: ``generate`` (gsm8k, math: text sampling, then the task's scorer), ``mmu`` (vqav2,
pope, mmmu: the ``MMaDA.answer`` prompt layout on the example's image) and ``likelihood`` (mmlu,
arc_c, hellaswag, piqa, winogrande, truthfulqa, gpqa, cmmlu, ceval: the choice with the highest
Monte-Carlo log-likelihood, :mod:`mmada_jax.eval.likelihood`; prompts as lm-eval's tasks write
them), ``t2i`` (geneval, clip_score: images in GenEval's layout, optionally CLIP-scored,
:mod:`mmada_jax.eval.t2i`). Text and image-understanding sampling batch only prompts of equal
token length (:mod:`mmada_jax.eval.batching`; each image is encoded alone), and a likelihood
choice's seed is a function of its example and choice index, so per-example outputs do not
depend on ``batch_size``, nor on ``mesh_shape`` (the model sharded over this process's devices,
batches by the batch rule), nor on the number of processes.

Outputs in the workdir: ``samples.jsonl`` (one row per example in data order: ``index``,
``prompt``, ``output``, ``target``, ``score``; rewritten atomically after every batch),
``run.json`` (the settings the samples were made with; a rerun with other settings is refused)
and ``results.json`` (``task``, ``metrics``, ``stderr``, ``n``, ``settings``, ``model`` {path,
params_hash}, ``wall_s``, ``tokens_per_s``: generated tokens per second for sampling tasks,
scored sequence tokens (copies × length) per second for likelihood tasks, this invocation only,
all processes together; ``resumed``: examples finished before it; ``processes``).
A rerun continues without recomputing finished examples.

Many processes (``jax.distributed`` initialised, e.g. by ``python -m mmada_jax.eval
--coordinator_address=…``): process p of n takes the examples at positions p, p+n, p+2n, …
(each on its own devices, ``mesh_shape`` over its local devices) and rewrites its rows to
``samples.part-<p>-of-<n>.jsonl`` after every batch. At the end the rows are all-gathered
(every process returns the same metrics); process 0 alone writes ``run.json``,
``samples.jsonl`` (data order) and ``results.json`` and then deletes the part files. A resume
reads ``samples.jsonl`` and every part file, so it may change the number of processes or the
mesh; a workdir on a filesystem all hosts share is needed for that, not for a plain run.
Text-to-image tasks split the prompts the same way (each process writes its prompts' images).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from mmada_jax.config_schema import parse
from mmada_jax.data.jsonl import read_json_lines
from mmada_jax.eval import batching, data, likelihood, scoring
from mmada_jax.eval.config import EvalConfig

KINDS = {"gsm8k": "generate", "math": "generate", "mmlu": "likelihood", "arc_c": "likelihood",
         "hellaswag": "likelihood", "piqa": "likelihood", "winogrande": "likelihood", "truthfulqa": "likelihood",
         "gpqa": "likelihood", "cmmlu": "likelihood", "ceval": "likelihood",
         "vqav2": "mmu", "pope": "mmu", "mmmu": "mmu", "geneval": "t2i", "clip_score": "t2i"}
FORMAT = {"gsm8k": "gsm8k", "math": "math", "mmlu": "mmlu", "arc_c": "arc", "hellaswag": "hellaswag", "piqa": "piqa",
          "winogrande": "winogrande", "truthfulqa": "truthfulqa", "gpqa": "gpqa", "cmmlu": "cmmlu", "ceval": "ceval",
          "vqav2": "vqa", "pope": "pope", "mmmu": "mmmu"}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
# likelihood tasks that also report accuracy_norm (log-likelihood per character of the choice)
NORMED = ("mmlu", "arc_c", "hellaswag", "piqa", "gpqa", "cmmlu", "ceval")
# TruthfulQA's fixed question-answering primer (part of every prompt; the task is 0-shot).
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")
GPQA_DESCRIPTION = ("Here are some example questions from experts. Answer the final question yourself, following "
                    "the format of the previous questions exactly.\n")


# ------------------------------------------------------------------ prompts

def _options(ex: data.Example) -> str:
  return "".join(f"\n{scoring.LETTERS[i]}. {c}" for i, c in enumerate(ex.choices or ()))


def _blank(ex: data.Example) -> tuple[str, str]:
  """A WinoGrande sentence split at its blank: (text before ``_``, the rest, stripped)."""
  i = ex.question.index("_")
  return ex.question[:i], ex.question[i + 1:].strip()


def _choice_text(task: str, ex: data.Example) -> str:
  """The question part of a likelihood task's prompt (what precedes `` <choice>``)."""
  if task in ("mmlu",):
    return f"{ex.question}{_options(ex)}\nAnswer:"
  if task in ("cmmlu", "ceval"):
    return f"{ex.question.strip()}{_options(ex)}\n答案："
  if task in ("arc_c", "piqa"):
    return f"Question: {ex.question}\nAnswer:"
  if task == "hellaswag":
    return ex.question
  if task == "truthfulqa":
    return f"{TRUTHFULQA_PRIMER}\n\nQ: {ex.question}\nA:"
  if task == "gpqa":
    opts = "".join(f"\n({scoring.LETTERS[i]}) {c}" for i, c in enumerate(ex.choices))
    return f"Question: {ex.question.strip()}\nChoices:{opts}\nAnswer:"
  raise ValueError(f"unknown likelihood task {task!r}")


def choice_strings(task: str, ex: data.Example) -> list[str]:
  """What each choice of a likelihood task scores (the continuation after a space)."""
  if task in ("mmlu", "cmmlu", "ceval"):
    return [scoring.LETTERS[i] for i in range(len(ex.choices))]
  if task == "gpqa":
    return [f"({scoring.LETTERS[i]})" for i in range(len(ex.choices))]
  return list(ex.choices)


def _shot(task: str, s: data.Example) -> str:
  """One few-shot example with its answer (lm-eval's ``text + " " + target``)."""
  gold = scoring.LETTERS.index(s.target)
  if task == "winogrande":
    before, rest = _blank(s)
    return f"{before}{s.choices[gold]} {rest}"
  return f"{_choice_text(task, s)} {choice_strings(task, s)[gold]}"


def _description(task: str, ex: data.Example, shots: list[data.Example]) -> str:
  subject = ex.subject.replace("_", " ")
  if task == "mmlu":
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"
  if task == "cmmlu" and subject:
    return f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
  if task == "ceval" and subject:
    return f"以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n"
  if task == "gpqa" and shots:
    return GPQA_DESCRIPTION
  return ""


def render(task: str, ex: data.Example, shots: list[data.Example]) -> str:
  """The prompt text of ``ex`` after ``shots`` (few-shot examples with their answers). For
  WinoGrande it is the whole sentence with its blank; each choice's context is the sentence up
  to the blank with the option filled in (:func:`requests`)."""
  if task == "gsm8k":
    return "".join(f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots) + \
        f"Question: {ex.question}\nAnswer:"
  if task == "math":
    return "".join(f"Problem: {s.question}\nSolution: {s.solution}\n\n" for s in shots) + \
        f"Problem: {ex.question}\nSolution:"
  if KINDS.get(task) == "likelihood":
    head = _description(task, ex, shots) + "".join(_shot(task, s) + "\n\n" for s in shots)
    return head + (ex.question if task == "winogrande" else _choice_text(task, ex))
  if task in ("vqav2", "pope"):
    return ex.question + SHORT_ANSWER
  if task == "mmmu":
    return ex.question + _options(ex) + LETTER_ANSWER
  raise ValueError(f"unknown task {task!r}")


def requests(task: str, ex: data.Example, prompt: str) -> list[tuple[str, str]]:
  """``(context, continuation)`` per choice of a likelihood task, for the rendered ``prompt``.

  Most tasks score `` <choice>`` after the prompt. WinoGrande uses the partial-scoring
  formulation: the context is the sentence up to the blank with option k filled in, the
  continuation the rest of the sentence (the same for both options)."""
  if task == "winogrande":
    if not prompt.endswith(ex.question):
      raise ValueError("winogrande: the prompt must end with the sentence (config.prompt is not supported)")
    head = prompt[:len(prompt) - len(ex.question)]
    before, rest = _blank(ex)
    return [(head + before + c, " " + rest) for c in ex.choices]
  return [(prompt, " " + c) for c in choice_strings(task, ex)]


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
  if task == "mmmu" or KINDS.get(task) == "likelihood":
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
  from mmada_jax.quant import param_axes   # the float axes, or a quantized model's QArray layout
  from mmada_jax.sharding import shard_params
  mesh = _mesh(ec)
  params = shard_params(m.params, param_axes(m.params, m.config), mesh, m.rules)
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
  """Rows of a likelihood task: every choice's Monte-Carlo log-likelihood (``loglik``), the
  argmax (``output``; ``score_norm``: the argmax per character); TruthfulQA with ``mc2_targets``
  also ``mc2`` (the normalised probability mass of the true answers). Choice k of example i uses
  the seed ``fold_in(fold_in(seed, i), k)``, so a row depends on nothing else in its batch."""
  from mmada_jax.prompting.special_tokens import SpecialTokens
  sp = SpecialTokens.from_tokenizer(lo.tokenizer)
  rows, tokens = [], 0
  for ex, prompt in zip(batch, prompts):
    reqs = requests(ec.task, ex, prompt)
    n_choice = len(reqs)
    if ex.mc2 is not None:
      reqs += [r for r in ((prompt, " " + c) for c in ex.mc2[0]) if r not in reqs]
    lls = []
    for j, (context, cont) in enumerate(reqs):
      if ec.chat:
        ctx = lo.tokenizer.apply_chat_template([{"role": "user", "content": context}])
        cids = lo.tokenizer.encode(cont.strip(), add_special_tokens=False)
      else:
        ctx, cids = _split(lo.tokenizer, context, cont)
        ctx = [sp.bos] + ctx
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ec.seed), ex.index), j)
      est = likelihood.log_likelihood(lo.model, ctx, cids, mc_num=ec.mc_num, batch_size=ec.batch_size,
                                      guidance_scale=ec.cfg, seed=key)
      tokens += est.copies * est.rounds * (len(ctx) + len(cids))
      lls.append(est.log_likelihood)
    choice_lls = lls[:n_choice]
    pick = scoring.LETTERS[int(np.argmax(choice_lls))]
    norm = [ll / max(1, len(c)) for ll, c in zip(choice_lls, choice_strings(ec.task, ex))]
    row = dict(index=ex.index, prompt=prompt, output=pick, target=ex.target, score=float(pick == ex.target),
               score_norm=float(scoring.LETTERS[int(np.argmax(norm))] == ex.target), loglik=choice_lls)
    if ex.mc2 is not None:
      by_req = dict(zip(reqs, lls))
      mc2_lls = [by_req[(prompt, " " + c)] for c in ex.mc2[0]]
      row["mc2"] = scoring.truthfulqa_mc2(mc2_lls, ex.mc2[1])
    rows.append(row)
  return rows, tokens


def run_batch(ec: EvalConfig, lo: Loaded, batch: list[data.Example], shots: list[data.Example]
              ) -> tuple[list[dict[str, Any]], int]:
  """Sample rows of ``batch`` and the number of tokens processed."""
  prompts = [ec.prompt.format(question=ex.question) if ec.prompt else render(ec.task, ex, shots) for ex in batch]
  kind = KINDS[ec.task]
  if kind == "likelihood":
    return _likelihood_rows(ec, lo, batch, prompts)
  if kind == "generate":
    ids = [batching.prompt_ids(lo.tokenizer, p, chat=ec.chat) for p in prompts]
  else:
    ids = _mmu_ids(ec, lo, batch, prompts)
  gen = batching.generate_unpadded(lo.model, ids, batch_size=ec.batch_size, **_sampler_kwargs(ec))
  texts = batching.decode(lo.model, lo.tokenizer, gen)
  rows = [dict(index=ex.index, prompt=p, output=t, target=ex.target, score=score(ec.task, ex, t))
          for ex, p, t in zip(batch, prompts, texts)]
  return rows, len(batch) * ec.gen_length


def _mmu_ids(ec: EvalConfig, lo: Loaded, batch: list[data.Example], prompts: list[str]) -> list[list[int]]:
  """Image-understanding prompt ids, unpadded: ``[mmu][soi] image codes [eoi]`` + the question
  (chat template, or BOS + text without ``chat``), the layout of ``MMaDA.answer``. Each image is
  encoded alone (a [1, H, W, 3] call): its codes then cannot depend on the other images of the
  batch, and the encoder costs a few percent of the model's prompt pass at these sizes."""
  from mmada_jax.prompting import builders
  from mmada_jax.prompting.special_tokens import SpecialTokens
  sp = SpecialTokens.from_tokenizer(lo.tokenizer)
  out = []
  for ex, p in zip(batch, prompts):
    codes = np.asarray(lo.image_tokenizer.encode(_image_array(ex, lo)[None]))
    chat = batching.prompt_ids(lo.tokenizer, p, chat=ec.chat)
    row = builders.mmu_gen_prompt(sp.image_token_ids(codes), [chat], specials=sp).input_ids[0]
    out.append([int(t) for t in row])
  return out


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


PART_FILE = "samples.part-{:05d}-of-{:05d}.jsonl"
"""Process p of n (n > 1) keeps the rows of its slice here until process 0 writes samples.jsonl."""


def _check_settings(workdir: str, ec: EvalConfig, *, write: bool = True) -> None:
  """Refuses a workdir whose ``run.json`` holds other settings (outside :data:`_FREE`); writes
  it when missing and ``write`` (process 0)."""
  run_file = os.path.join(workdir, "run.json")
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
    if write:
      _write_atomic(run_file, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _part_files(workdir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(glob.escape(workdir), "samples.part-*-of-*.jsonl")))


def _finished(workdir: str, examples: list[data.Example]) -> dict[int, dict[str, Any]]:
  """Rows already made, by example index: ``samples.jsonl`` and every process's part file
  (so a resume may change the number of processes). A row whose target differs from the data
  file's is refused (the data changed under the workdir)."""
  by_index = {ex.index: ex for ex in examples}
  out: dict[int, dict[str, Any]] = {}
  for path in [os.path.join(workdir, "samples.jsonl")] + _part_files(workdir):
    if not os.path.exists(path):
      continue
    for n, r in read_json_lines(path):
      i = r.get("index")
      if not isinstance(i, int) or i < 0:
        raise ValueError(f"{path}:{n}: a row without a non-negative integer 'index'")
      if i in by_index and r.get("target") != by_index[i].target:
        raise ValueError(f"{path}:{n}: example {i} has target {r.get('target')!r} but the data file says "
                         f"{by_index[i].target!r}: the data changed since this run began; use another --workdir")
      out.setdefault(i, r)
  return out


def _rows_text(rows: dict[int, dict[str, Any]]) -> str:
  return "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))


def _allgather(obj: Any) -> list[Any]:
  """The JSON-able ``obj`` of every process, in process order (a collective: every process calls it)."""
  from jax.experimental import multihost_utils
  payload = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(payload.size))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(gathered[i, :sizes[i]].tobytes().decode("utf-8")) for i in range(len(sizes))]


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _metrics(task: str, rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
  acc, se = scoring.mean_and_stderr([r["score"] for r in rows])
  metrics, stderr = {"accuracy": acc}, {"accuracy": se}
  if task in NORMED:
    metrics["accuracy_norm"], stderr["accuracy_norm"] = scoring.mean_and_stderr([r["score_norm"] for r in rows])
  if task == "truthfulqa" and rows and all("mc2" in r for r in rows):
    metrics["mc2"], stderr["mc2"] = scoring.mean_and_stderr([r["mc2"] for r in rows])
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
  _check_settings(workdir, ec, write=jax.process_index() == 0)
  lo = on_mesh(ec, loaded or load(ec))
  t_run = time.perf_counter()
  pi, pc = jax.process_index(), jax.process_count()
  rows, metrics, stderr, made = t2i.run_t2i(ec, workdir, lo, process_index=pi, process_count=pc)
  if pc > 1:                          # each process made its prompts' images; every process gets every row
    parts = _allgather(dict(rows=rows, made=made, metrics=sorted(metrics)))
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["index"])
    made = sum(p["made"] for p in parts)
    for name in sorted({k for p in parts for k in p["metrics"]}):
      metrics[name], stderr[name] = scoring.mean_and_stderr([s for r in rows for s in r[name]])
  elapsed = time.perf_counter() - t_run
  if pi == 0:
    _write_atomic(os.path.join(workdir, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  n_tok = made * lo.model.generation_config.num_vq_tokens
  result = dict(task=ec.task, metrics=metrics, stderr=stderr, n=len(rows), images=sum(len(r["images"]) for r in rows),
                settings=_settings(ec),
                model=dict(path=os.path.abspath(ec.model) if ec.model else "", params_hash=params_hash(lo.model.params)),
                wall_s=time.perf_counter() - t0, tokens_per_s=(n_tok / elapsed if n_tok and elapsed > 0 else 0.0),
                resumed=len(rows) - made // ec.n_samples, processes=pc)
  if pi == 0:
    _write_atomic(os.path.join(workdir, "results.json"), json.dumps(result, indent=1) + "\n")
  if pc > 1:
    _barrier("mmada_jax.eval.t2i_results_written")
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
  pi, pc = jax.process_index(), jax.process_count()
  _check_settings(workdir, ec, write=pi == 0)
  finished = _finished(workdir, examples)
  lo = on_mesh(ec, loaded or load(ec))
  mine = examples[pi::pc]                                        # this process's slice
  rows = {ex.index: finished[ex.index] for ex in mine if ex.index in finished}
  todo = [ex for ex in mine if ex.index not in finished]
  held = dict(finished) if pc == 1 else dict(rows)               # what this process's file holds
  path = os.path.join(workdir, "samples.jsonl" if pc == 1 else PART_FILE.format(pi, pc))
  n_new, tokens, t_run = 0, 0, time.perf_counter()
  from tqdm import tqdm
  bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=ec.task if pc == 1 else f"{ec.task} [{pi}/{pc}]",
             unit="ex", file=sys.stderr, disable=pi != 0)
  for b, start in enumerate(range(0, len(todo), ec.batch_size)):
    new, n_tok = run_batch(ec, lo, todo[start:start + ec.batch_size], shots)
    for r in new:
      rows[r["index"]] = held[r["index"]] = r
    n_new, tokens = n_new + len(new), tokens + n_tok
    _write_atomic(path, _rows_text(held))
    bar.update(len(new))
    if on_batch is not None:
      on_batch(b)
  bar.close()
  merged = dict(finished)
  if pc > 1:                                                     # every process gets every row
    parts = _allgather(dict(rows=list(rows.values()), new=n_new, tokens=tokens))
    for part in parts:
      merged.update((r["index"], r) for r in part["rows"])
    n_new, tokens = sum(p["new"] for p in parts), sum(p["tokens"] for p in parts)
  else:
    merged.update(rows)
  final = [merged[ex.index] for ex in examples]
  metrics, stderr = _metrics(ec.task, final)
  elapsed = time.perf_counter() - t_run
  result = dict(task=ec.task, metrics=metrics, stderr=stderr, n=len(final), settings=_settings(ec),
                model=dict(path=os.path.abspath(ec.model) if ec.model else "", params_hash=params_hash(lo.model.params)),
                wall_s=time.perf_counter() - t0, tokens_per_s=(tokens / elapsed if tokens and elapsed > 0 else 0.0),
                resumed=len(examples) - n_new, processes=pc)
  if pi == 0:
    _write_atomic(os.path.join(workdir, "samples.jsonl"), _rows_text(merged))
    _write_atomic(os.path.join(workdir, "results.json"), json.dumps(result, indent=1) + "\n")
    for part_file in _part_files(workdir):                       # merged into samples.jsonl
      _remove(part_file)
  if pc > 1:
    _barrier("mmada_jax.eval.results_written")
    _remove(path)                                                # on a host-local workdir
  return result

"""Benchmark readers: JSON lines / parquet files with the benchmarks' own field names -> examples.

``read_records(path)`` reads ``.jsonl`` (one JSON object a line; blank lines skipped),
``.parquet`` (pyarrow) or a Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk``
(``state.json`` + Arrow stream files, read with pyarrow; a ``DatasetDict`` folder names its splits:
pass ``DIR/<split>``). ``read_examples(task, path)`` turns records into :class:`Example`\\ s by the
task's format (:data:`FORMATS`):

=========  ==============================================================================
format     fields
=========  ==============================================================================
gsm8k      ``question``, ``answer`` (the reference after ``#### N``)
math       ``problem``, ``solution`` (the reference is its last ``\\boxed{}``)
mmlu       ``question``, ``choices`` (list), ``answer`` (0-based index or letter); ``subject``
           optional
arc        ``question``, ``choices`` ({``text``: [...], ``label``: [...]}), ``answerKey``
vqa        ``image``, ``question``, ``answers`` (list of strings or of {``answer``: …}) or
           ``answer`` (one string)
pope       ``image``, ``question``, ``answer`` (``yes``/``no``)
mmmu       ``image_1``, ``question``, ``options`` (list, or its Python/JSON string), ``answer``
           (letter); a question with ``image_2`` … set is refused (one image per prompt)
hellaswag  ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings`` (list), ``label`` (index, int or
           digit string); ``activity_label`` optional. HellaSwag's usual preprocessing:
           query ``activity_label: ctx_a Ctx_b``, ``[title]`` → ``. ``, other ``[...]`` dropped
piqa       ``goal``, ``sol1``, ``sol2``, ``label`` (0 or 1)
winogrande ``sentence`` (one ``_`` blank), ``option1``, ``option2``, ``answer`` (``"1"``/``"2"``)
truthfulqa ``question``, ``mc1_targets`` ({``choices``, ``labels``}: one label 1); optional
           ``mc2_targets`` (same shape, true answers first) for the ``mc2`` metric
gpqa       ``question``, ``choices`` (list of 4), ``answer`` (0-based index or letter)
cmmlu      ``Question``, ``A``, ``B``, ``C``, ``D``, ``Answer`` (letter); ``subject`` optional
ceval      ``question``, ``A``, ``B``, ``C``, ``D``, ``answer`` (letter); ``subject`` optional
=========  ==============================================================================

Images are a path relative to the data file's folder (or absolute), raw encoded bytes, or the
``{"bytes", "path"}`` struct of Hugging Face parquet files; paths are checked when read. A missing
or malformed field is a :class:`DataError` naming the field, the file and the record index.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from typing import Any, Callable

from mmada_jax.data.jsonl import read_json_lines
from mmada_jax.eval import scoring


class DataError(ValueError):
  """A benchmark file or record that cannot be read as its task's format."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One benchmark example.

  index: record index in the file; question: the question / problem text; target: the reference
  answer (a letter for multiple choice, a number string for GSM8K, "yes"/"no" for POPE);
  choices: option texts (multiple choice) or None; answers: all human answers (VQA) or None;
  image: a path (absolute), encoded bytes, or None; subject: MMLU's subject or ''; solution: the
  worked answer (GSM8K ``answer``, MATH ``solution``: what a few-shot example shows) or '';
  mc2: TruthfulQA's ``mc2_targets`` as (choices, labels) or None.
  """
  index: int
  question: str
  target: str
  choices: tuple[str, ...] | None = None
  answers: tuple[str, ...] | None = None
  image: Any = None
  subject: str = ""
  solution: str = ""
  mc2: tuple[tuple[str, ...], tuple[int, ...]] | None = None


def _read_saved_dataset(path: str) -> list[dict[str, Any]]:
  """Rows of a ``Dataset.save_to_disk`` folder: its Arrow stream files in ``state.json`` order."""
  import pyarrow as pa
  if os.path.isfile(os.path.join(path, "dataset_dict.json")):
    with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
      splits = json.load(f).get("splits", [])
    raise DataError(f"{path} is a DatasetDict folder (splits {splits}); pass one split's folder, e.g. "
                    f"{os.path.join(path, splits[0] if splits else 'test')}")
  state_file = os.path.join(path, "state.json")
  if not os.path.isfile(state_file):
    raise DataError(f"{path}: a folder but not a saved dataset (no state.json or dataset_dict.json)")
  try:
    with open(state_file, encoding="utf-8") as f:
      files = [d["filename"] for d in json.load(f)["_data_files"]]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{state_file}: not a datasets state file ({e})") from None
  if not files:
    raise DataError(f"{state_file}: lists no data files")
  rows: list[dict[str, Any]] = []
  for name in files:
    full = os.path.join(path, name)
    if not os.path.isfile(full):
      raise DataError(f"{path}: data file {name!r} named in state.json not found")
    try:
      with pa.memory_map(full) as src:
        rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    except pa.ArrowInvalid as e:
      raise DataError(f"{full}: not an Arrow stream file ({e})") from None
  return rows


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet`` file, or of a saved
  ``datasets`` folder."""
  if os.path.isdir(path):
    return _read_saved_dataset(path)
  if not os.path.isfile(path):
    raise DataError(f"data file not found: {path!r}")
  if path.endswith((".jsonl", ".json")):
    return [rec for _, rec in read_json_lines(path, DataError)]
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()
  raise DataError(f"{path}: unknown data format (expected .jsonl, .json or .parquet)")


class _Record:
  """Field access on one record with errors naming the field, the file and the record index."""

  def __init__(self, rec: dict[str, Any], path: str, index: int):
    self.rec, self.path, self.index = rec, path, index

  def error(self, msg: str) -> DataError:
    return DataError(f"{self.path}: record {self.index}: {msg}")

  def get(self, name: str) -> Any:
    if name not in self.rec or self.rec[name] is None:
      raise self.error(f"missing field {name!r} (fields: {sorted(self.rec)})")
    return self.rec[name]

  def text(self, name: str) -> str:
    v = self.get(name)
    if not isinstance(v, str):
      raise self.error(f"field {name!r} must be a string, got {type(v).__name__}")
    return v

  def strings(self, name: str, value: Any = None) -> tuple[str, ...]:
    v = self.get(name) if value is None else value
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
      raise self.error(f"field {name!r} must be a non-empty list of strings, got {v!r:.80}")
    return tuple(v)

  def image(self, name: str) -> Any:
    v = self.get(name)
    if isinstance(v, dict):
      if v.get("bytes"):
        return bytes(v["bytes"])
      v = v.get("path")
      if not v:
        raise self.error(f"field {name!r} has neither 'bytes' nor 'path'")
    if isinstance(v, (bytes, bytearray)):
      return bytes(v)
    if not isinstance(v, str):
      raise self.error(f"field {name!r} must be an image path or bytes, got {type(v).__name__}")
    base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
    full = v if os.path.isabs(v) else os.path.join(base, v)
    if not os.path.isfile(full):
      raise self.error(f"field {name!r}: image file not found: {full!r}")
    return full

  def parsed(self, name: str, fn: Callable[[Any], Any], text: bool = False) -> Any:
    """``fn(field)`` (``text``: the field must be a string), its ValueError naming the record."""
    try:
      return fn(self.text(name) if text else self.get(name))
    except DataError:
      raise
    except ValueError as e:
      raise self.error(f"field {name!r}: {e}") from e


def _gsm8k(r: _Record) -> Example:
  return Example(r.index, r.text("question"), r.parsed("answer", scoring.gsm8k_reference, text=True), solution=r.text("answer"))


def _math(r: _Record) -> Example:
  return Example(r.index, r.text("problem"), r.parsed("solution", scoring.math_reference, text=True),
                 solution=r.text("solution"))


def _mmlu(r: _Record) -> Example:
  choices = r.strings("choices")
  target = r.parsed("answer", lambda a: scoring.choice_letter(a, len(choices)))
  subject = r.rec.get("subject") or ""
  return Example(r.index, r.text("question"), target, choices=choices, subject=str(subject))


def _arc(r: _Record) -> Example:
  c = r.get("choices")
  if not isinstance(c, dict) or "text" not in c or "label" not in c:
    raise r.error("field 'choices' must be {'text': [...], 'label': [...]}")
  texts, labels = r.strings("choices.text", c["text"]), r.strings("choices.label", c["label"])
  key = r.text("answerKey")
  if key not in labels:
    raise r.error(f"field 'answerKey' {key!r} is not one of the labels {list(labels)}")
  return Example(r.index, r.text("question"), scoring.LETTERS[labels.index(key)], choices=texts)


def _vqa(r: _Record) -> Example:
  if r.rec.get("answers") is not None:
    raw = r.get("answers")
    if isinstance(raw, list) and raw and all(isinstance(a, dict) for a in raw):
      if not all(isinstance(a.get("answer"), str) for a in raw):
        raise r.error("field 'answers': every item needs an 'answer' string")
      raw = [a["answer"] for a in raw]
    answers = r.strings("answers", raw)
  elif r.rec.get("answer") is not None:
    answers = (r.text("answer"),)
  else:
    raise r.error(f"missing field 'answers' (or 'answer') (fields: {sorted(r.rec)})")
  return Example(r.index, r.text("question"), answers[0], answers=answers, image=r.image("image"))


def _pope(r: _Record) -> Example:
  answer = r.text("answer").strip().lower()
  if answer not in ("yes", "no"):
    raise r.error(f"field 'answer' must be 'yes' or 'no', got {answer!r}")
  return Example(r.index, r.text("question"), answer, image=r.image("image"))


def _options(v: Any) -> Any:
  if isinstance(v, str):
    try:
      v = json.loads(v)
    except json.JSONDecodeError:
      try:
        v = ast.literal_eval(v)
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"not a list of options: {v!r:.80}") from e
  return v


def _mmmu(r: _Record) -> Example:
  extra = [k for k in r.rec if k.startswith("image_") and k != "image_1" and r.rec[k] is not None]
  if extra:
    raise r.error(f"has more images than 'image_1' ({sorted(extra)}): only one image per prompt is supported")
  choices = r.strings("options", r.parsed("options", _options))
  target = r.parsed("answer", lambda a: scoring.choice_letter(a, len(choices)))
  return Example(r.index, r.text("question"), target, choices=choices, image=r.image("image_1"))


def _index(r: _Record, name: str, n: int, base: int = 0) -> str:
  """The letter of field ``name``, an index (int or digit string) counted from ``base``, of ``n`` choices."""
  def letter(v: Any) -> str:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
      v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"must be an index (int or digit string), got {v!r:.40}")
    if not 0 <= v - base < n:
      raise ValueError(f"index {v} is outside the {n} choices (counted from {base})")
    return scoring.LETTERS[v - base]
  return r.parsed(name, letter)


def hellaswag_preprocess(text: str) -> str:
  """HellaSwag's text cleaning: stripped, `` [title]`` → ``. ``, other ``[...]`` removed, double spaces single."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(r: _Record) -> Example:
  if r.rec.get("ctx_a") is not None and r.rec.get("ctx_b") is not None:
    b = r.text("ctx_b")
    ctx = r.text("ctx_a") + " " + b[:1].upper() + b[1:]
  else:
    ctx = r.text("ctx")
  label = r.rec.get("activity_label")
  query = hellaswag_preprocess(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)
  endings = tuple(hellaswag_preprocess(e) for e in r.strings("endings"))
  return Example(r.index, query, _index(r, "label", len(endings)), choices=endings)


def _piqa(r: _Record) -> Example:
  choices = (r.text("sol1"), r.text("sol2"))
  return Example(r.index, r.text("goal"), _index(r, "label", 2), choices=choices)


def _winogrande(r: _Record) -> Example:
  sentence = r.text("sentence")
  if sentence.count("_") != 1:
    raise r.error(f"field 'sentence' must hold exactly one '_' blank, got {sentence!r:.80}")
  choices = (r.text("option1"), r.text("option2"))
  return Example(r.index, sentence, _index(r, "answer", 2, base=1), choices=choices)


def _targets(r: _Record, name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
  t = r.get(name)
  if not isinstance(t, dict) or "choices" not in t or "labels" not in t:
    raise r.error(f"field {name!r} must be {{'choices': [...], 'labels': [...]}}")
  choices = r.strings(f"{name}.choices", t["choices"])
  labels = t["labels"]
  if not isinstance(labels, (list, tuple)) or len(labels) != len(choices) or any(x not in (0, 1) for x in labels):
    raise r.error(f"field '{name}.labels' must be one 0/1 per choice, got {labels!r:.80}")
  return choices, tuple(int(x) for x in labels)


def _truthfulqa(r: _Record) -> Example:
  choices, labels = _targets(r, "mc1_targets")
  if sum(labels) != 1:
    raise r.error(f"field 'mc1_targets.labels' must mark exactly one true answer, got {list(labels)}")
  mc2 = None
  if r.rec.get("mc2_targets") is not None:
    mc2 = _targets(r, "mc2_targets")
    if 0 not in mc2[1] or 1 not in mc2[1] or list(mc2[1]) != sorted(mc2[1], reverse=True):
      raise r.error("field 'mc2_targets.labels' must list the true answers (1) first, then the false ones (0)")
  return Example(r.index, r.text("question"), scoring.LETTERS[labels.index(1)], choices=choices, mc2=mc2)


def _gpqa(r: _Record) -> Example:
  choices = r.strings("choices")
  target = r.parsed("answer", lambda a: scoring.choice_letter(a, len(choices)))
  return Example(r.index, r.text("question"), target, choices=choices)


def _lettered(question: str, answer: str) -> Callable[[_Record], Example]:
  """Records with the options in fields ``A`` .. ``D`` (CMMLU, C-Eval)."""
  def read(r: _Record) -> Example:
    choices = tuple(r.text(k) for k in "ABCD")
    target = r.parsed(answer, lambda a: scoring.choice_letter(a, 4), text=True)
    return Example(r.index, r.text(question), target, choices=choices, subject=str(r.rec.get("subject") or ""))
  return read


FORMATS: dict[str, Callable[[_Record], Example]] = {
    "gsm8k": _gsm8k, "math": _math, "mmlu": _mmlu, "arc": _arc, "vqa": _vqa, "pope": _pope, "mmmu": _mmmu,
    "hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande, "truthfulqa": _truthfulqa, "gpqa": _gpqa,
    "cmmlu": _lettered("Question", "Answer"), "ceval": _lettered("question", "answer")}


def read_examples(fmt: str, path: str, limit: int | None = None) -> list[Example]:
  """The first ``limit`` (None: all) examples of ``path`` read by format ``fmt`` (:data:`FORMATS`)."""
  if fmt not in FORMATS:
    raise DataError(f"unknown data format {fmt!r}; known: {sorted(FORMATS)}")
  records = read_records(path)
  if limit is not None:
    records = records[:limit]
  return [FORMATS[fmt](_Record(rec, path, i)) for i, rec in enumerate(records)]

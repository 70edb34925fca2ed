"""Benchmark readers: JSON lines and parquet, the benchmarks' field names, errors naming the record."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmada_jax.eval import data


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _png() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_gsm8k_math_mmlu_arc(tmp_path):
  ex = data.read_examples("gsm8k", _jsonl(tmp_path / "g.jsonl", [{"question": "q1", "answer": "x\n#### 1,234"},
                                                                  {"question": "q2", "answer": "#### 5"}]))
  assert [(e.index, e.question, e.target) for e in ex] == [(0, "q1", "1234"), (1, "q2", "5")]
  ex = data.read_examples("math", _jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "so \\boxed{\\frac12}"}]))
  assert ex[0].target == "\\frac12"
  ex = data.read_examples("mmlu", _jsonl(tmp_path / "u.jsonl", [
      {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "anatomy"}]))
  assert ex[0].target == "C" and ex[0].choices == ("a", "b", "c", "d") and ex[0].subject == "anatomy"
  ex = data.read_examples("arc", _jsonl(tmp_path / "a.jsonl", [
      {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"}]))
  assert ex[0].target == "B" and ex[0].choices == ("x", "y", "z")
  assert len(data.read_examples("gsm8k", str(tmp_path / "g.jsonl"), limit=1)) == 1


def test_images_parquet_and_paths(tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.png").write_bytes(_png())
  rows = [{"image": "imgs/a.png", "question": "what?", "answers": [{"answer": "two"}] * 10},
          {"image": {"path": str(tmp_path / "imgs" / "a.png")}, "question": "q", "answer": "cat"}]
  pq.write_table(pa.Table.from_pylist([{"image": {"bytes": _png(), "path": None}, "question": "q", "answer": "cat"}]),
                 tmp_path / "v.parquet")
  ex = data.read_examples("vqa", _jsonl(tmp_path / "v.jsonl", rows))
  assert ex[0].image == str(tmp_path / "imgs" / "a.png") and ex[0].answers == ("two",) * 10
  assert ex[1].image == str(tmp_path / "imgs" / "a.png") and ex[1].answers == ("cat",)
  ex = data.read_examples("vqa", str(tmp_path / "v.parquet"))
  assert isinstance(ex[0].image, bytes) and ex[0].target == "cat"
  ex = data.read_examples("pope", _jsonl(tmp_path / "p.jsonl", [{"image": "imgs/a.png", "question": "q", "answer": "Yes"}]))
  assert ex[0].target == "yes"
  ex = data.read_examples("mmmu", _jsonl(tmp_path / "mm.jsonl", [
      {"image_1": "imgs/a.png", "image_2": None, "question": "q", "options": "['1', '2']", "answer": "B"}]))
  assert ex[0].choices == ("1", "2") and ex[0].target == "B"


def test_errors_name_the_field_file_and_record(tmp_path):
  path = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
  with pytest.raises(data.DataError, match=r"g\.jsonl: record 1: missing field 'answer'"):
    data.read_examples("gsm8k", path)
  path = _jsonl(tmp_path / "g2.jsonl", [{"question": "q", "answer": "no final"}])
  with pytest.raises(data.DataError, match=r"g2\.jsonl: record 0: field 'answer': GSM8K answer has no"):
    data.read_examples("gsm8k", path)
  path = _jsonl(tmp_path / "v.jsonl", [{"image": "missing.png", "question": "q", "answer": "a"}])
  with pytest.raises(data.DataError, match=r"v\.jsonl: record 0: field 'image': image file not found"):
    data.read_examples("vqa", path)
  path = _jsonl(tmp_path / "u.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
  with pytest.raises(data.DataError, match=r"u\.jsonl: record 0: field 'answer'.*outside the 2 choices"):
    data.read_examples("mmlu", path)
  path = _jsonl(tmp_path / "p.jsonl", [{"image": "x.png", "question": "q", "answer": "maybe"}])
  with pytest.raises(data.DataError, match=r"record 0: field 'answer' must be 'yes' or 'no'"):
    data.read_examples("pope", path)
  (tmp_path / "bad.jsonl").write_text('{"question": 1}\nnot json\n')
  with pytest.raises(data.DataError, match=r"bad\.jsonl:2: not a JSON object"):
    data.read_records(str(tmp_path / "bad.jsonl"))
  with pytest.raises(data.DataError, match="unknown data format"):
    data.read_records(_jsonl(tmp_path / "x.csv", []))
  with pytest.raises(data.DataError, match="data file not found"):
    data.read_records(str(tmp_path / "nope.jsonl"))


LIKELIHOOD_FORMATS = {
    # format: (a record with the dataset's own field names, question, choices, target, a required field)
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "A man cracks eggs.", "ctx_b": "he [header] stirs",
                   "ctx": "unused", "endings": ["whisks them.", "sleeps [title] now."], "label": "1"},
                  "Baking: A man cracks eggs. He stirs", ("whisks them.", "sleeps. now."), "B", "endings"),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bake it", "label": 0},
             "Open a jar", ("twist the lid", "bake it"), "A", "sol2"),
    "winogrande": ({"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                    "option2": "the table", "answer": "2"},
                   "The cup fell off the table because _ was wobbly.", ("the cup", "the table"), "B", "option1"),
    "truthfulqa": ({"question": "Is the sky green?", "mc1_targets": {"choices": ["No", "Yes"], "labels": [1, 0]},
                    "mc2_targets": {"choices": ["No", "Never", "Yes"], "labels": [1, 1, 0]}},
                   "Is the sky green?", ("No", "Yes"), "A", "mc1_targets"),
    "gpqa": ({"question": "Which is a noble gas?", "choices": ["N", "Ne", "Na", "Ni"], "answer": 1},
             "Which is a noble gas?", ("N", "Ne", "Na", "Ni"), "B", "choices"),
    "cmmlu": ({"Question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "B", "subject": "数学"},
              "1+1=?", ("1", "2", "3", "4"), "B", "D"),
    "ceval": ({"question": "2+2=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D"},
              "2+2=?", ("1", "2", "3", "4"), "D", "answer"),
}


@pytest.mark.parametrize("fmt", sorted(LIKELIHOOD_FORMATS))
def test_likelihood_formats_map_their_fields(tmp_path, fmt):
  rec, question, choices, target, required = LIKELIHOOD_FORMATS[fmt]
  (ex,) = data.read_examples(fmt, _jsonl(tmp_path / f"{fmt}.jsonl", [rec]))
  assert (ex.question, ex.choices, ex.target) == (question, choices, target)
  if fmt == "truthfulqa":
    assert ex.mc2 == (("No", "Never", "Yes"), (1, 1, 0))
  if fmt == "cmmlu":
    assert ex.subject == "数学"
  bad = {k: v for k, v in rec.items() if k != required and not (fmt == "hellaswag" and k.startswith("ctx"))}
  path = _jsonl(tmp_path / f"{fmt}_bad.jsonl", [rec, bad])
  missing = "ctx" if fmt == "hellaswag" else required
  with pytest.raises(data.DataError, match=rf"{fmt}_bad\.jsonl: record 1: missing field '{missing}'"):
    data.read_examples(fmt, path)


def test_likelihood_format_value_errors(tmp_path):
  cases = [("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
            "exactly one '_' blank"),
           ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}, "outside the 2"),
           ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": "x"}, "must be an index"),
           ("truthfulqa", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}},
            "exactly one true answer"),
           ("truthfulqa", {"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]},
                           "mc2_targets": {"choices": ["a", "b"], "labels": [0, 1]}}, "true answers .1. first"),
           ("ceval", {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "E"}, "outside the 4")]
  for k, (fmt, rec, msg) in enumerate(cases):
    with pytest.raises(data.DataError, match=rf"record 0: .*{msg}"):
      data.read_examples(fmt, _jsonl(tmp_path / f"{k}.jsonl", [rec]))


def test_likelihood_prompts_and_requests():
  from mmada_jax.eval import runner
  wino = data.Example(0, "The cup fell because _ was wobbly.", "B", choices=("the cup", "the table"))
  shot = data.Example(1, "Tom thanked Ann because _ helped.", "B", choices=("Tom", "Ann"))
  prompt = runner.render("winogrande", wino, [shot])
  assert prompt == "Tom thanked Ann because Ann helped.\n\nThe cup fell because _ was wobbly."
  assert runner.requests("winogrande", wino, prompt) == [
      ("Tom thanked Ann because Ann helped.\n\nThe cup fell because the cup", " was wobbly."),
      ("Tom thanked Ann because Ann helped.\n\nThe cup fell because the table", " was wobbly.")]
  gpqa = data.Example(0, "Which?", "B", choices=("w", "x", "y", "z"))
  prompt = runner.render("gpqa", gpqa, [gpqa])
  assert prompt.startswith(runner.GPQA_DESCRIPTION
                           + "Question: Which?\nChoices:\n(A) w\n(B) x\n(C) y\n(D) z\nAnswer: (B)")
  assert [c for _, c in runner.requests("gpqa", gpqa, prompt)] == [" (A)", " (B)", " (C)", " (D)"]
  cm = data.Example(0, "1+1=?", "B", choices=("1", "2", "3", "4"), subject="数学")
  assert runner.render("cmmlu", cm, []) == ("以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n"
                                             "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
  tq = data.Example(0, "Is the sky green?", "A", choices=("No", "Yes"))
  assert runner.render("truthfulqa", tq, []).endswith("Barcelona, Spain.\n\nQ: Is the sky green?\nA:")
  piqa = data.Example(0, "Open a jar", "A", choices=("twist", "bake"))
  assert runner.requests("piqa", piqa, runner.render("piqa", piqa, [])) == [
      ("Question: Open a jar\nAnswer:", " twist"), ("Question: Open a jar\nAnswer:", " bake")]


def _save_to_disk(folder, shards):
  """A ``Dataset.save_to_disk`` folder as ``datasets`` writes it: Arrow stream shards + state.json."""
  folder.mkdir()
  names = []
  for i, rows in enumerate(shards):
    name = f"data-{i:05d}-of-{len(shards):05d}.arrow"
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
      w.write_table(table)
    names.append({"filename": name})
  (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": "test"}))
  (folder / "dataset_info.json").write_text("{}")
  return str(folder)


def test_save_to_disk_folders(tmp_path):
  rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
  path = _save_to_disk(tmp_path / "gsm8k", [rows[:3], rows[3:]])       # two shards, read in order
  assert [(e.question, e.target) for e in data.read_examples("gsm8k", path)] == [(f"q{i}", str(i)) for i in range(5)]
  img = _save_to_disk(tmp_path / "pope", [[{"image": {"bytes": _png(), "path": None}, "question": "a cat?",
                                            "answer": "no"}]])
  (ex,) = data.read_examples("pope", img)
  assert ex.image == _png()
  dd = tmp_path / "dd"
  dd.mkdir()
  (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
  with pytest.raises(data.DataError, match="DatasetDict.*splits.*train"):
    data.read_records(str(dd))
  (tmp_path / "plain").mkdir()
  with pytest.raises(data.DataError, match="not a saved dataset"):
    data.read_records(str(tmp_path / "plain"))
  (tmp_path / "gsm8k" / "data-00001-of-00002.arrow").write_bytes(b"junk")
  with pytest.raises(data.DataError, match="not an Arrow stream"):
    data.read_records(path)
  bad = _save_to_disk(tmp_path / "bad", [[{"question": "q"}]])
  with pytest.raises(data.DataError, match="record 0.*missing field 'answer'"):
    data.read_examples("gsm8k", bad)

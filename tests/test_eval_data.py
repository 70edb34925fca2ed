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

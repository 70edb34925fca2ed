"""JSON lines files: one object per line, errors that name the file and the line."""
from __future__ import annotations

import json
from typing import Any, Iterator


def read_json_lines(path: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for every non-blank line of ``path``; a line that is not a JSON object
  raises ``error("PATH:LINE: ...")``."""
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{line_no}: not a JSON object ({e})") from e
      if not isinstance(rec, dict):
        raise error(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
      yield line_no, rec

"""Entry point: ``python -m mmada_jax.eval --config=configs/eval.py:TASK --workdir=OUT``.

  python -m mmada_jax.eval --config=configs/eval.py:gsm8k --workdir=/tmp/gsm8k \\
      --config.model=DIR --config.text_tokenizer=TOK --config.data=test.jsonl \\
      --config.fewshot_data=train.jsonl --config.limit=100

Every setting is a config key (``--config.KEY=VALUE``; ``mmada_jax.eval.config.EvalConfig``); the
config is locked, so an unknown key fails at once. Writes ``OUT/results.json``,
``OUT/samples.jsonl`` and prints a markdown table; rerunning the same command resumes.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from mmada_jax.train.config_files import parse_config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (path:task[,key=value...]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json and samples.jsonl.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/eval.py:gsm8k")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  from mmada_jax.eval.data import DataError
  from mmada_jax.eval.runner import markdown, run
  try:
    result = run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(markdown(result))
  print(json.dumps({"results": f"{_WORKDIR.value}/results.json", "wall_s": round(result["wall_s"], 2)}))


if __name__ == "__main__":
  from mmada_jax.eval.config import EvalConfig
  app.run(main, flags_parser=lambda argv: parse_config_flags(argv, EvalConfig))

"""Entry point: ``python -m mmada_jax.eval --config=configs/eval.py:TASK --workdir=OUT``.

  python -m mmada_jax.eval --config=configs/eval.py:gsm8k --workdir=/tmp/gsm8k \\
      --config.model=DIR --config.text_tokenizer=TOK --config.data=test.jsonl \\
      --config.fewshot_data=train.jsonl --config.limit=100

Every setting is a config key (``--config.KEY=VALUE``; ``mmada_jax.eval.config.EvalConfig``); the
config is locked, so an unknown key fails at once. Writes ``OUT/results.json``,
``OUT/samples.jsonl`` and prints a markdown table; rerunning the same command resumes.

Many hosts: start the same command on every host with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or the ``MMADA_COORDINATOR_ADDRESS`` / ``MMADA_NUM_PROCESSES``
/ ``MMADA_PROCESS_ID`` environment variables; multi-host TPU, SLURM and Open MPI are detected, as
for the trainer: :mod:`mmada_jax.train.distributed`). Each process evaluates a disjoint slice of
the examples; process 0 writes the files and prints the table (:mod:`mmada_jax.eval.runner`).
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
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "jax.distributed coordinator HOST:PORT (many hosts).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/eval.py:gsm8k")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  from mmada_jax.train.distributed import DistributedConfig, maybe_initialize
  try:          # before anything touches a JAX backend
    maybe_initialize(DistributedConfig(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                       process_id=_PROCESS_ID.value))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  from mmada_jax.eval.data import DataError
  from mmada_jax.eval.runner import markdown, run
  try:
    result = run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() != 0:
    return
  print(markdown(result))
  print(json.dumps({"results": f"{_WORKDIR.value}/results.json", "wall_s": round(result["wall_s"], 2)}))


if __name__ == "__main__":
  from mmada_jax.host import reexec_with_huge_pages
  reexec_with_huge_pages()   # XLA:CPU temporaries on huge pages (mmada_jax/host.py)
  from mmada_jax.eval.config import EvalConfig
  app.run(main, flags_parser=lambda argv: parse_config_flags(argv, EvalConfig))

"""Entry point: ``python -m mmada_jax.train --config=configs/tiny.py:pretrain --workdir=DIR``.

Any config field can be overridden (``--config.steps=100``, ``--config.mesh_shape=fsdp=4,tensor=2``,
``--config.optimizer.lr=1e-5``); the config is locked, so an unknown key fails at once, naming it.
Re-running the same command resumes from the newest checkpoint in ``DIR/checkpoints``.
``--config=configs/NAME.py`` is read from the working directory when it is there, else the preset
of that name installed with the package (``mmada_jax.configs``).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmada_jax.train.config_files import parse_config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py:pretrain")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
  from mmada_jax.train.checkpointing import RestoreError
  from mmada_jax.train.trainer import run
  try:
    code = run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, RestoreError) as e:   # RestoreError: a checkpoint that cannot resume
    logging.getLogger("mmada_jax").debug("start-up failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code)


if __name__ == "__main__":
  from mmada_jax.host import reexec_with_huge_pages
  reexec_with_huge_pages()   # XLA:CPU temporaries on huge pages (mmada_jax/host.py)
  from mmada_jax.train.config import TrainConfig
  app.run(main, flags_parser=lambda argv: parse_config_flags(argv, TrainConfig))

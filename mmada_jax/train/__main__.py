"""Entry point: ``python -m mmada_jax.train --config=configs/tiny.py:pretrain --workdir=DIR``.

Any config field can be overridden (``--config.steps=100``, ``--config.mesh_shape=fsdp=4,tensor=2``,
``--config.optimizer.lr=1e-5``); the config is locked, so an unknown key fails at once, naming it.
Re-running the same command resumes from the newest checkpoint in ``DIR/checkpoints``.
``--config=configs/NAME.py`` is read from the working directory when it is there, else the preset
of that name installed with the package (``mmada_jax.configs``).
"""
from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error for unknown or malformed config overrides; a
  ``--config=`` path that is not in the working directory names a packaged preset
  (``mmada_jax.train.config_files``)."""
  from mmada_jax.train.config_files import resolve_config_argv
  try:
    argv = resolve_config_argv(argv)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    inner: BaseException = e
    while inner.args and isinstance(inner.args[0], BaseException):
      inner = inner.args[0]
    text = str(inner.args[0]) if inner.args else str(inner)
    found = re.search(r"'(\w+)'", text)
    name = found.group(1) if found else text
    hint = re.search(r"Did you mean \S+ instead of \S+\?", text)
    bad = [a.split("=", 1)[0][2:] for a in argv[1:]
           if a.startswith("--config.") and name in a.split("=", 1)[0][len("--config."):].split(".")]
    key = bad[0] if bad else f"config.{name}"
    new = _renamed(key)
    if new is not None:
      print(f"error: config key {key!r} was renamed to {new!r}", file=sys.stderr)
      sys.exit(2)
    print(f"error: unknown config key {key!r}: the config has no field {name!r}"
          + (f" ({hint.group(0)})" if hint else ""), file=sys.stderr)
    sys.exit(2)
  except (flags.Error, ValueError, TypeError) as e:   # e.g. an unknown config variant or a bad value
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _renamed(key: str) -> str | None:
  """``config.a.b``'s new name when the schema records it as renamed, else None."""
  from mmada_jax.config_schema import renamed_key
  from mmada_jax.train.config import TrainConfig
  new = renamed_key(TrainConfig, key.removeprefix("config."))
  return None if new is None else f"config.{new}"


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
  app.run(main, flags_parser=_parse_flags)

"""Directories written whole or not at all: a staging folder renamed into place when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields ``path + ".partial"`` (empty) to write into; on a clean exit it replaces ``path``.

  An existing non-empty ``path`` is refused (``FileExistsError``) unless ``overwrite``; the check
  runs before anything is written. On any error the staging folder is removed and ``path`` is
  left as it was.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
  tmp = path + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

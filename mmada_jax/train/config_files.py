"""Config files named by ``--config=PATH[:ARG]``: a path in the working directory, else a preset
shipped with the package.

The experiment configs live in the checkout's top-level ``configs/`` and are installed as the
package ``mmada_jax.configs`` (setup.py's ``package_dir``). ``configs/tiny.py`` (or ``tiny.py``)
names the file relative to the working directory when it exists there; otherwise the packaged
file of that name, so ``--config=configs/tiny.py:pretrain`` works from any directory once the
package is installed (editable or as a wheel).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

PACKAGED = "mmada_jax.configs"


def packaged_config_dir() -> str:
  """The directory of the installed ``mmada_jax.configs`` (the checkout's ``configs/`` in an
  editable install), found without importing the configs."""
  spec = importlib.util.find_spec(PACKAGED)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the package {PACKAGED} is not installed: install mmada_jax "
                            "(pip install -e . in a checkout, or the wheel)")
  return os.path.abspath(list(spec.submodule_search_locations)[0])


def packaged_presets() -> list[str]:
  """The packaged config files, as ``configs/<name>.py``."""
  return sorted(f"configs/{f}" for f in os.listdir(packaged_config_dir())
                if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def resolve_config_path(path: str) -> str:
  """``path`` if it is a file; else, for ``configs/NAME.py`` or ``NAME.py``, the packaged
  ``NAME.py``. A missing file is a FileNotFoundError naming every place tried."""
  if os.path.isfile(path):
    return path
  tried = [os.path.abspath(path)]
  parts = os.path.normpath(path).split(os.sep)
  if not os.path.isabs(path) and parts[-1].endswith(".py") and (
      len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs")):
    try:
      candidate = os.path.join(packaged_config_dir(), parts[-1])
    except FileNotFoundError as e:
      tried.append(str(e))
    else:
      if os.path.isfile(candidate):
        return candidate
      tried.append(f"{candidate} (packaged presets: {', '.join(packaged_presets())})")
  raise FileNotFoundError(f"config file not found: {path!r}; tried " + "; ".join(tried))


def split_spec(spec: str) -> tuple[str, str]:
  """``"path/to/file.py:arg"`` -> (``"path/to/file.py"``, ``"arg"``); no ``.py:`` -> (spec, "")."""
  path, sep, arg = spec.partition(".py:")
  return (path + ".py", arg) if sep else (spec, "")


def resolve_config_spec(spec: str) -> str:
  """``PATH[:ARG]`` with PATH resolved by :func:`resolve_config_path`."""
  path, arg = split_spec(spec)
  resolved = resolve_config_path(path)
  return f"{resolved}:{arg}" if arg else resolved


def resolve_config_argv(argv: list[str], flag: str = "config") -> list[str]:
  """``argv`` with the value of ``--FLAG=SPEC`` / ``--FLAG SPEC`` resolved (what absl's
  ml_collections config flag then loads); ``--FLAG.field=...`` overrides are left alone."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith(f"--{flag}="):
      out[i] = f"--{flag}=" + resolve_config_spec(a[len(flag) + 3:])
    elif a == f"--{flag}" and i + 1 < len(out):
      out[i + 1] = resolve_config_spec(out[i + 1])
  return out


def load_config_file(spec: str):
  """``path/to/config.py[:arg]`` -> that file's ``get_config(arg)`` (what ``--config=`` names;
  the path is resolved by :func:`resolve_config_path`)."""
  path, arg = split_spec(spec)
  path = resolve_config_path(path)
  module_spec = importlib.util.spec_from_file_location("mmada_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_config_flags(argv: list[str], schema: type) -> list[str]:
  """absl flag parsing with a one-line error for unknown or malformed config overrides; a
  ``--config=`` path that is not in the working directory names a packaged preset
  (:func:`resolve_config_argv`); ``schema`` is the config's dataclass, whose renamed keys are
  named. For ``absl.app.run(main, flags_parser=...)``; exits 2 with the message on a bad flag."""
  from absl import flags
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
    new = _renamed(schema, key)
    if new is not None:
      print(f"error: config key {key!r} was renamed to {new!r}", file=sys.stderr)
      sys.exit(2)
    print(f"error: unknown config key {key!r}: the config has no field {name!r}"
          + (f" ({hint.group(0)})" if hint else ""), file=sys.stderr)
    sys.exit(2)
  except (flags.Error, ValueError, TypeError) as e:   # e.g. an unknown config variant or a bad value
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _renamed(schema: type, key: str) -> str | None:
  """``config.a.b``'s new name when ``schema`` records it as renamed, else None."""
  from mmada_jax.config_schema import renamed_key
  new = renamed_key(schema, key.removeprefix("config."))
  return None if new is None else f"config.{new}"

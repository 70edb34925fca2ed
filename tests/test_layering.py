"""The import layering of docs/architecture.md holds: no module imports a layer above it.

The layer table is read from the document itself, so the document and the code cannot drift
apart: every package of ``mmada_jax`` (and the top-level ``configs``) must appear in exactly one
row, and every import (module level or inside a function) must point to the same package, a
lower layer, or a package listed earlier in the same row.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "architecture.md")
PKG = os.path.join(ROOT, "mmada_jax")
ROOT_PACKAGE = "<root>"   # mmada_jax/__init__.py


def read_layers() -> dict[str, tuple[int, int]]:
  """package -> (layer, position in its row) from the table rows ``| N | `a`, `b` | ...``."""
  out: dict[str, tuple[int, int]] = {}
  for line in open(DOC, encoding="utf-8"):
    m = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
    if not m:
      continue
    layer, cell = int(m.group(1)), m.group(2)
    names = re.findall(r"`([a-z_]+)`|(package root)", cell)
    names = [ROOT_PACKAGE if root else name for name, root in names]
    for i, name in enumerate(names):
      assert name not in out, f"docs/architecture.md lists package {name!r} twice"
      out[name] = (layer, i)
  assert out, "docs/architecture.md has no layer table"
  return out


def package_of(module: str) -> str:
  """``mmada_jax.train.trainer`` -> ``train``; ``mmada_jax.configs.tiny`` / ``configs.tiny`` ->
  ``configs``; ``mmada_jax`` -> the root."""
  parts = module.split(".")
  if parts[0] == "configs":
    return "configs"
  return parts[1] if len(parts) > 1 else ROOT_PACKAGE


def source_modules() -> list[tuple[str, str]]:
  """(dotted module name, path) for every module of the package and of ``configs/``."""
  out = []
  for base, prefix in ((PKG, "mmada_jax"), (os.path.join(ROOT, "configs"), "configs")):
    for dirpath, dirnames, filenames in os.walk(base):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for f in filenames:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
          mod = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
          out.append((mod, path))
  return out


def imports_of(module: str, path: str) -> list[tuple[str, int]]:
  """Every ``mmada_jax`` / ``configs`` module that ``path`` imports, with its line number."""
  tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
  is_pkg = path.endswith("__init__.py")
  package = module if is_pkg else module.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      found.append((target, node.lineno))
  return [(t, n) for t, n in found if t.split(".")[0] in ("mmada_jax", "configs")]


def test_every_package_has_a_layer():
  layers = read_layers()
  packages = {package_of(m) for m, _ in source_modules()}
  missing = sorted(packages - set(layers))
  assert not missing, f"packages missing from docs/architecture.md's layer table: {missing}"


def test_no_module_imports_a_layer_above_it():
  layers = read_layers()
  bad = []
  for module, path in source_modules():
    src = package_of(module)
    for target, line in imports_of(module, path):
      dst = package_of(target)
      if dst == src or dst not in layers or src not in layers:
        continue
      (ls, ps), (ld, pd) = layers[src], layers[dst]
      if ld > ls or (ld == ls and pd > ps):
        bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {src} (layer {ls}) imports {target} "
                   f"({dst}, layer {ld})")
  assert not bad, "upward imports (see docs/architecture.md):\n  " + "\n  ".join(bad)


def test_layer_checker_catches_an_upward_import(tmp_path):
  """The scanner sees imports inside functions and relative imports (so the test can fail)."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from ..train import trainer\n  import mmada_jax.api.model\n")
  got = [t for t, _ in imports_of("mmada_jax.model.m", str(f))]
  assert got == ["mmada_jax.train", "mmada_jax.api.model"]
  assert package_of("mmada_jax.train") == "train"
  layers = read_layers()
  assert layers["train"][0] > layers["model"][0]


@pytest.mark.parametrize("name", ["sharding", "model", "api", "train", "demo"])
def test_documented_layers_exist(name):
  assert name in read_layers()

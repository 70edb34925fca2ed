"""The config schema cannot drift from the experiment configs or from the code that reads them.

The schema is :class:`mmada_jax.train.config.TrainConfig` and its section dataclasses.

1. **Configs ⊆ schema**: every variant of every file in ``configs/`` (each file's ``VARIANTS``)
   parses into the schema: no key that the schema lacks, no value of the wrong type.
2. **Schema ⊆ reads**: every field of every section is read somewhere in ``mmada_jax/`` or
   ``bench/`` (outside the section's ``__post_init__`` checks).
3. **Reads ⊆ schema**: every key the code reads on a config object (``config.<section>.<key>``,
   ``.get("key")``, ``["key"]``, ``getattr(sec, "key")``, ``"key" in sec``, on the ConfigDict or
   the parsed dataclass) is in the schema, and no read repeats a default (``.get(key, default)``:
   the dataclass is the only place a default lives).

Reads are found by :class:`ConfigReads`, a static, flow-insensitive analysis of the sources: a
value is known to be a config section from ``config`` parameters (the whole config; also the few
names of :data:`NAMED_SECTIONS`), annotations naming a section dataclass, ``parse(Section, …)`` /
``Section(…)`` / functions returning one (annotated or by their ``return``), attribute and key
access on a known section (constant keys; loops over constant tuples such as ``TASKS`` resolve
``config.data[task]``; a key it cannot name reaches every sub-section), assignments (also to
``self.x``), and call arguments bound to the callee's parameters, iterated to a fixed point.
A read through a union of sections (``data_cfg[task]``) is defined when one of them has the key.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import typing
from typing import Any, Iterable

import pytest

from mmada_jax import config_schema as cs
from mmada_jax.eval.config import EvalConfig
from mmada_jax.train.config import TrainConfig, parse_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("mmada_jax", "bench")
SKIPPED = {"mmada_jax/config_schema.py"}   # generic helpers: they iterate fields, they read none
PARSE = "mmada_jax.config_schema.parse"
CONFIGDICT_API = {"get", "to_dict", "keys", "values", "items", "to_json", "to_json_best_effort", "to_yaml",
                  "copy_and_resolve_references", "lock", "unlock", "unlocked", "update", "ignore_type",
                  "is_locked", "is_type_safe", "get_ref", "get_oneway_ref"}
PASSTHROUGH = {"dict", "list", "tuple", "sorted", "reversed", "iter", "next"}
CONFIG_LIKE = {"ConfigDict", "ml_collections", "Any", "Mapping", "dict", "Optional", "None"}
NAMED_SECTIONS = {"config": "", "rl": "rl", "data_cfg": "data", "toy_cfg": "toy"}
"""A parameter of these names (unannotated or ``ConfigDict`` / ``Any``, and bound by nothing
else) is that section of the root: the convention of callbacks the analysis cannot follow (e.g.
``rl.rewards.REWARDS``' factories ``lambda rl: …``)."""

# ----------------------------------------------------------------------------- the schema


def schema_classes(root: type) -> dict[str, type]:
  """``{"module.Qualname": cls}`` of ``root`` and every section below it (plugin ones resolved)."""
  out: dict[str, type] = {}

  def walk(cls: type) -> None:
    qn = f"{cls.__module__}.{cls.__qualname__}"
    if qn in out:
      return
    out[qn] = cls
    for base in cls.__mro__[1:]:
      if cs.is_section(base):
        walk(base)
    for tp in cs.field_types(cls).values():
      for sub in _section_types(tp):
        walk(sub)
  walk(root)
  return out


def _section_types(tp: Any) -> list[type]:
  if isinstance(tp, cs.Plugin):
    return [tp.resolve()]
  inner, _ = cs.optional_inner(tp)
  if cs.is_section(inner):
    return [inner]
  args = typing.get_args(inner)
  if typing.get_origin(inner) in (list, tuple) and args and cs.is_section(args[0]):
    return [args[0]]
  return []


def schema_paths(root: type, prefix: str = "config") -> dict[tuple[type, str], str]:
  """``{(section class, field): "config.dotted.path"}`` for every field under ``root``."""
  out: dict[tuple[type, str], str] = {}
  for name, tp in cs.field_types(root).items():
    path = f"{prefix}.{name}"
    out.setdefault((root, name), path)
    inner = tp.resolve() if isinstance(tp, cs.Plugin) else cs.optional_inner(tp)[0]
    for sub in _section_types(tp):
      item = "[]" if typing.get_origin(inner) in (list, tuple) else ""
      for k, v in schema_paths(sub, path + item).items():
        out.setdefault(k, v)
  return out


# ----------------------------------------------------------------------------- the analysis

Atom = tuple  # ("sec", cls) | ("list", cls) | ("obj", class qn) | ("name", qn) | ("const", str)
#               | ("consts", tuple[str, ...]) | ("method", cls, name)


@dataclasses.dataclass
class _Func:
  qn: str
  node: ast.AST
  module: "_Module"
  cls: str | None          # qualified name of the enclosing class (methods)
  parent: "_Func | None"   # enclosing function (closures)
  env: dict[str, set] = dataclasses.field(default_factory=dict)

  def params(self) -> list[str]:
    a = self.node.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


@dataclasses.dataclass
class _Module:
  name: str
  path: str
  tree: ast.Module
  symbols: dict[str, str] = dataclasses.field(default_factory=dict)   # local name -> qualified name


@dataclasses.dataclass(frozen=True)
class Read:
  cls: type
  key: str
  where: str


class ConfigReads:
  """The config reads of ``sources`` (``[(module name, source text, path for messages)]``)
  against the schema below ``root`` (see the module docstring)."""

  def __init__(self, root: type, sources: Iterable[tuple[str, str, str]]):
    self.root = root
    self.schema = schema_classes(root)
    self.modules: dict[str, _Module] = {}
    self.funcs: dict[str, _Func] = {}
    self.classes: dict[str, ast.ClassDef] = {}
    self.consts: dict[str, tuple[str, ...]] = {}
    self.binds: dict[str, dict[str, set]] = {}
    self.returns: dict[str, set] = {}
    self.attrs: dict[str, dict[str, set]] = {}
    self.reads: set[Read] = set()
    self.undefined: set[Read] = set()
    self.defaults: set[Read] = set()
    for name, text, path in sources:
      self.modules[name] = _Module(name, path, ast.parse(text, filename=path))
    for m in self.modules.values():
      self._index(m)
    for _ in range(30):
      before = self._size()
      for f in list(self.funcs.values()):
        self._analyze(f)
      if self._size() == before:
        break
    else:
      raise AssertionError("the config-read analysis did not reach a fixed point")

  def _size(self) -> int:
    n = len(self.reads) + len(self.undefined) + len(self.defaults)
    n += sum(len(v) for f in self.funcs.values() for v in f.env.values())
    n += sum(len(v) for d in self.binds.values() for v in d.values())
    n += sum(len(v) for v in self.returns.values())
    n += sum(len(v) for d in self.attrs.values() for v in d.values())
    return n

  # -- indexing -------------------------------------------------------------------------------
  def _index(self, m: _Module) -> None:
    self._index_imports(m, m)
    for node in m.tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        m.symbols[node.name] = f"{m.name}.{node.name}"
      elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        strings = _const_strings(node.value)
        if strings is not None:
          self.consts[f"{m.name}.{node.targets[0].id}"] = strings
    module_func = _Func(f"{m.name}.<module>", ast.FunctionDef(name="<module>", args=ast.arguments(
        posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=[
            n for n in m.tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))],
        decorator_list=[]), m, None, None)
    self.funcs[module_func.qn] = module_func
    self._index_body(m, m.tree.body, m.name, None, None)

  def _index_imports(self, m: _Module, where: _Module) -> None:
    """Top-level imports of ``m`` (relative ones as seen from module ``where``) into its symbols."""
    package = where.name if where.path.endswith("__init__.py") else where.name.rpartition(".")[0]
    for node in m.tree.body:
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.asname:
            m.symbols[a.asname] = a.name
          else:
            m.symbols[a.name.split(".")[0]] = a.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")
          base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        for a in node.names:
          m.symbols[a.asname or a.name] = f"{base}.{a.name}"

  def _index_body(self, m: _Module, body: list, prefix: str, cls: str | None, parent: _Func | None) -> None:
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        qn = f"{prefix}.{node.name}"
        f = _Func(qn, node, m, cls, parent)
        self.funcs[qn] = f
        self._index_body(m, node.body, f"{qn}.<locals>", None, f)
      elif isinstance(node, ast.ClassDef):
        qn = f"{prefix}.{node.name}"
        self.classes[qn] = node
        self.attrs.setdefault(qn, {})
        self._index_body(m, node.body, qn, qn, parent)
      elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
        for field in ("body", "orelse", "finalbody", "handlers"):
          for sub in getattr(node, field, []) or []:
            self._index_body(m, getattr(sub, "body", [sub]) if isinstance(sub, ast.ExceptHandler) else [sub],
                             prefix, cls, parent)

  # -- name resolution -------------------------------------------------------------------------
  def resolve(self, qn: str, depth: int = 0) -> str:
    """Follows re-exports: ``pkg.name`` imported into ``pkg`` from ``pkg.mod`` -> ``pkg.mod.name``."""
    if depth > 10 or qn in self.funcs or qn in self.classes or qn in self.schema or qn in self.modules:
      return qn
    head, _, last = qn.rpartition(".")
    head = self.resolve(head, depth + 1) if head else head
    mod = self.modules.get(head)
    if mod is not None and last in mod.symbols and mod.symbols[last] != f"{head}.{last}":
      return self.resolve(mod.symbols[last], depth + 1)
    return f"{head}.{last}" if head else qn

  def _schema_atoms(self, qn: str) -> set:
    qn = self.resolve(qn)
    return {("sec", self.schema[qn])} if qn in self.schema else set()

  def annotation_atoms(self, ann: ast.AST | None, f: _Func) -> tuple[set, bool]:
    """(atoms of an annotation, whether it could be a plain config: none, ConfigDict, Any …)."""
    if ann is None:
      return set(), True
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
      try:
        ann = ast.parse(ann.value, mode="eval").body
      except SyntaxError:
        return set(), False
    out, names = set(), set()
    for node in ast.walk(ann):
      if isinstance(node, (ast.Name, ast.Attribute)):
        dotted = _dotted(node)
        if dotted is None:
          continue
        names.add(dotted.rpartition(".")[2])
        for a in self._module_name(dotted.split(".")[0], f.module):
          if a[0] == "name":
            qn = self.resolve(".".join([a[1]] + dotted.split(".")[1:]))
            out |= self._schema_atoms(qn)
            if qn in self.classes and qn not in self.schema:
              out.add(("obj", qn))
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        sub, _ = self.annotation_atoms(node, f)
        out |= sub
    return out, not out and names <= CONFIG_LIKE

  def _lookup_name(self, name: str, f: _Func | None) -> set:
    while f is not None:
      if name in f.env:
        return f.env[name]
      f = f.parent
    return set()

  def _module_name(self, name: str, m: _Module) -> set:
    if name in m.symbols:
      return {("name", m.symbols[name])}
    return set()

  # -- per-function analysis -------------------------------------------------------------------
  def _analyze(self, f: _Func) -> None:
    node = f.node
    binds = self.binds.setdefault(f.qn, {})
    a = node.args
    params = a.posonlyargs + a.args + a.kwonlyargs
    for i, p in enumerate(params):
      atoms, config_like = self.annotation_atoms(p.annotation, f)
      atoms = atoms | binds.get(p.arg, set())
      if i == 0 and f.cls is not None and not _is_static(node):
        if _is_classmethod(node):
          atoms = {("name", f.cls)}
        elif f.cls in self.schema:
          atoms = set() if node.name == "__post_init__" else {("sec", self.schema[f.cls])}
        else:
          atoms = {("obj", f.cls)}
      elif config_like and not atoms:
        atoms = self.named_section(p.arg)
      self._bind(f, p.arg, atoms)
    for p in (a.vararg, a.kwarg):
      if p is not None:
        self._bind(f, p.arg, set())
    _Visitor(self, f).run(node.body)

  def named_section(self, name: str) -> set:
    """The section a parameter named ``name`` is by convention (:data:`NAMED_SECTIONS`)."""
    if name not in NAMED_SECTIONS:
      return set()
    cls = self.root
    for part in [p for p in NAMED_SECTIONS[name].split(".") if p]:
      tp = cs.field_types(cls).get(part)
      subs = _section_types(tp) if tp is not None else []
      if not subs:
        return set()
      cls = subs[0]
    return {("sec", cls)}

  def _bind(self, f: _Func, name: str, atoms: set) -> None:
    f.env.setdefault(name, set()).update(atoms)

  def field_atoms(self, cls: type, key: str) -> set:
    tp = cs.field_types(cls)[key]
    out = set()
    for sub in _section_types(tp):
      inner = tp if isinstance(tp, cs.Plugin) else cs.optional_inner(tp)[0]
      is_list = not isinstance(tp, cs.Plugin) and typing.get_origin(inner) in (list, tuple)
      out.add(("list", sub) if is_list else ("sec", sub))
    return out

  def read(self, atoms: set, keys: Iterable[str], node: ast.AST, f: _Func, *, default: bool = False) -> set:
    """Records reads of ``keys`` on the sections among ``atoms``; a key no section of the union
    has is an undefined read. Returns the atoms of the values read."""
    where = f"{f.module.path}:{getattr(node, 'lineno', 0)}"
    secs = sorted({a[1] for a in atoms if a[0] == "sec"}, key=lambda c: c.__qualname__)
    out = set()
    for key in keys:
      owners = [c for c in secs if key in cs.field_types(c)]
      if secs and not owners:
        self.undefined.add(Read(secs[0], key, where))
      for c in owners:
        self.reads.add(Read(c, key, where))
        if default:
          self.defaults.add(Read(c, key, where))
        out |= self.field_atoms(c, key)
    return out

  def call(self, qn: str, args: list[set], kwargs: dict[str, set], skip_first: bool) -> set:
    """Binds argument atoms to the parameters of function ``qn``; returns its result atoms."""
    f = self.funcs.get(qn)
    if f is None:
      return set()
    params = f.params()[1:] if skip_first else f.params()
    binds = self.binds.setdefault(qn, {})
    for p, atoms in list(zip(params, args)) + [(k, v) for k, v in kwargs.items() if k in params]:
      binds.setdefault(p, set()).update(atoms)
    ret, _ = self.annotation_atoms(getattr(f.node, "returns", None), f.parent or self.funcs[f"{f.module.name}.<module>"])
    return ret | self.returns.get(qn, set())

  def construct(self, qn: str, args: list[set], kwargs: dict[str, set]) -> set:
    """A call of class ``qn``: the schema section, or an object whose attributes are the
    ``__init__`` (or dataclass field) arguments."""
    if qn in self.schema:
      return {("sec", self.schema[qn])}
    if f"{qn}.__init__" in self.funcs:
      self.call(f"{qn}.__init__", args, kwargs, skip_first=True)
    else:
      fields = [n.target.id for n in self.classes[qn].body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
      for name, atoms in list(zip(fields, args)) + [(k, v) for k, v in kwargs.items() if k in fields]:
        self.attrs[qn].setdefault(name, set()).update(atoms)
    return {("obj", qn)}

  def class_attr(self, qn: str, name: str) -> set:
    out = set(self.attrs.get(qn, {}).get(name, set()))
    node = self.classes.get(qn)
    if node is not None:
      for n in node.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == name:
          module = self.modules[_module_of(qn, self.modules)]
          atoms, config_like = self.annotation_atoms(n.annotation, self.funcs[f"{module.name}.<module>"])
          out |= atoms or ({("sec", self.root)} if name == "config" and config_like else set())
    if f"{qn}.{name}" in self.funcs:
      out.add(("name", f"{qn}.{name}"))
    return out


class _Visitor:
  """Evaluates one function body: binds names, records reads (flow-insensitive)."""

  def __init__(self, an: ConfigReads, f: _Func):
    self.an, self.f = an, f

  def run(self, body: list) -> None:
    for stmt in body:
      self.stmt(stmt)

  # -- statements
  def stmt(self, node: ast.AST) -> None:
    an, f = self.an, self.f
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      for d in node.decorator_list:
        self.expr(d)
      if isinstance(node, ast.ClassDef):
        for sub in node.body:
          if not isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.stmt(sub)
      return
    if isinstance(node, (ast.Import, ast.ImportFrom)):   # an import inside a function
      table = _Module(f.module.name, f.module.path, ast.Module(body=[node], type_ignores=[]))
      an._index_imports(table, f.module)
      for local, qn in table.symbols.items():
        an._bind(f, local, {("name", qn)})
      return
    if isinstance(node, ast.Assign):
      atoms = self.expr(node.value)
      for t in node.targets:
        self.bind(t, atoms, node.value)
    elif isinstance(node, ast.AnnAssign):
      atoms = self.expr(node.value) if node.value is not None else set()
      ann, _ = an.annotation_atoms(node.annotation, f)
      self.bind(node.target, atoms | ann, node.value)
    elif isinstance(node, ast.AugAssign):
      self.expr(node.value)
      self.expr(node.target)
    elif isinstance(node, (ast.For, ast.AsyncFor)):
      self.bind_iter(node.target, node.iter)
      self.run(node.body)
      self.run(node.orelse)
    elif isinstance(node, ast.Return):
      if node.value is not None:
        an.returns.setdefault(f.qn, set()).update(self.expr(node.value))
    else:
      for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
          self.expr(child)
        elif isinstance(child, ast.stmt):
          self.stmt(child)
        elif isinstance(child, (ast.ExceptHandler, ast.withitem, ast.match_case)):
          for sub in ast.iter_child_nodes(child):
            self.stmt(sub) if isinstance(sub, ast.stmt) else self.expr(sub) if isinstance(sub, ast.expr) else None
          if isinstance(child, ast.withitem) and child.optional_vars is not None:
            self.bind(child.optional_vars, self.expr(child.context_expr), None)

  def bind(self, target: ast.AST, atoms: set, value: ast.AST | None) -> None:
    an, f = self.an, self.f
    if isinstance(target, ast.Name):
      an._bind(f, target.id, atoms)
    elif isinstance(target, (ast.Tuple, ast.List)):
      if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
        for t, v in zip(target.elts, value.elts):
          self.bind(t, self.expr(v), v)
      else:
        for t in target.elts:
          self.bind(t, _elements(atoms), None)
    elif isinstance(target, ast.Attribute):
      for a in self.expr(target.value):
        if a[0] == "obj":
          an.attrs.setdefault(a[1], {}).setdefault(target.attr, set()).update(atoms)
    elif isinstance(target, ast.Subscript):
      self.expr(target.value)
      self.expr(target.slice)
    elif isinstance(target, ast.Starred):
      self.bind(target.value, set(), None)

  def bind_iter(self, target: ast.AST, it: ast.AST) -> None:
    if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("enumerate", "zip"):
      parts = [self.expr(a) for a in it.args]
      if it.func.id == "enumerate":
        parts = [set()] + parts[:1]
      if isinstance(target, ast.Tuple) and len(target.elts) == len(parts):
        for t, p in zip(target.elts, parts):
          self.bind(t, _elements(p), None)
        return
    self.bind(target, _elements(self.expr(it)), None)

  # -- expressions
  def expr(self, node: ast.AST | None) -> set:
    an, f = self.an, self.f
    if node is None:
      return set()
    if isinstance(node, ast.Constant):
      return {("const", node.value)} if isinstance(node.value, str) else set()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
      for e in node.elts:
        self.expr(e)
      strings = _const_strings(node)
      if strings is not None:
        return {("consts", strings)}
      if not isinstance(node, ast.List):   # a tuple is several values, not a list of sections
        return set()
      return {("list", a[1]) for e in node.elts for a in self.expr(e) if a[0] == "sec"}
    if isinstance(node, ast.Name):
      found = an._lookup_name(node.id, f)
      if node.id in _scope_names(f):
        return found
      return an._module_name(node.id, f.module) or ({("sec", an.root)} if node.id == "config" else set())
    if isinstance(node, ast.Attribute):
      return self.attribute(self.expr(node.value), node.attr, node)
    if isinstance(node, ast.Subscript):
      return self.subscript(self.expr(node.value), self.expr(node.slice), node)
    if isinstance(node, ast.Call):
      return self.call(node)
    if isinstance(node, ast.IfExp):
      self.expr(node.test)
      return self.expr(node.body) | self.expr(node.orelse)
    if isinstance(node, ast.BoolOp):
      out = set()
      for v in node.values:
        out |= self.expr(v)
      return out
    if isinstance(node, ast.Compare):
      left = self.expr(node.left)
      for op, comp in zip(node.ops, node.comparators):
        right = self.expr(comp)
        if isinstance(op, (ast.In, ast.NotIn)):
          an.read(right, _keys(left), node, f)
      return set()
    if isinstance(node, ast.Lambda):
      inner = _Func(f"{f.qn}.<lambda>", node, f.module, None, f)
      for p in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
        inner.env[p.arg] = an.named_section(p.arg)
      _Visitor(an, inner).expr(node.body)
      return set()
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
      for gen in node.generators:
        self.bind_iter(gen.target, gen.iter)
        for cond in gen.ifs:
          self.expr(cond)
      if isinstance(node, ast.DictComp):
        self.expr(node.key)
        self.expr(node.value)
        return set()
      elt = self.expr(node.elt)
      return {("list", a[1]) for a in elt if a[0] == "sec"}
    if isinstance(node, ast.NamedExpr):
      atoms = self.expr(node.value)
      self.bind(node.target, atoms, node.value)
      return atoms
    if isinstance(node, ast.Starred):
      return self.expr(node.value)
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.expr):
        self.expr(child)
      elif isinstance(child, ast.keyword):
        self.expr(child.value)
    return set()

  def attribute(self, atoms: set, attr: str, node: ast.AST) -> set:
    an, f = self.an, self.f
    out = set()
    secs = {a[1] for a in atoms if a[0] == "sec"}
    if any(attr in cs.field_types(c) for c in secs):
      out |= an.read(atoms, [attr], node, f)
    elif attr in CONFIGDICT_API or attr.startswith("__") or any(hasattr(c, attr) for c in secs):
      out |= {("method", c, attr) for c in secs}
    elif secs:
      an.read(atoms, [attr], node, f)
    for a in atoms:
      if a[0] == "obj":
        out |= an.class_attr(a[1], attr)
      elif a[0] == "name":
        qn = an.resolve(f"{a[1]}.{attr}")
        if qn in an.schema or qn in an.funcs or qn in an.classes or qn in an.modules:
          out.add(("name", qn))
        elif qn in an.consts:
          out.add(("consts", an.consts[qn]))
        else:
          out.add(("name", qn))
    return out

  def subscript(self, atoms: set, key_atoms: set, node: ast.AST) -> set:
    an, f = self.an, self.f
    keys = _keys(key_atoms)
    out = set()
    if keys:
      out |= an.read(atoms, keys, node, f)
    for a in atoms:
      if a[0] == "sec" and not keys:   # a key the analysis cannot name: any of the sub-sections
        for k in cs.field_types(a[1]):
          out |= an.field_atoms(a[1], k)
      elif a[0] == "list":
        out.add(("sec", a[1]))
    return out

  def call(self, node: ast.Call) -> set:
    an, f = self.an, self.f
    func_atoms = self.expr(node.func)
    args = [self.expr(a) for a in node.args]
    kwargs = {k.arg: self.expr(k.value) for k in node.keywords if k.arg is not None}
    for k in node.keywords:
      if k.arg is None:
        self.expr(k.value)
    out = set()
    name = node.func.id if isinstance(node.func, ast.Name) and not func_atoms else None
    if name in PASSTHROUGH and args:
      return set(args[0])
    if name == "getattr" and len(args) >= 2:
      return an.read(args[0], _keys(args[1]), node, f, default=len(args) > 2)
    if isinstance(node.func, ast.Attribute) and node.func.attr == "replace" and _dotted(node.func.value) == "dataclasses":
      return set(args[0]) if args else set()
    for a in func_atoms:
      if a[0] == "method":
        cls, m = a[1], a[2]
        if m == "get" and args:
          out |= an.read({("sec", cls)}, _keys(args[0]), node, f, default=len(args) > 1 or bool(kwargs))
          if len(args) > 1:
            out |= args[1]
        elif m in ("to_dict", "copy_and_resolve_references", "replace", "unlocked"):
          out.add(("sec", cls))
      elif a[0] == "name":
        qn = an.resolve(a[1])
        if qn == PARSE and args:
          for c in args[0]:
            if c[0] == "name":
              out |= an._schema_atoms(c[1])
        elif qn in an.schema or qn in an.classes:
          out |= an.construct(qn, args, kwargs)
        elif qn in an.funcs:
          owner = an.funcs[qn].cls
          bound = owner is not None and not _is_static(an.funcs[qn].node) and (
              _is_classmethod(an.funcs[qn].node) or _is_method_access(node.func))
          out |= an.call(qn, args, kwargs, skip_first=bound)
    return out


# -- small helpers

def _dotted(node: ast.AST) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    head = _dotted(node.value)
    return f"{head}.{node.attr}" if head else None
  return None


def _const_strings(node: ast.AST) -> tuple[str, ...] | None:
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
      isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
    return tuple(e.value for e in node.elts)
  return None


def _keys(atoms: set) -> list[str]:
  out = []
  for a in atoms:
    if a[0] == "const":
      out.append(a[1])
    elif a[0] == "consts":
      out += list(a[1])
  return out


def _elements(atoms: set) -> set:
  out = set()
  for a in atoms:
    if a[0] == "list":
      out.add(("sec", a[1]))
    elif a[0] == "consts":
      out |= {("const", s) for s in a[1]}
  return out


def _is_static(node: ast.AST) -> bool:
  return any(_dotted(d) == "staticmethod" for d in getattr(node, "decorator_list", []))


def _is_classmethod(node: ast.AST) -> bool:
  return any(_dotted(d) == "classmethod" for d in getattr(node, "decorator_list", []))


def _is_method_access(func: ast.AST) -> bool:
  """``obj.method(...)`` / ``self.method(...)`` (bound), not ``Class.method(obj, ...)``."""
  return isinstance(func, ast.Attribute) and not (isinstance(func.value, ast.Name) and func.value.id[:1].isupper())


def _scope_names(f: _Func) -> set[str]:
  names = set()
  while f is not None:
    names |= set(f.env)
    f = f.parent
  return names


def _module_of(qn: str, modules: dict[str, _Module]) -> str:
  while qn and qn not in modules:
    qn = qn.rpartition(".")[0]
  return qn


def package_sources() -> list[tuple[str, str, str]]:
  out = []
  for top in SCANNED:
    for path in sorted((ROOT / top).rglob("*.py")):
      rel = path.relative_to(ROOT).as_posix()
      if rel in SKIPPED or "__pycache__" in rel:
        continue
      mod = rel[:-3].replace("/", ".").removesuffix(".__init__")
      out.append((mod, path.read_text(encoding="utf-8"), rel))
  return out


def _defining_class(cls: type, key: str) -> type:
  """The class in ``cls``'s MRO whose own body declares the field ``key``."""
  return next((c for c in cls.__mro__ if key in c.__dict__.get("__annotations__", {})), cls)


def unread_fields(root: type, reads: Iterable[Read]) -> list[str]:
  """``config.path (Class.field)`` of every schema field without a read. A read on a base or
  derived section class counts, and so does one through any other section that inherits the
  field from the base declaring it (one field, declared once: ``rl.TaskSettings``' keys are read
  through ``GRPOConfig``, whose per-task copies ``task_list`` fills from ``rl.tasks`` entries)."""
  seen = {(r.cls, r.key) for r in reads}
  out = []
  for (cls, key), path in sorted(schema_paths(root).items(), key=lambda kv: kv[1]):
    owner = _defining_class(cls, key)
    if not any(k == key and (issubclass(c, owner) or issubclass(cls, c)) for c, k in seen):
      out.append(f"{path} ({cls.__name__}.{key})")
  return out


def _describe(reads: Iterable[Read]) -> str:
  return "\n  ".join(sorted(f"{r.where}: {r.cls.__name__}.{r.key}" for r in reads))


@pytest.fixture(scope="module")
def analysis() -> ConfigReads:
  return ConfigReads(TrainConfig, package_sources())


# ----------------------------------------------------------------------------- the configs


def _fake_demo_data(tmp: pathlib.Path) -> str:
  """A ``demo_data.json`` as ``python -m mmada_jax.demo`` writes it (paths need not exist)."""
  from mmada_jax.train.toy_data import toy_model_fields
  model = dict(toy_model_fields(64, 16), d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128,
               max_sequence_length=128, max_text_len=20, num_image_tokens=16)
  names = ("classifier", "image_tokenizer", "text_tokenizer", "t2i_train", "mmu_train", "mmu_cot_train", "lm_text",
           "sft_chat", "grpo_text", "grpo_mmu", "grpo_t2i")
  built = {"seed": 0, "config": {"thinking_prompt": False}, "model": model,
           "paths": {n: str(tmp / n) for n in names}}
  path = tmp / "demo_data.json"
  path.write_text(json.dumps(built))
  return str(path)


def config_files() -> list[pathlib.Path]:
  return sorted(p for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def load_module(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"config_file_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_variants(tmp: pathlib.Path) -> list[tuple[str, Any]]:
  """``[("configs/FILE.py:VARIANT", ConfigDict)]`` for every file and every entry of its VARIANTS."""
  extra = {"demo.py": f",data={_fake_demo_data(tmp)}"}
  out = []
  for path in config_files():
    module = load_module(path)
    variants = getattr(module, "VARIANTS", None)
    assert variants, f"configs/{path.name} has no VARIANTS tuple naming its variants"
    for v in variants:
      out.append((f"configs/{path.name}:{v}", module.get_config(v + extra.get(path.name, ""))))
  return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[tuple[str, Any]]:
  return all_variants(tmp_path_factory.mktemp("configs"))


def test_every_variant_is_in_the_schema(variants):
  names = [n for n, _ in variants]
  assert len(names) >= 5 + 8 + 3 and any("demo.py" in n for n in names) and any("mmada_1b" in n for n in names)
  failures = []
  for name, config in variants:
    try:
      parse_variant(name, config)
    except (cs.ConfigError, ValueError) as e:
      failures.append(f"{name}: {e}")
  assert not failures, "config variants with keys or values outside the schema:\n  " + "\n  ".join(failures)


EVAL_FILE = "eval.py"
"""The config file of ``python -m mmada_jax.eval``: its schema is :class:`EvalConfig`, not TrainConfig."""


def parse_variant(name: str, config: Any) -> Any:
  """A variant parsed into its file's schema (EvalConfig for ``configs/eval.py``, else TrainConfig)."""
  if name.startswith(f"configs/{EVAL_FILE}:"):
    return cs.parse(EvalConfig, config, "config")
  return parse_config(config)


def test_eval_variants_are_in_the_eval_schema(variants):
  """Configs ⊆ schema for the eval presets: every variant parses into EvalConfig (as its task)."""
  evals = [(n, c) for n, c in variants if n.startswith(f"configs/{EVAL_FILE}:")]
  assert len(evals) >= 7
  for name, config in evals:
    preset = name.rpartition(":")[2]
    demo = {"demo_arithmetic": "gsm8k", "demo_mmu": "vqav2", "demo_t2i": "geneval"}   # the demo's settings
    assert parse_variant(name, config).task == demo.get(preset, preset)
  config = evals[0][1].copy_and_resolve_references()
  config.mc_nmu = 4
  with pytest.raises(cs.ConfigError, match=r"config\.mc_nmu: unknown config key \(did you mean 'mc_num'\?\)"):
    parse_variant(evals[0][0], config)


@pytest.fixture(scope="module")
def eval_analysis() -> ConfigReads:
  return ConfigReads(EvalConfig, [s for s in package_sources() if s[2].startswith("mmada_jax/eval/")])


def test_every_eval_key_is_read_and_every_read_defined(eval_analysis):
  """Schema ⊆ reads and reads ⊆ schema for EvalConfig, over mmada_jax/eval/."""
  assert any(r.key == "mc_num" and r.where.startswith("mmada_jax/eval/runner.py") for r in eval_analysis.reads)
  unread = unread_fields(EvalConfig, eval_analysis.reads)
  assert not unread, "eval config keys that no code in mmada_jax/eval/ reads:\n  " + "\n  ".join(unread)
  assert not eval_analysis.undefined, ("mmada_jax/eval/ reads config keys that EvalConfig does not define:\n  "
                                       + _describe(eval_analysis.undefined))
  assert not eval_analysis.defaults, _describe(eval_analysis.defaults)


def test_base_config_is_the_schema_defaults():
  common = load_module(ROOT / "configs" / "common.py")
  assert parse_config(common.base_config()) == TrainConfig()
  assert cs.to_config_dict(TrainConfig).to_dict() == common.base_config().to_dict()


def test_every_schema_key_is_read(analysis):
  unread = unread_fields(TrainConfig, analysis.reads)
  assert not unread, "config keys that no code in mmada_jax/ or bench/ reads:\n  " + "\n  ".join(unread)


def test_every_read_key_is_in_the_schema(analysis):
  assert not analysis.undefined, ("the code reads config keys that the schema does not define:\n  "
                                  + _describe(analysis.undefined))


def test_no_read_repeats_a_default(analysis):
  assert not analysis.defaults, ("reads with a default (the section's dataclass holds the only default; "
                                 "read the key plainly):\n  " + _describe(analysis.defaults))


def test_the_analysis_sees_the_main_consumers(analysis):
  """Guards the analysis itself: reads it must find through call arguments (``config.optimizer``
  -> ``make_optimizer(cfg)`` -> ``lr_schedule(cfg)``), loops over ``TASKS``, the parsed flow
  sections and the ``lambda rl: …`` reward factories."""
  where: dict[tuple[str, str], set[str]] = {}
  for r in analysis.reads:
    where.setdefault((r.cls.__name__, r.key), set()).add(r.where.partition(":")[0])
  assert "mmada_jax/train/optim.py" in where[("OptimizerConfig", "warmup_steps")]
  assert "mmada_jax/data/pipeline.py" in where[("LMFlowConfig", "batch_size")]
  assert "mmada_jax/data/config.py" in where[("LMFlowConfig", "max_tokens")]
  assert "mmada_jax/data/config.py" in where[("SourceConfig", "weight")]
  assert "mmada_jax/rl/rewards.py" in where[("GRPOConfig", "reward_format")]
  assert "mmada_jax/train/distributed.py" in where[("DistributedConfig", "initialization_timeout")]


# ----------------------------------------------------------------------------- planted drift


@dataclasses.dataclass(frozen=True)
class _Opt:
  lr: float = 1e-3
  unused_knob: float = 0.5


@dataclasses.dataclass(frozen=True)
class _Top:
  steps: int = 10
  optimizer: _Opt = dataclasses.field(default_factory=_Opt)


_PLANTED = f'''
from {__name__} import _Opt

def run(config):
  schedule(config.optimizer, int(config.steps))
  return config.optimizer.get("beta", 0.9)

def schedule(cfg, total):
  for key in ("lr",):
    print(cfg[key], total)
  return cfg.warmup

def typed(o: _Opt):
  return o.lr
'''


def _planted_analysis() -> ConfigReads:
  return ConfigReads(_Top, [("tests_planted.code", _PLANTED, "planted.py")])


def test_planted_extra_key_in_a_variant_fails(variants):
  name, config = next((n, c) for n, c in variants if n.endswith("tiny.py:pretrain"))
  config = config.copy_and_resolve_references()
  config.optimizer.lr_decay = 0.5
  with pytest.raises(cs.ConfigError, match=r"config\.optimizer\.lr_decay: unknown config key.*'lr'"):
    parse_config(config)
  config = config.copy_and_resolve_references()
  del config.optimizer["lr_decay"]
  config.data.mmu.sources = [{"path": "x", "wieght": 2.0}]
  with pytest.raises(cs.ConfigError, match=r"config\.data\.mmu\.sources\[0\]\.wieght.*did you mean 'weight'"):
    parse_config(config)
  config.data.mmu.sources = []
  with config.ignore_type():
    config.steps = "100"
  with pytest.raises(cs.ConfigError, match=r"config\.steps='100': expected int"):
    parse_config(config)


def test_planted_unread_field_fails():
  reads = _planted_analysis().reads
  assert unread_fields(_Top, reads) == ["config.optimizer.unused_knob (_Opt.unused_knob)"]


@dataclasses.dataclass(frozen=True)
class _Shared:
  width: int = 4
  depth: int = 2


@dataclasses.dataclass(frozen=True)
class _Entry(_Shared):
  name: str = ""


@dataclasses.dataclass(frozen=True)
class _Flat(_Shared):
  entries: tuple[_Entry, ...] = ()


def test_inherited_fields_count_reads_through_a_sibling_only_when_shared():
  """A field declared once on a base is read when any section inheriting it reads it; a field of
  the base that nothing reads, and a subclass's own unread field, are still reported."""
  def read(cls, key):
    return Read(cls, key, "planted.py:1")
  reads = [read(_Flat, "width"), read(_Flat, "entries"), read(_Entry, "name")]
  assert unread_fields(_Flat, reads) == ["config.depth (_Flat.depth)", "config.entries[].depth (_Entry.depth)"]
  assert unread_fields(_Flat, reads[:2]) == ["config.depth (_Flat.depth)", "config.entries[].depth (_Entry.depth)",
                                              "config.entries[].name (_Entry.name)"]


def test_planted_undefined_read_and_default_fail():
  an = _planted_analysis()
  assert sorted((r.cls.__name__, r.key) for r in an.undefined) == [("_Opt", "beta"), ("_Opt", "warmup")]
  assert [(r.cls.__name__, r.key) for r in an.defaults] == []   # 'beta' is undefined, not a default


def test_planted_default_read_fails():
  an = ConfigReads(_Top, [("m", "def f(config):\n  return config.optimizer.get('lr', 1e-3)\n", "m.py")])
  assert [(r.cls.__name__, r.key, r.where) for r in an.defaults] == [("_Opt", "lr", "m.py:2")]


def test_a_never_read_rl_key_is_caught(analysis):
  """The drift this test exists for: a key set in ``config.rl`` that no code reads (as the old
  ``rl.reward_clip_scale`` was) is reported."""
  from mmada_jax.rl.config import GRPOConfig

  old_grpo = dataclasses.make_dataclass("OldGRPO", [("reward_clip_scale", float, 0.1)], bases=(GRPOConfig,),
                                        frozen=True)
  old_top = dataclasses.make_dataclass("OldTop", [("rl", typing.Optional[old_grpo], None)], bases=(TrainConfig,),
                                       frozen=True)

  unread = unread_fields(old_top, analysis.reads)
  assert unread == ["config.rl.reward_clip_scale (OldGRPO.reward_clip_scale)"], unread


# ----------------------------------------------------------------------------- the helpers


def test_schema_round_trip_and_errors():
  c = cs.to_config_dict(TrainConfig)
  c.data.mmu.sources = [{"path": "a", "weight": 2}]
  c.data.num_epochs = 3
  parsed = parse_config(c)
  assert parsed.data.mmu.sources[0].weight == 2.0 and parsed.data.num_epochs == 3
  assert parsed.model.dtype == "bfloat16" and parsed.rl is None and parsed.demo is None
  c.data.num_epochs = None
  assert parse_config(c).data.num_epochs is None
  with pytest.raises(cs.ConfigError, match=r"config\.optimizer\.weight_decay_mask='most'.*one of"):
    cs.parse(TrainConfig, dict(optimizer=dict(weight_decay_mask="most")))
  with pytest.raises(cs.ConfigError, match=r"OptimizerConfig\.bogus: unknown config key"):
    cs.to_config_dict(TrainConfig().optimizer, bogus=1)
  with pytest.raises(cs.ConfigError, match=r"config\.demo\.classifer: unknown config key"):
    cs.parse(TrainConfig, dict(demo=dict(classifer="x")))
  assert "data.mmu.sources[].weight" in cs.section_keys(TrainConfig)


def test_locked_config_rejects_unknown_keys_and_accepts_overrides():
  c = cs.to_config_dict(TrainConfig)
  c.lock()
  with pytest.raises(AttributeError):
    c.optimizer.lr_decay = 0.1
  c.optimizer.lr = 3e-4
  c.data.num_epochs = 2
  assert parse_config(c).optimizer.lr == 3e-4


def test_renamed_keys_fail_naming_the_new_key():
  """Keys renamed to the public API's names (``t2i_steps``, ``guidance_scale``): the old name is an
  error that names the new one, in a config, an override and on the command line's lookup."""
  with pytest.raises(cs.ConfigError, match=r"config\.sampling\.t2i_timesteps: this config key was renamed to "
                                           r"config\.sampling\.t2i_steps"):
    parse_config(dict(sampling=dict(t2i_timesteps=4)))
  with pytest.raises(cs.ConfigError, match=r"config\.rl\.cfg_scale: this config key was renamed to config\.rl\.guidance_scale"):
    parse_config(dict(rl=dict(cfg_scale=1.0)))
  with pytest.raises(cs.ConfigError, match=r"SamplingConfig\.guidance_scale: this config key was renamed to "
                                           r"SamplingConfig\.t2i_guidance_scale"):
    cs.to_config_dict(TrainConfig().sampling, guidance_scale=2.0)
  assert cs.renamed_key(TrainConfig, "rl.t2i_timesteps") == "rl.t2i_steps"
  assert cs.renamed_key(TrainConfig, "rl.guidance_scale") is None          # a current key (the text sampler's)
  assert cs.renamed_key(TrainConfig, "sampling.t2i_timestepz") is None
  with pytest.raises(ValueError, match=r"rl\.t2i_guidance_scale \(formerly rl\.guidance_scale\)"):
    parse_config(dict(rl=dict(task="t2i", max_text_len=4, guidance_scale=2.0)))

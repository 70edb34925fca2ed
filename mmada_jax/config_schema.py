"""Config sections as dataclasses: the one definition of every config key, its type and default.

A *section* is a dataclass whose fields are the section's keys. Field types: ``bool``, ``int``,
``float``, ``str``, ``Any``, ``X | None``, ``Literal[...]``, ``tuple[X, ...]`` / ``tuple[A, B]``,
``list[X]``, ``dict[str, X]``, a nested section (a sub-section) or ``list[Section]`` (a list of
dicts, e.g. ``data.mmu.sources``). A field typed ``Section | None`` with default None is an
optional sub-section: absent from the ConfigDict until a config adds it. :func:`plugin_section`
declares an optional sub-section whose dataclass lives in a module above the declaring one
(named by string, imported only when a config has the section).

* :func:`to_config_dict` builds the ml_collections ConfigDict of a section's defaults (or of an
  instance's values) with overrides; experiment files start from it, ``--config.x=y`` overrides
  and ``lock_config`` act on it as on any ConfigDict.
* :func:`parse` reads a ConfigDict (or mapping) back into the dataclass: an unknown key is a
  :class:`ConfigError` naming its full dotted path and the known keys, a wrong type one naming
  the path and the expected type; absent keys take the field's default, so the dataclass is the
  only place a default lives.
* :func:`section_keys` lists every dotted key of a section (for documentation and tests).
* Renamed keys: a section's ``RENAMED_KEYS`` class attribute maps old key names to new ones, so
  that an old name fails saying what it was renamed to (:func:`renamed_key` for the command line).

This module imports nothing of mmada_jax (layer 0).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import numbers
import types
import typing
from typing import Any, Literal, Mapping, Union

import ml_collections
from ml_collections import config_dict

RENAMED_KEYS = "RENAMED_KEYS"
"""Name of a section's optional class attribute ``{old key: new key}``: an old key given in a
config is a :class:`ConfigError` saying "renamed to" the new one (``typing.ClassVar``, so it
is not a field)."""

SECTION_OWNER = "mmada_jax.config_schema.owner"
"""Field metadata key of a :func:`plugin_section`: ``"module:Class"`` of its dataclass."""


class ConfigError(ValueError):
  """An unknown key, a wrong type or a missing required key in a config section."""


def plugin_section(owner: str, doc: str = "") -> Any:
  """An optional sub-section (default absent) whose dataclass is ``owner`` = ``"module:Class"``,
  imported when a config has the section (for settings read by a plugin above the declaring
  module's layer, e.g. a reward factory named in the config)."""
  return dataclasses.field(default=None, metadata={SECTION_OWNER: owner, "doc": doc})


def is_section(tp: Any) -> bool:
  """True for a dataclass type (a section)."""
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
  """``{field name: resolved type}`` of a section's init fields, in definition order (a
  :func:`plugin_section` field maps to a :class:`Plugin`, resolved only when used)."""
  if not is_section(cls):
    raise TypeError(f"{cls!r} is not a dataclass section")
  hints = typing.get_type_hints(cls)
  out = {}
  for f in dataclasses.fields(cls):
    if not f.init:
      continue
    owner = f.metadata.get(SECTION_OWNER)
    out[f.name] = Plugin(owner) if owner else hints[f.name]
  return out


@dataclasses.dataclass(frozen=True)
class Plugin:
  """The type of a :func:`plugin_section` field: an optional section of class ``owner``."""
  owner: str

  def resolve(self) -> type:
    return resolve_owner(self.owner)


def resolve_owner(owner: str) -> type:
  """The dataclass named by ``"module:Class"``."""
  module, _, name = owner.partition(":")
  try:
    cls = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config section class {owner!r} cannot be loaded ({e})") from e
  if not is_section(cls):
    raise ConfigError(f"config section class {owner!r} is not a dataclass")
  return cls


def optional_inner(tp: Any) -> tuple[Any, bool]:
  """``X | None`` -> (X, True); anything else -> (tp, False)."""
  if typing.get_origin(tp) in (Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) < len(typing.get_args(tp)):
      return (args[0] if len(args) == 1 else Union[tuple(args)]), True
  return tp, False


def type_name(tp: Any) -> str:
  """Readable name of a field type (``int``, ``tuple[str, ...]``, ``one of ('a', 'b')``)."""
  if tp is Any:
    return "any value"
  if typing.get_origin(tp) is Literal:
    return f"one of {typing.get_args(tp)}"
  if isinstance(tp, type) and not typing.get_args(tp):
    return ("section " if is_section(tp) else "") + tp.__name__
  return str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return dataclasses.MISSING


def _values(section: Any) -> dict[str, Any]:
  """Field values of an instance, or the defaults of a class (MISSING where none)."""
  if isinstance(section, type):
    return {f.name: _default(f) for f in dataclasses.fields(section) if f.init}
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init}


_ABSENT = object()


def _scalar_kind(tp: Any) -> type | None:
  return tp if tp in (bool, int, float, str) else None


def _to_value(tp: Any, value: Any, where: str) -> Any:
  """A field value as stored in a ConfigDict (``_ABSENT`` = leave the key out)."""
  if isinstance(tp, Plugin):
    return _ABSENT if value is None else _to_value(Union[tp.resolve(), None], value, where)
  inner, optional = optional_inner(tp)
  if value is None:
    if not optional:
      raise ConfigError(f"{where}: None given but the type is {type_name(tp)}")
    if is_section(inner):
      return _ABSENT
    kind = _scalar_kind(inner)
    return config_dict.placeholder(kind) if kind else None
  if is_section(inner):
    if _is_mapping(value):
      value = _merged(inner, _values(inner), value, where)
    return to_config_dict(value)
  origin = typing.get_origin(inner)
  if origin in (list, tuple):
    items = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    items = [dict(v.items()) if _is_mapping(v) else v for v in items]
    return list(items) if origin is list else tuple(items)
  if origin in (dict, Mapping) or inner is dict:
    return dict(value.items())
  if inner is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
    value = float(value)
  if optional and _scalar_kind(inner):
    return ml_collections.FieldReference(value, field_type=inner)
  return value


@dataclasses.dataclass
class _Values:
  """Field values of a section not (yet) validated by its constructor."""
  cls: type
  values: dict[str, Any]


def _merged(cls: type, base: dict[str, Any], overrides: Any, where: str) -> _Values:
  """Field values ``base`` of ``cls`` updated by ``overrides`` (a mapping; a mapping given for a
  sub-section merges into that sub-section's values)."""
  known = field_types(cls)
  bad = [k for k in overrides.keys() if k not in known]
  if bad:
    raise ConfigError(_unknown_message(cls, where, bad[0], known))
  out = dict(base)
  for k in overrides.keys():
    tp = known[k].resolve() if isinstance(known[k], Plugin) else known[k]
    v, (sub, _) = overrides[k], optional_inner(tp)
    if is_section(sub) and _is_mapping(v):
      old = out.get(k)
      old = old.values if isinstance(old, _Values) else (
          _values(old) if dataclasses.is_dataclass(old) else _values(sub))
      v = _merged(sub, old, v, f"{where}.{k}")
    out[k] = v
  return _Values(cls, out)


def to_config_dict(section: Any, /, **overrides: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of a section: a dataclass type (its defaults) or instance (its values),
  with ``overrides`` (field name -> value; a mapping merges into a sub-section's values).

  Sub-sections become nested ConfigDicts, optional sub-sections that are None are left out,
  ``X | None`` scalars become typed references (None allowed), floats are stored as floats.
  Raises ConfigError on an override that is not a field or a field without a default.
  """
  if isinstance(section, _Values):
    cls, values = section.cls, section.values
  else:
    cls = section if isinstance(section, type) else type(section)
    values = _values(section)
  where = cls.__name__
  if overrides:
    values = _merged(cls, values, overrides, where).values
  out = ml_collections.ConfigDict()
  for name, tp in field_types(cls).items():
    value = values[name]
    if value is dataclasses.MISSING:
      raise ConfigError(f"{where}.{name} has no default: pass it as an override")
    stored = _to_value(tp, value, f"{where}.{name}")
    if stored is not _ABSENT:
      out[name] = stored
  return out


def renamed_keys(cls: type) -> dict[str, str]:
  """``{old key: new key}`` of a section (its ``RENAMED_KEYS`` class attribute; none: ``{}``).
  An old key must not also be a field: it would be read, not reported."""
  renamed = dict(getattr(cls, RENAMED_KEYS, {}))
  clash = sorted(set(renamed) & set(field_types(cls)))
  if clash:
    raise TypeError(f"{cls.__name__}.{RENAMED_KEYS} lists current keys {clash}")
  return renamed


def renamed_key(cls: type, dotted: str) -> str | None:
  """The new dotted key of an old one under section ``cls`` (``"sampling.t2i_timesteps"`` ->
  ``"sampling.t2i_steps"``), or None when ``dotted`` names no renamed key."""
  *sections, key = dotted.split(".")
  for name in sections:
    tp = field_types(cls).get(name) if is_section(cls) else None
    if tp is None:
      return None
    cls, _ = optional_inner(tp.resolve() if isinstance(tp, Plugin) else tp)
  new = renamed_keys(cls).get(key) if is_section(cls) else None
  return None if new is None else ".".join([*sections, new])


def _unknown_message(cls: type, path: str, key: str, known: Mapping[str, Any]) -> str:
  new = renamed_keys(cls).get(str(key))
  if new is not None:
    return f"{path}.{key}: this config key was renamed to {path}.{new}; write {new!r} instead"
  close = difflib.get_close_matches(str(key), list(known), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return f"{path}.{key}: unknown config key{hint}; {path} has {sorted(known)}"


def _is_mapping(value: Any) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _convert(tp: Any, value: Any, path: str) -> Any:
  if isinstance(tp, Plugin):
    return None if value is None else parse(tp.resolve(), value, path)
  inner, optional = optional_inner(tp)
  if value is None:
    if optional or inner is Any:
      return None
    raise ConfigError(f"{path}=None: expected {type_name(tp)}")
  if inner is Any:
    return value
  if is_section(inner):
    if isinstance(value, inner):
      return value
    if not _is_mapping(value):
      raise ConfigError(f"{path}={value!r}: expected a section ({inner.__name__}), got {type(value).__name__}")
    return parse(inner, value, path)
  origin, args = typing.get_origin(inner), typing.get_args(inner)
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{path}={value!r}: expected one of {args}")
    return value
  if origin in (Union, types.UnionType):
    for option in args:
      try:
        return _convert(option, value, path)
      except ConfigError:
        continue
    raise ConfigError(f"{path}={value!r}: expected {type_name(inner)}, got {type(value).__name__}")
  if origin in (list, tuple):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}={value!r}: expected {type_name(inner)}, got {type(value).__name__}")
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise ConfigError(f"{path}={value!r}: expected {len(args)} items ({type_name(inner)})")
      return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return items if origin is list else tuple(items)
  if origin in (dict, Mapping) or inner is dict:
    if not _is_mapping(value):
      raise ConfigError(f"{path}={value!r}: expected a mapping, got {type(value).__name__}")
    value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    item = args[1] if len(args) == 2 else Any
    return {k: _convert(item, v, f"{path}.{k}") for k, v in dict(value).items()}
  if inner is bool:
    ok = isinstance(value, bool)
  elif inner is int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    value = int(value) if ok else value
  elif inner is float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(inner, type):
    ok = isinstance(value, inner)
  else:
    ok = True
  if not ok:
    raise ConfigError(f"{path}={value!r}: expected {type_name(inner)}, got {type(value).__name__}")
  return value


def parse(cls: type, section: Any, path: str = "config") -> Any:
  """``section`` (a ConfigDict, a mapping or already a ``cls``) as a ``cls`` instance.

  ``path`` is the section's dotted name in messages (``config.optimizer``). Keys absent from
  ``section`` take the field's default. Raises ConfigError on an unknown key (naming the full
  path and the known keys), a value of the wrong type, or a missing key without a default;
  the dataclass's own ``__post_init__`` checks run as usual.
  """
  if isinstance(section, cls):
    return section
  if not _is_mapping(section):
    raise ConfigError(f"{path}: expected a section ({cls.__name__}), got {type(section).__name__}")
  known = field_types(cls)
  given = list(section.keys())
  bad = [k for k in given if k not in known]
  if bad:
    raise ConfigError(_unknown_message(cls, path, bad[0], known))
  kw = {}
  for name, tp in known.items():
    if name in given:
      kw[name] = _convert(tp, section[name], f"{path}.{name}")
  missing = [f.name for f in dataclasses.fields(cls)
             if f.init and f.name not in kw and _default(f) is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"{path}: required keys {missing} are missing")
  return cls(**kw)


def section_keys(cls: type, prefix: str = "") -> list[str]:
  """Every dotted key of a section, sub-sections' keys included (optional and plugin
  sub-sections too; ``list[Section]`` items as ``key[].field``)."""
  out = []
  for name, tp in field_types(cls).items():
    key = f"{prefix}{name}"
    inner, _ = optional_inner(tp.resolve() if isinstance(tp, Plugin) else tp)
    item = typing.get_args(inner)[0] if typing.get_origin(inner) in (list, tuple) and typing.get_args(inner) else None
    if is_section(inner):
      out += section_keys(inner, key + ".")
    elif is_section(item):
      out += section_keys(item, key + "[].")
    else:
      out.append(key)
  return out

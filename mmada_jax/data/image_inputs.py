"""Image inputs of :mod:`mmada_jax.data.tokenize_images`, cut into work units (one output shard each).

Formats (``open_inputs`` picks one from the path):

* webdataset tar shards: a ``.tar`` / ``.tar.gz`` file, a brace pattern (``data/{00000..01242}.tar``,
  ``{a,b}.tar``, several ``::``-separated patterns) or a folder of ``*.tar``. Members sharing a key
  (the member path up to the first ``.`` of its base name) form one sample: ``KEY.jpg|jpeg|png|webp``
  plus ``KEY.txt`` and/or ``KEY.json`` (caption from ``text_field``/``caption``; other JSON-able
  keys kept). One work unit per tar file.
* ImageNet-style class folders (``ROOT/<class>/*.JPEG``) with a class-name caption table
  (``class_names``: JSON ``{folder: caption}`` or list in sorted-folder order, or text lines
  ``folder caption`` / ``caption``): ``text`` = the caption, ``label`` = the class index, ``class``.
* LLaVA JSON (a ``.json`` file holding a list of ``{"id", "image", "conversations"}``): images
  relative to ``image_root`` (default: the file's folder); ``conversations`` kept with their
  ``<image>`` placeholders (the mmu formatter removes them). Text-only rows are skipped (counted).
* a folder of images with ``metadata.jsonl`` / ``captions.jsonl`` / one ``*.jsonl``, a bare image
  folder (caption from ``<stem>.txt``), a ``.jsonl`` file, a ``.parquet`` file or folder.
  Row-indexed formats are cut into units of ``shard_size`` rows.

Units yield :class:`Row` (an image reference still to decode) or :class:`BadRow` (input that can
never become a record: a line that is not JSON, a tar member without its image, a truncated tar,
...). Nothing is dropped silently: the caller counts every :class:`BadRow` by ``reason``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
import zlib
from typing import Any, Iterator, NamedTuple, Sequence

from mmada_jax.data.images import IMAGE_EXTENSIONS

IMAGE_KEYS = ("file_name", "image", "image_path", "path", "file", "img", "jpg", "png")
METADATA_NAMES = ("metadata.jsonl", "captions.jsonl")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class Row(NamedTuple):
  """One input sample: ``ref`` (path / bytes / HF dict) resolved against ``base``, its text fields,
  and ``where`` (``file:line``, ``tar:key``, ...) for reports."""
  ref: Any
  base: str
  fields: dict[str, Any]
  where: str


class BadRow(NamedTuple):
  """Input that cannot become a record: ``reason`` (a short snake_case word), ``where``, ``detail``."""
  reason: str
  where: str
  detail: str


@dataclasses.dataclass(frozen=True)
class Unit:
  """One work unit (one output shard): ``name`` (its source, for the manifest) and how to read it."""
  name: str
  inputs: Any
  lo: int = 0
  hi: int = 0

  def rows(self) -> Iterator[Row | BadRow]:
    return self.inputs.unit_rows(self)


# ---- brace patterns ----------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """``a{00..02}b`` -> ``a00b a01b a02b`` (zero padding kept), ``{x,y}`` -> both, nested left to
  right; ``::`` separates several patterns (webdataset's convention)."""
  if "::" in pattern:
    return [p for part in pattern.split("::") for p in expand_braces(part)]
  m = _BRACE.search(pattern)
  if m is None:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if rng:
    a, b = rng.group(1), rng.group(2)
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    lo, hi = int(a), int(b)
    if hi < lo:
      raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards")
    items = [str(i).zfill(width) for i in range(lo, hi + 1)]
  else:
    items = body.split(",")
  return [p for item in items for p in expand_braces(head + item + tail)]


def _is_tar_spec(path: str) -> bool:
  return any(p.endswith(TAR_SUFFIXES) for p in path.split("::")) and ("{" in path or "::" in path
                                                                       or os.path.isfile(path))


# ---- webdataset tar shards -----------------------------------------------------------------------

def _jsonable(v: Any) -> bool:
  if v is None or isinstance(v, (str, bool, int, float)):
    return True
  if isinstance(v, (list, tuple)):
    return all(_jsonable(x) for x in v)
  if isinstance(v, dict):
    return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
  return False


def _split_key(name: str) -> tuple[str, str]:
  d, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(d, stem) if d else stem), ext.lower() if dot else ""


class TarInputs:
  """webdataset tar shards, one unit per file (see the module docstring)."""

  def __init__(self, paths: Sequence[str], text_field: str = "text", spec: str = ""):
    self.paths = [os.path.abspath(p) for p in paths]
    self.text_field = text_field
    self.spec = spec
    missing = [p for p in self.paths if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"--input {spec!r}: {len(missing)} of {len(self.paths)} tar shards do not exist, "
                              f"e.g. {missing[:3]}")
    self.units = [Unit(p, self) for p in self.paths]

  def describe(self) -> str:
    return self.spec

  def _sample(self, tar: str, key: str, parts: dict[str, bytes]) -> Row | BadRow:
    where = f"{tar}:{key}"
    image_ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
    if image_ext is None:
      return BadRow("missing_image", where, f"members {sorted(parts)} hold no {'/'.join(TAR_IMAGE_EXTS)}")
    fields: dict[str, Any] = {}
    text = None
    if "json" in parts:
      try:
        meta = json.loads(parts["json"])
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return BadRow("bad_json", f"{where}.json", str(e))
      if not isinstance(meta, dict):
        return BadRow("bad_json", f"{where}.json", f"expected an object, got {type(meta).__name__}")
      for k in (self.text_field, "caption"):
        if isinstance(meta.get(k), str):
          text = meta[k]
          break
      fields.update({k: v for k, v in meta.items() if k not in (self.text_field, "caption", "codes") and _jsonable(v)})
    if "txt" in parts:
      try:
        text = parts["txt"].decode("utf-8").strip()
      except UnicodeDecodeError as e:
        return BadRow("bad_text", f"{where}.txt", str(e))
    if text is None:
      return BadRow("missing_text", where, f"members {sorted(parts)}: no .txt, and no {self.text_field!r} in .json")
    fields["text"] = text
    fields["key"] = key
    return Row(parts[image_ext], "", fields, f"{where}.{image_ext}")

  def unit_rows(self, unit: Unit) -> Iterator[Row | BadRow]:
    path = unit.name
    plain = path.endswith(".tar")
    key, parts, last, reading = None, {}, "(start)", None
    try:
      with open(path, "rb") as fh:
        with tarfile.open(fileobj=fh, mode="r:" if plain else "r|*") as tf:
          for member in tf:
            if not member.isfile():
              continue
            k, ext = _split_key(member.name)
            if k != key and key is not None:
              yield self._sample(path, key, parts)
              parts = {}
            key, reading = k, member.name
            data = tf.extractfile(member).read()
            if len(data) != member.size:
              raise tarfile.ReadError(f"member {member.name} holds {len(data)} of {member.size} bytes")
            parts[ext], last, reading = data, member.name, None
          if plain:  # a complete tar ends with two zero blocks; a cut one does not
            fh.seek(tf.offset)
            trailer = fh.read(1024)
            if len(trailer) < 1024 or trailer.strip(b"\0"):
              raise tarfile.ReadError("no end-of-archive marker (file cut short)")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      if reading is not None:  # the sample of the member being read is cut off
        yield BadRow("truncated_tar", f"{path}:{key}", f"member {reading} cut off: {e}")
      else:
        if key is not None and parts:
          yield self._sample(path, key, parts)
        yield BadRow("truncated_tar", path, f"after member {last}: {e}")
      return
    if key is not None:
      yield self._sample(path, key, parts)


# ---- row-indexed inputs ----------------------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict[str, Any] | BadRow]:
  rows: list[dict[str, Any] | BadRow] = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        rows.append(BadRow("bad_json", f"{path}:{n}", str(e)))
        continue
      if not isinstance(row, dict):
        rows.append(BadRow("bad_json", f"{path}:{n}", f"expected a JSON object, got {type(row).__name__}"))
        continue
      rows.append(dict(row, __where__=f"{path}:{n}"))
  return rows


def _read_json_list(path: str) -> list[dict[str, Any] | BadRow]:
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"--input {path!r} is not valid JSON ({e})") from None
  if not isinstance(data, list):
    raise ValueError(f"--input {path!r}: expected a JSON list of rows (LLaVA style), got {type(data).__name__}")
  return [dict(r, __where__=f"{path}[{i}]") if isinstance(r, dict)
          else BadRow("bad_json", f"{path}[{i}]", f"expected an object, got {type(r).__name__}")
          for i, r in enumerate(data)]


def read_class_names(path: str, classes: Sequence[str]) -> dict[str, str]:
  """The caption table for ImageNet-style folders: ``{class folder: caption}``."""
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  if path.endswith(".json"):
    table = json.loads(raw)
    if isinstance(table, list):
      if len(table) != len(classes):
        raise ValueError(f"class-name list {path!r} has {len(table)} names for {len(classes)} class folders")
      return dict(zip(classes, map(str, table)))
    if isinstance(table, dict):
      # {"0": ["n01440764", "tench"]} (torchvision's imagenet_class_index.json) or {folder: caption}
      if all(isinstance(v, list) and len(v) == 2 for v in table.values()):
        return {str(v[0]): str(v[1]) for v in table.values()}
      return {str(k): str(v) for k, v in table.items()}
    raise ValueError(f"class-name file {path!r}: expected a JSON object or list")
  lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
  first = [ln.split(None, 1) for ln in lines]
  if all(len(p) == 2 and p[0] in set(classes) for p in first):
    return {p[0]: p[1] for p in first}
  if len(lines) != len(classes):
    raise ValueError(f"class-name file {path!r} has {len(lines)} lines for {len(classes)} class folders "
                     "(expected 'folder caption' lines or one caption per folder in sorted order)")
  return dict(zip(classes, lines))


class IndexedInputs:
  """Row-indexed inputs (jsonl / LLaVA json / parquet / image folders), units of ``shard_size`` rows."""

  def __init__(self, path: str, *, text_field: str = "text", image_field: str | None = None,
               class_names: str | None = None, image_root: str | None = None, shard_size: int = 2048):
    self.path = os.path.abspath(path)
    self.text_field, self.image_field = text_field, image_field
    self._parquet: list[str] = []
    self._rows: list[dict[str, Any] | BadRow] | None = None
    self.base_dir = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
    if image_root:
      self.base_dir = os.path.abspath(image_root)
    if class_names:
      if not os.path.isdir(self.path):
        raise ValueError(f"--class-names needs a folder of class folders, got {path!r}")
      self._rows = self._class_folder_rows(class_names)
    elif os.path.isdir(self.path):
      meta = [os.path.join(self.path, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(self.path, n))]
      jsonls = sorted(glob.glob(os.path.join(self.path, "*.jsonl")))
      parquets = sorted(glob.glob(os.path.join(self.path, "*.parquet")))
      if meta:
        self._rows = _read_jsonl(meta[0])
      elif len(jsonls) == 1:
        self._rows = _read_jsonl(jsonls[0])
      elif len(jsonls) > 1:
        raise ValueError(f"--input {path!r} holds several .jsonl files {jsonls}; name one, or call it metadata.jsonl")
      elif parquets:
        self._parquet = parquets
      else:
        self._rows = self._image_folder_rows()
    elif self.path.endswith(".jsonl"):
      self._rows = _read_jsonl(self.path)
    elif self.path.endswith(".json"):
      with open(self.path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
      self._rows = _read_json_list(self.path) if head.startswith("[") else _read_jsonl(self.path)
    elif self.path.endswith(".parquet"):
      self._parquet = [self.path]
    else:
      raise ValueError(f"--input {path!r}: expected a folder, .jsonl, .json, .parquet, .tar or a brace pattern")
    if self._parquet:
      import pyarrow.parquet as pq
      self._pq_counts = [pq.ParquetFile(p).metadata.num_rows for p in self._parquet]
    n = len(self)
    if n == 0:
      raise ValueError(f"--input {path!r} holds no rows")
    self.units = [Unit(f"{self.path}[{lo}:{min(lo + shard_size, n)}]", self, lo, min(lo + shard_size, n))
                  for lo in range(0, n, shard_size)]

  def _image_folder_rows(self) -> list[dict[str, Any]]:
    rows = []
    for root, dirs, files in os.walk(self.path):
      dirs.sort()
      for name in sorted(files):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          full = os.path.join(root, name)
          txt = os.path.splitext(full)[0] + ".txt"
          text = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
          rows.append({"file_name": os.path.relpath(full, self.path), "text": text, "__where__": full})
    return rows

  def _class_folder_rows(self, class_names: str) -> list[dict[str, Any]]:
    classes = sorted(d for d in os.listdir(self.path) if os.path.isdir(os.path.join(self.path, d)))
    if not classes:
      raise ValueError(f"--input {self.path!r} holds no class folders")
    table = read_class_names(class_names, classes)
    missing = [c for c in classes if c not in table]
    if missing:
      raise ValueError(f"--class-names {class_names!r} has no caption for {len(missing)} class folders, "
                       f"e.g. {missing[:5]}")
    rows = []
    for label, c in enumerate(classes):
      for root, dirs, files in os.walk(os.path.join(self.path, c)):
        dirs.sort()
        for name in sorted(files):
          full = os.path.join(root, name)
          rows.append({"file_name": os.path.relpath(full, self.path), "text": table[c], "label": label,
                       "class": c, "__where__": full})
    return rows

  def __len__(self) -> int:
    return len(self._rows) if self._rows is not None else sum(self._pq_counts)

  def describe(self) -> str:
    return self.path

  def _split(self, row: dict[str, Any] | BadRow, where: str) -> Row | BadRow:
    if isinstance(row, BadRow):
      return row
    where = row.get("__where__", where)
    key = self.image_field or next((k for k in IMAGE_KEYS if k in row), None)
    if key is None or key not in row or row[key] is None:
      reason = "no_image" if "conversations" in row or "messages" in row else "no_image_column"
      return BadRow(reason, where, f"looked for {[self.image_field] if self.image_field else list(IMAGE_KEYS)}; "
                    f"keys: {sorted(k for k in row if k != '__where__')}")
    text_key = self.text_field if self.text_field in row else ("caption" if "caption" in row else None)
    fields: dict[str, Any] = {"text": "" if text_key is None or row[text_key] is None else str(row[text_key])}
    for k, v in row.items():
      if k in (key, text_key, "codes", "__where__") or k in fields:
        continue
      if _jsonable(v):
        fields[k] = v
    ref = row[key]
    if isinstance(ref, (str, os.PathLike)):
      where = os.path.join(self.base_dir, os.fspath(ref))
    return Row(ref, self.base_dir, fields, where)

  def unit_rows(self, unit: Unit) -> Iterator[Row | BadRow]:
    start, stop = unit.lo, unit.hi
    if self._rows is not None:
      for i in range(start, stop):
        yield self._split(self._rows[i], f"{self.path}[{i}]")
      return
    import pyarrow.parquet as pq
    offset = 0
    for path, count in zip(self._parquet, self._pq_counts):
      if offset + count <= start or offset >= stop:
        offset += count
        continue
      pf = pq.ParquetFile(path)
      row_offset = offset
      for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row_offset + n > start and row_offset < stop:
          for j, row in enumerate(pf.read_row_group(g).to_pylist()):
            i = row_offset + j
            if start <= i < stop:
              r = self._split(row, f"{path}[{i - offset}]")
              if isinstance(r, Row):
                r = r._replace(base=os.path.dirname(path) if self.base_dir == self.path else self.base_dir)
                if not isinstance(r.ref, (str, os.PathLike)):
                  r = r._replace(where=f"{path}[{i - offset}]")
              yield r
        row_offset += n
      offset += count


def open_inputs(path: str, *, text_field: str = "text", image_field: str | None = None,
                class_names: str | None = None, image_root: str | None = None,
                shard_size: int = 2048) -> TarInputs | IndexedInputs:
  """The inputs at ``path`` (see the module docstring); ``.units`` lists the work units."""
  if _is_tar_spec(path):
    paths = expand_braces(path)
    return TarInputs(paths, text_field, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input: no such file or folder: {path!r}")
  if os.path.isdir(path) and not class_names:
    tars = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(TAR_SUFFIXES))
    has_other = any(glob.glob(os.path.join(path, f"*{e}")) for e in (".jsonl", ".parquet"))
    if tars and not has_other:
      return TarInputs(tars, text_field, os.path.abspath(path))
  return IndexedInputs(path, text_field=text_field, image_field=image_field, class_names=class_names,
                       image_root=image_root, shard_size=shard_size)


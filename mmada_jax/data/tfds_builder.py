"""A tensorflow-datasets builder (array_record files, no TensorFlow needed) for local MMaDA data.

Configs (``mmada_data/<config>``) and features:

* ``t2i``: ``codes`` int16 [N] (image codes), ``text`` (caption).
* ``mmu``: ``codes`` int16 [N], ``text``, ``messages`` / ``conversations`` (JSON strings),
  ``content`` (pre-formatted chat string).
* ``text``: ``text``.
* ``chat``: ``text``, ``messages`` / ``conversations`` (JSON strings), ``content``.

Empty strings stand for absent optional fields (``TfdsSource`` drops them when reading). The manual
dir holds the input: a token-shard folder (``t2i``/``mmu``, from ``tokenize_images``) or jsonl /
parquet (``text``/``chat``, any format of :func:`mmada_jax.data.sources.open_source`). It may instead
hold one entry per split (``train``, ``validation``, ``test``: a sub-folder or
``<split>.jsonl``/``<split>.parquet``). Nothing is downloaded.

Usage::

  builder = prepare("t2i", manual_dir="tokens/cc12m", data_dir="tfds")
  source = builder.as_data_source("train")          # random access, decoded to numpy/bytes
  ds = grain.MapDataset.source(source)               # or data.t2i.path = builder.data_dir

  python -m mmada_jax.data.tfds_builder --kind t2i --manual-dir tokens/cc12m --data-dir tfds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmada_jax.data.sources import detect_format, open_source

KINDS = ("t2i", "mmu", "text", "chat")
SPLITS = ("train", "validation", "test")
_CHAT_FIELDS = ("messages", "conversations", "content")
_INT16_MAX = np.iinfo(np.int16).max


def _text() -> tfds.features.Text:
  return tfds.features.Text()


def _features(kind: str) -> tfds.features.FeaturesDict:
  feats: dict[str, Any] = {"text": _text()}
  if kind in ("t2i", "mmu"):
    feats["codes"] = tfds.features.Tensor(shape=(None,), dtype=np.int16)
  if kind in ("mmu", "chat"):
    feats.update({k: _text() for k in _CHAT_FIELDS})
  return tfds.features.FeaturesDict(feats)


def _example(kind: str, rec: dict[str, Any], where: str) -> dict[str, Any]:
  ex: dict[str, Any] = {"text": str(rec.get("text") or rec.get("caption") or "")}
  if kind in ("t2i", "mmu"):
    if "codes" not in rec:
      raise ValueError(f"{where}: no image 'codes'; the {kind} config reads token shards from tokenize_images")
    codes = np.asarray(rec["codes"]).reshape(-1)
    if codes.size and int(codes.max()) > _INT16_MAX:
      raise ValueError(f"{where}: code {int(codes.max())} does not fit int16")
    ex["codes"] = codes.astype(np.int16)
  if kind in ("mmu", "chat"):
    for k in ("messages", "conversations"):
      ex[k] = json.dumps(rec[k]) if rec.get(k) else ""
    ex["content"] = str(rec.get("content") or "")
  return ex


class MmadaData(tfds.core.GeneratorBasedBuilder):
  """MMaDA training data from a local folder (``manual_dir``), stored as array_record."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First layout: t2i / mmu / text / chat configs."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k, description=f"MMaDA {k} data") for k in KINDS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Point manual_dir at a token-shard folder (t2i/mmu) or jsonl/parquet data "
                                  "(text/chat), or at a folder with one such entry per split.")

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. tfds's default looks the package up through ``importlib_resources``, a module it
    imports but only requires on Python < 3.9."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=f"MMaDA {self.builder_config.name} data",
                                 features=_features(self.builder_config.name))

  def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    manual = os.fspath(dl_manager.manual_dir)
    splits = {}
    if os.path.isdir(manual):
      for split in SPLITS:
        for cand in (os.path.join(manual, split), os.path.join(manual, f"{split}.jsonl"),
                     os.path.join(manual, f"{split}.parquet")):
          if os.path.exists(cand):
            splits[split] = cand
            break
    if not splits:
      detect_format(manual)  # ValueError naming the folder when nothing readable is there
      splits = {"train": manual}
    return {split: self._generate_examples(path) for split, path in splits.items()}

  def _generate_examples(self, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    kind = self.builder_config.name
    source = open_source(path, "auto", key=f"manual_dir ({kind})")
    for i in range(len(source)):
      yield i, _example(kind, source[i], f"{path} record {i}")


def prepare(kind: str, manual_dir: str, data_dir: str, *, overwrite: bool = False) -> MmadaData:
  """Builds (or reuses) ``data_dir/mmada_data/<kind>/1.0.0`` from ``manual_dir``; returns the builder.

  ``builder.data_dir`` is the version folder to put in ``data.<task>.path`` (format ``tfds``).
  Raises FileNotFoundError when ``manual_dir`` does not exist.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not os.path.exists(manual_dir):
    raise FileNotFoundError(f"manual_dir {manual_dir!r} does not exist")
  if not os.path.isdir(manual_dir):
    raise ValueError(f"manual_dir {manual_dir!r} must be a folder (tfds reads manual data from a folder); "
                     "move the file into one")
  builder = MmadaData(config=kind, data_dir=data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir), download_mode=mode, try_download_gcs=False))
  return builder


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mmada_jax.data.tfds_builder", description=__doc__.split("\n")[0])
  p.add_argument("--kind", choices=KINDS, required=True)
  p.add_argument("--manual-dir", required=True, help="input folder or file")
  p.add_argument("--data-dir", required=True, help="tfds data dir (output)")
  p.add_argument("--overwrite", action="store_true", help="regenerate an existing dataset")
  args = p.parse_args(argv)
  builder = prepare(args.kind, args.manual_dir, args.data_dir, overwrite=args.overwrite)
  counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"prepared {builder.data_dir}: {counts}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

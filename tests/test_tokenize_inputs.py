"""tokenize_images on the original's input formats, bad input, and many processes / devices."""
from __future__ import annotations

import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmada_jax.data.image_inputs import expand_braces
from mmada_jax.data.images import preprocess_image
from mmada_jax.data.sources import open_source
from mmada_jax.data.tokenize_images import tokenize_images

REPO = pathlib.Path(__file__).resolve().parents[1]
R = 8


@pytest.fixture(scope="module")
def image_tok():
  import jax
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
  vq = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), resolution=8)
  return ImageTokenizer.init(MagvitConfig(encoder=vq, decoder=vq, class_name="TinyMAGVITv2"), jax.random.PRNGKey(0))


def _img_bytes(seed: int, fmt: str = "PNG", size=(10, 12)) -> bytes:
  arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


def _tar(path: str, members: list[tuple[str, bytes]]) -> str:
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


def _codes(tok, refs) -> np.ndarray:
  return np.asarray(tok.encode(np.stack([preprocess_image(r, R, "clip") for r in refs])))


def _shard_bytes(folder: str) -> dict[str, bytes]:
  return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
          if n.endswith(".array_record")}


def test_expand_braces():
  assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
  assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
  assert expand_braces("x.tar::y/{1..2}.tar") == ["x.tar", "y/1.tar", "y/2.tar"]


def test_webdataset_tars_with_bad_members(image_tok, tmp_path):
  good = [_img_bytes(i, fmt) for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "PNG", "PNG"])]
  _tar(str(tmp_path / "s-00000.tar"), [
      ("a/k0.jpg", good[0]), ("a/k0.txt", b"zero"),
      ("a/k1.png", good[1]), ("a/k1.json", json.dumps({"caption": "one", "id": 1}).encode()),
      ("a/k2.txt", b"no image here"),                       # a member without its image
      ("a/k3.webp", good[2]), ("a/k3.txt", b"three")])
  _tar(str(tmp_path / "s-00001.tar"), [
      ("k4.png", b"not an image"), ("k4.txt", b"four"),     # an image that is not an image
      ("k5.png", good[3]), ("k5.json", b"{not json"),       # a JSON member that does not parse
      ("k6.png", good[4]), ("k6.txt", b"six")])
  whole = _tar(str(tmp_path / "full.tar"), [("k7.png", good[0]), ("k7.txt", b"seven"),
                                            ("k8.png", _img_bytes(9, size=(64, 64))), ("k8.txt", b"eight")])
  data = open(whole, "rb").read()
  with tarfile.open(whole) as tf:
    cut = tf.getmember("k8.png").offset_data + 100
  open(tmp_path / "s-00002.tar", "wb").write(data[:cut])  # cut inside k8.png
  os.remove(whole)
  out = str(tmp_path / "out")
  m = tokenize_images(image_tok, str(tmp_path / "s-{00000..00002}.tar"), out, resolution=R, batch_size=2,
                      progress=False)
  assert [s["count"] for s in m["shards"]] == [3, 1, 1] and m["count"] == 5
  reasons = m["skipped"]["reasons"]
  assert {r: e["count"] for r, e in reasons.items()} == {"missing_image": 1, "not_an_image": 1, "bad_json": 1,
                                                         "truncated_tar": 1}
  assert reasons["missing_image"]["examples"][0]["where"].endswith("s-00000.tar:a/k2")
  assert reasons["not_an_image"]["examples"][0]["where"].endswith("s-00001.tar:k4.png")
  assert reasons["bad_json"]["examples"][0]["where"].endswith("s-00001.tar:k5.json")
  assert reasons["truncated_tar"]["examples"][0]["where"].endswith("s-00002.tar:k8")
  assert m["skipped"]["count"] == 4 and sorted(os.listdir(out)) == ["manifest.json"] + [s["file"] for s in m["shards"]]
  src = open_source(out)
  assert [src[i]["text"] for i in range(5)] == ["zero", "one", "three", "six", "seven"]
  assert src[1]["id"] == 1 and src[0]["key"] == "a/k0"
  want = _codes(image_tok, [good[0], good[1], good[2], good[4], good[0]])
  for i in range(5):
    np.testing.assert_array_equal(src[i]["codes"], want[i])


def test_truncated_tar_strict_writes_nothing_half(image_tok, tmp_path):
  t = _tar(str(tmp_path / "a.tar"), [("k0.png", _img_bytes(0)), ("k0.txt", b"x"),
                                     ("k1.png", _img_bytes(1, size=(64, 64))), ("k1.txt", b"y")])
  with tarfile.open(t) as tf:
    cut = tf.getmember("k1.png").offset_data + 10
  data = open(t, "rb").read()
  open(t, "wb").write(data[:cut])  # the last sample and the trailer gone
  out = str(tmp_path / "out")
  with pytest.raises(RuntimeError, match=r"truncated_tar: .*a\.tar"):
    tokenize_images(image_tok, t, out, resolution=R, batch_size=2, progress=False, skip_bad=False)
  assert not os.path.exists(out)
  assert sorted(os.listdir(out + ".partial")) == ["settings.json"]  # no shard, not even a temporary one


def test_imagenet_folders_llava_json_and_bad_jsonl(image_tok, tmp_path):
  root = tmp_path / "imagenet"
  for c, n in (("n02", 2), ("n01", 1)):
    (root / c).mkdir(parents=True)
    for j in range(n):
      (root / c / f"{c}_{j}.JPEG").write_bytes(_img_bytes(j, "JPEG"))
  (root / "n02" / "broken.JPEG").write_bytes(_img_bytes(5, "JPEG", (32, 32))[:300])  # cut short
  names = tmp_path / "classes.json"
  names.write_text(json.dumps({"0": ["n01", "tench, Tinca tinca"], "1": ["n02", "goldfish"]}))
  m = tokenize_images(image_tok, str(root), str(tmp_path / "in_out"), resolution=R, batch_size=2, progress=False,
                      class_names=str(names))
  src = open_source(str(tmp_path / "in_out"))
  assert m["count"] == 3 and [src[i]["text"] for i in range(3)] == ["tench, Tinca tinca", "goldfish", "goldfish"]
  assert [src[i]["label"] for i in range(3)] == [0, 1, 1] and src[2]["class"] == "n02"
  bad = m["skipped"]["reasons"]
  assert list(bad) == ["corrupt_image"] and bad["corrupt_image"]["examples"][0]["where"].endswith("broken.JPEG")

  imgs = tmp_path / "coco"
  imgs.mkdir()
  (imgs / "a.png").write_bytes(_img_bytes(3))
  conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
  llava = tmp_path / "llava.json"
  llava.write_text(json.dumps([{"id": "x1", "image": "a.png", "conversations": conv},
                               {"id": "t1", "conversations": conv},           # text-only row
                               {"id": "x2", "image": "gone.png", "conversations": conv}]))
  m = tokenize_images(image_tok, str(llava), str(tmp_path / "ll_out"), resolution=R, batch_size=2, progress=False,
                      image_root=str(imgs))
  src = open_source(str(tmp_path / "ll_out"))
  assert m["count"] == 1 and src[0]["conversations"] == conv and src[0]["id"] == "x1"
  bad = m["skipped"]["reasons"]
  assert {r: e["count"] for r, e in bad.items()} == {"no_image": 1, "image_not_found": 1}
  assert bad["no_image"]["examples"][0]["where"] == f"{llava}[1]"
  assert bad["image_not_found"]["examples"][0]["where"].endswith("gone.png")

  folder = tmp_path / "jl"
  folder.mkdir()
  (folder / "a.png").write_bytes(_img_bytes(4))
  (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "te\n')
  m = tokenize_images(image_tok, str(folder), str(tmp_path / "jl_out"), resolution=R, progress=False)
  assert m["count"] == 1 and m["skipped"]["reasons"]["bad_json"]["examples"][0]["where"] == \
      f"{folder / 'metadata.jsonl'}:2"


def _tar_inputs(folder: pathlib.Path, n_tars: int = 4, per: int = 3) -> str:
  folder.mkdir()
  for t in range(n_tars):
    _tar(str(folder / f"{t:05d}.tar"), [m for k in range(per) for m in
                                        ((f"{t}_{k}.png", _img_bytes(10 * t + k)), (f"{t}_{k}.txt", b"c%d" % k))])
  return str(folder / f"{{00000..{n_tars - 1:05d}}}.tar")


def test_independent_jobs_share_the_shards(image_tok, tmp_path):
  pattern = _tar_inputs(tmp_path / "tars")
  ref = tokenize_images(image_tok, pattern, str(tmp_path / "one"), resolution=R, batch_size=2, progress=False)
  out = str(tmp_path / "two")
  got1 = tokenize_images(image_tok, pattern, out, resolution=R, batch_size=2, progress=False, process_index=1,
                         process_count=2)
  assert got1["shards"] == [ref["shards"][1]["file"], ref["shards"][3]["file"]] and not os.path.exists(out)
  m = tokenize_images(image_tok, pattern, out, resolution=R, batch_size=2, progress=False, process_index=0,
                      process_count=2, wait_timeout=5)
  assert m["count"] == ref["count"] == 12 and m["processes"] == 2
  assert _shard_bytes(out) == _shard_bytes(str(tmp_path / "one"))


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_four_devices_match_one_device(image_tok, tmp_path):
  pattern = _tar_inputs(tmp_path / "tars", n_tars=5, per=5)
  tok_dir = str(tmp_path / "tok")
  image_tok.save_pretrained(tok_dir)
  ref = str(tmp_path / "ref")
  tokenize_images(image_tok, pattern, ref, resolution=R, batch_size=4, progress=False)  # 1 process, 1 device
  out, port = str(tmp_path / "mp"), _port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, "-m", "mmada_jax.data.tokenize_images", "--tokenizer", tok_dir,
                             "--input", pattern, "--output", out, "--resolution", str(R), "--batch-size", "4",
                             "--quiet", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                             "--process-id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  m = json.load(open(os.path.join(out, "manifest.json")))
  assert m["count"] == 25 and m["processes"] == 2
  assert _shard_bytes(out) == _shard_bytes(ref) and len(_shard_bytes(ref)) == 5

"""Image pre-tokenisation throughput: measured on this host, estimated ahead of time for TPUs (one JSON line).

  python bench/bench_tokenize.py [--images 256 --shards 4 --resolution 32 --batch-size 16]
      [--topologies v5e:1x1,v5p:1x1x1 --tpu-batch 32 --dataset-images 12e6] [--skip-cpu] [--skip-tpu]

* ``cpu``: a small random MAGVIT-v2 (32-px tiny config, saved with ``save_pretrained``) through the
  real ``python -m mmada_jax.data.tokenize_images`` command over ``--images`` synthetic JPEGs in
  ``--shards`` webdataset tars: one process, then two (``--process-index i --process-count 2``)
  started concurrently as subprocesses. Wall time includes process start, tokenizer load, compile,
  decode/resize and writing; ``startup_seconds`` is the wall time of the same command over one
  batch, and ``images_per_second_after_startup`` = (N − batch) / (wall − startup).
* ``magvit_512``: FLOPs per 512×512 image of the released encoder (``MagvitConfig.default_512()``,
  encode = encoder + LFQ indices), from XLA's ``cost_analysis()`` of the jitted encode compiled on
  this CPU, checked against an analytical count (2·MACs of every conv and attention matmul).
* ``tpu``: the same encode of ``--tpu-batch`` images compiled ahead of time for one chip of each
  ``--topologies`` slice (libtpu's abstract devices, ``--tpu-dtype`` compute and weights; bf16 at the default
  conv precision, float32 at HIGHEST as the tokenizer's default). The
  roofline time max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) of XLA's counts is a
  lower bound on the batch time, so images/s and chip-hours for ``--dataset-images`` are
  *estimates* (optimistic; no input pipeline, no host transfer).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


# ---- tiny tokenizer and synthetic inputs ------------------------------------------------------

def tiny_config():
  """A 32-px MAGVIT-v2 (f = 8, 13 bits): the layout of the project's tiny test fixture."""
  from mmada_jax.image_tokenizer import MagvitConfig, VQGANConfig
  enc = VQGANConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=(1, 1, 1, 1), resolution=32)
  dec = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=(1, 2, 1, 1), resolution=32)
  return MagvitConfig(encoder=enc, decoder=dec, class_name="TinyMAGVITv2")


def write_tars(folder: str, n_images: int, n_shards: int, size: int, seed: int = 0) -> str:
  """``n_images`` random-noise JPEGs (``size``² px, with a ``.txt`` caption) over ``n_shards`` tars;
  returns the brace pattern of the shards."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  per = [n_images // n_shards + (s < n_images % n_shards) for s in range(n_shards)]
  k = 0
  for s, count in enumerate(per):
    with tarfile.open(os.path.join(folder, f"shard-{s:05d}.tar"), "w") as tf:
      for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        for name, data in ((f"{k:08d}.jpg", buf.getvalue()), (f"{k:08d}.txt", f"image {k}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tf.addfile(info, io.BytesIO(data))
        k += 1
  return os.path.join(folder, f"shard-{{00000..{n_shards - 1:05d}}}.tar")


def _command(tok: str, src: str, out: str, args, extra: list[str]) -> list[str]:
  return [sys.executable, "-m", "mmada_jax.data.tokenize_images", "--tokenizer", tok, "--input", src,
          "--output", out, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
          "--quiet", *extra]


def run_processes(tok: str, src: str, out: str, args, count: int) -> float:
  """Wall seconds of ``count`` concurrent tokenize_images jobs (disjoint shards) over ``src``."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  extra = lambda i: [] if count == 1 else ["--process-index", str(i), "--process-count", str(count)]  # noqa: E731
  t0 = time.perf_counter()
  procs = [subprocess.Popen(_command(tok, src, out, args, extra(i)), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(count)]
  results = [p.communicate() for p in procs]
  wall = time.perf_counter() - t0
  for p, (o, e) in zip(procs, results):
    if p.returncode:
      raise RuntimeError(f"tokenize_images exited {p.returncode}:\n{o}\n{e[-3000:]}")
  return wall


def bench_cpu(args) -> dict[str, Any]:
  from mmada_jax.api.image_tokenizer import ImageTokenizer
  from mmada_jax.data import records
  with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
    tok_dir = os.path.join(tmp, "magvit")
    tok = ImageTokenizer.init(tiny_config(), 0)
    tok.save_pretrained(tok_dir)
    src_dir = os.path.join(tmp, "src")
    os.makedirs(src_dir)
    src = write_tars(src_dir, args.images, args.shards, args.source_size)
    one_dir = os.path.join(tmp, "one")
    os.makedirs(one_dir)
    one = write_tars(one_dir, args.batch_size, 1, args.source_size, seed=1)
    startup = run_processes(tok_dir, one, os.path.join(tmp, "out0"), args, 1)
    out: dict[str, Any] = {
        "tokenizer": "tiny random MAGVIT-v2", "tokenizer_params": tok.num_params,
        "resolution": args.resolution, "grid": list(tok.grid_size(args.resolution, args.resolution)),
        "source_jpeg_px": args.source_size, "images": args.images, "shards": args.shards,
        "batch_size": args.batch_size, "cpu_cores": os.cpu_count(), "load_average_before": os.getloadavg()[0],
        "startup_seconds": round(startup, 2), "runs": {}}
    for count in (1, 2):
      dst = os.path.join(tmp, f"out{count}")
      wall = run_processes(tok_dir, src, dst, args, count)
      got = records.read_manifest(dst)["count"]
      if got != args.images:
        raise RuntimeError(f"{count} process(es) wrote {got} of {args.images} images")
      steady = (args.images - args.batch_size) / max(wall - startup, 1e-9)
      out["runs"][f"{count}_process{'es' if count > 1 else ''}"] = {
          "wall_seconds": round(wall, 2), "images_per_second": round(args.images / wall, 1),
          "images_per_second_after_startup": round(steady, 1)}
    out["load_average_after"] = os.getloadavg()[0]
  return out


# ---- 512-px encoder: FLOPs and TPU estimates ---------------------------------------------------

def analytical_encode_flops(cfg, res: int) -> float:
  """2·MACs per image of the encoder's convs and attention matmuls at ``res``² px (norms,
  activations and the LFQ not counted)."""
  e = cfg.encoder
  flops, h, c = 0.0, res, e.in_ch

  def conv(cin: int, cout: int, k: int, side: int) -> float:
    return 2.0 * side * side * cin * cout * k * k

  def resnet(cin: int, cout: int, side: int) -> float:
    return conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + (conv(cin, cout, 1, side) if cin != cout else 0.0)

  def attn(ch: int, side: int) -> float:
    n = side * side
    return 4 * conv(ch, ch, 1, side) + 2 * (2.0 * n * n * ch)

  flops += conv(c, e.ch, 3, h)
  c = e.ch
  attn_levels = e.encoder_attn_levels()
  for level in range(e.num_levels):
    co = e.level_channels(level)
    for _ in range(e.num_res_blocks[level]):
      flops += resnet(c, co, h)
      c = co
      if attn_levels[level]:
        flops += attn(c, h)
    if level != e.num_levels - 1:
      h = (h - 2) // 2 + 1 + (1 if h % 2 == 0 else 0)  # pad right/bottom by 1, 3x3 stride 2 VALID
      flops += conv(c, c, 3, h)
  flops += 2 * resnet(c, c, h) + attn(c, h)
  flops += conv(c, e.z_channels, 3, h) + conv(e.z_channels, e.z_channels, 1, h)
  return flops


def compile_encode(cfg, batch: int, res: int, dtype: str, devices=None):
  """The jitted ``encode`` of ``batch`` ``res``² images, lowered on abstract params and compiled
  (for ``devices[0]`` when given: an abstract TPU chip); returns (compiled, seconds)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from mmada_jax.image_tokenizer.modules import HIGHEST, MagvitModel, abstract_params

  # bf16 convs at the default precision (HIGHEST on bf16 operands fails in libtpu's Mosaic kernels)
  model = MagvitModel(cfg, dtype=jnp.dtype(dtype), precision=HIGHEST if jnp.dtype(dtype) == jnp.float32 else None)
  sharding = None if devices is None else NamedSharding(Mesh(np.array(devices[:1]), ("data",)), P())
  params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=sharding),
                                  abstract_params(cfg))
  x = jax.ShapeDtypeStruct((batch, res, res, cfg.image_channels), jnp.float32, sharding=sharding)
  fn = jax.jit(lambda p, im: model.apply({"params": p}, im, method=MagvitModel.encode))
  t0 = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  return compiled, time.perf_counter() - t0


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def bench_512(args) -> dict[str, Any]:
  from mmada_jax.image_tokenizer import MagvitConfig
  cfg = MagvitConfig.default_512()
  compiled, secs = compile_encode(cfg, 1, 512, "float32")
  xla = _cost(compiled)["flops"]
  ana = analytical_encode_flops(cfg, 512)
  return {"config": "MagvitConfig.default_512() encoder", "resolution": 512, "grid": [32, 32],
          "cpu_compile_seconds": round(secs, 1), "xla_flops_per_image": xla, "analytical_flops_per_image": ana,
          "xla_over_analytical": round(xla / ana, 4)}


def bench_tpu(args, flops_per_image: float | None) -> list[dict[str, Any]]:
  from mmada_jax.aot.programs import memory_figures
  from mmada_jax.aot.topology import GIB, parse_topology
  from mmada_jax.image_tokenizer import MagvitConfig
  cfg = MagvitConfig.default_512()
  rows = []
  for spec in [s for s in args.topologies.split(",") if s]:
    topo = parse_topology(spec)
    compiled, secs = compile_encode(cfg, args.tpu_batch, 512, args.tpu_dtype, topo.devices())
    c = _cost(compiled)
    m = memory_figures(compiled.memory_analysis())
    g = topo.gen
    t_flops, t_bytes = c["flops"] / g.peak_flops, c["bytes accessed"] / g.hbm_bandwidth
    roof = max(t_flops, t_bytes)
    ips = args.tpu_batch / roof
    row = {"topology": topo.name, "device_kind": g.device_kind, "batch": args.tpu_batch, "dtype": args.tpu_dtype,
           "compile_seconds": round(secs, 1), "xla_flops_per_batch": c["flops"],
           "xla_flops_per_image": c["flops"] / args.tpu_batch, "xla_bytes_per_batch": c["bytes accessed"],
           "peak_flops": g.peak_flops, "hbm_bandwidth": g.hbm_bandwidth,
           "roofline_flops_seconds": t_flops, "roofline_bytes_seconds": t_bytes,
           "bound": "compute" if t_flops >= t_bytes else "memory",
           "estimated_batch_seconds": roof, "estimated_images_per_second_per_chip": round(ips, 1),
           "estimated_chip_hours": round(args.dataset_images / ips / 3600, 1),
           "dataset_images": int(args.dataset_images),
           "hbm_per_chip_gib": round((m["argument"] + m["output"] + m["temp"] - m["alias"]) / GIB, 2),
           "xla_cost_model_seconds": c["optimal_seconds"] if c["optimal_seconds"] > 0 else None}
    if flops_per_image:
      row["tpu_over_cpu_flops"] = round(row["xla_flops_per_image"] / flops_per_image, 4)
    rows.append(row)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=256, help="synthetic images for the CPU runs")
  p.add_argument("--shards", type=int, default=4, help="tar shards they are written to")
  p.add_argument("--source-size", type=int, default=48, help="side of the synthetic JPEGs in pixels")
  p.add_argument("--resolution", type=int, default=32, help="tokenize_images --resolution (tiny model)")
  p.add_argument("--batch-size", type=int, default=16, help="tokenize_images --batch-size")
  p.add_argument("--topologies", default="v5e:1x1,v5p:1x1x1", help="comma-separated single-chip TPU slices")
  p.add_argument("--tpu-batch", type=int, default=32, help="512-px images per encode call on a TPU chip")
  p.add_argument("--tpu-dtype", default="bfloat16", help="weights and compute dtype of the TPU encode")
  p.add_argument("--dataset-images", type=float, default=12e6, help="images to tokenize (CC12M-sized)")
  p.add_argument("--skip-cpu", action="store_true", help="no tokenize_images runs")
  p.add_argument("--skip-tpu", action="store_true", help="no AOT TPU compiles")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  out: dict[str, Any] = {}
  if not args.skip_cpu:
    out["cpu"] = bench_cpu(args)
  out["magvit_512"] = bench_512(args)
  if not args.skip_tpu:
    out["tpu"] = bench_tpu(args, out["magvit_512"]["xla_flops_per_image"])
    out["tpu_note"] = ("estimate: roofline lower bound on the time of XLA's FLOP and byte counts for one chip "
                       "(no input pipeline, no host transfer, no measured overlap)")
  print(json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

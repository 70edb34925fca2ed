"""Multi-host start-up: ``jax.distributed.initialize`` from config, environment or cluster.

Order of precedence (``config.distributed``):
1. ``mode="off"``: never initialise (single process).
2. An explicit coordinator: ``coordinator_address`` / ``num_processes`` / ``process_id`` from the
   config (``--config.distributed.coordinator_address=host:port`` …), else the environment
   variables ``MMADA_COORDINATOR_ADDRESS`` / ``MMADA_NUM_PROCESSES`` / ``MMADA_PROCESS_ID``
   (``JAX_COORDINATOR_ADDRESS`` is honoured by JAX itself).
3. ``mode="auto"`` on a detected multi-process cluster (multi-host Cloud TPU, SLURM with more
   than one task, Open MPI with more than one rank): ``jax.distributed.initialize()`` with JAX's
   own auto-detection. ``mode="on"`` calls it even when nothing is detected.
Must run before anything touches a JAX backend.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

import jax
from ml_collections import ConfigDict

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """The ``config.distributed`` section (precedence in the module docstring). ``mode``: auto,
  on, off. An explicit coordinator: ``coordinator_address`` host:port, ``num_processes`` (0 =
  from the environment), ``process_id`` (-1 = from the environment);
  ``initialization_timeout`` in seconds."""
  mode: Literal["auto", "on", "off"] = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  initialization_timeout: int = 300


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, "").strip()
  return int(v) if v else None


def detected_cluster() -> str | None:
  """Name of a multi-process launcher found in the environment, or None."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  return None


def maybe_initialize(cfg: DistributedConfig | ConfigDict) -> dict:
  """Initialises the distributed runtime per the rules above; returns a description dict."""
  mode = str(cfg.mode)
  if mode not in MODES:
    raise ValueError(f"distributed.mode={mode!r} is not one of {MODES}")
  if mode == "off":
    return {"initialized": False, "why": "distributed.mode=off"}
  address = str(cfg.coordinator_address or os.environ.get("MMADA_COORDINATOR_ADDRESS", ""))
  n = int(cfg.num_processes) if int(cfg.num_processes) > 0 else _env_int("MMADA_NUM_PROCESSES")
  pid = int(cfg.process_id) if int(cfg.process_id) >= 0 else _env_int("MMADA_PROCESS_ID")
  timeout = int(cfg.initialization_timeout)
  if address:
    if n is None or pid is None:
      raise ValueError(f"coordinator {address!r} given but num_processes={n} / process_id={pid} are "
                       "not: set distributed.num_processes and distributed.process_id (or "
                       "MMADA_NUM_PROCESSES / MMADA_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                               initialization_timeout=timeout)
    return {"initialized": True, "how": "explicit", "coordinator": address,
            "process": f"{pid}/{n}"}
  cluster = detected_cluster()
  if cluster is None and mode == "auto" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return {"initialized": False, "why": "single process (no coordinator, no cluster detected)"}
  jax.distributed.initialize(initialization_timeout=timeout)
  return {"initialized": True, "how": cluster or "jax-auto", "process": f"{jax.process_index()}/{jax.process_count()}"}

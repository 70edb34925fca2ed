#!/usr/bin/env bash
# Several training processes on this machine with an explicit coordinator (debugging multi-host
# logic, or one process per local GPU without a cluster manager).
#
#   NUM_PROCESSES=2 launch/local_multiprocess.sh --config=configs/tiny.py:pretrain --workdir=/tmp/mp
#   NUM_PROCESSES=2 DEVICE=cpu CPU_DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh ...   # CPU only
#   NUM_PROCESSES=4 DEVICE=gpu launch/local_multiprocess.sh ...   # GPU i -> process i
#
# Logs go to ${LOG_DIR:-WORKDIR/logs}/process_<i>.log. SIGTERM/SIGINT to this script is forwarded to
# every process (they save a checkpoint and exit). Exit code: the largest of the processes'.
set -euo pipefail
N="${NUM_PROCESSES:-2}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
DEVICE="${DEVICE:-cpu}"
PYTHON="${PYTHON:-python}"
workdir=""
for a in "$@"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
: "${workdir:?pass --workdir=DIR}"
LOG_DIR="${LOG_DIR:-$workdir/logs}"
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < N; i++)); do
  env_vars=()
  if [[ "$DEVICE" == cpu ]]; then
    env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS:-4}")
  else
    env_vars=(CUDA_VISIBLE_DEVICES="$i")
  fi
  env "${env_vars[@]}" "$PYTHON" -m mmada_jax.train "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$PORT" \
    --config.distributed.num_processes="$N" --config.distributed.process_id="$i" \
    > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $N processes (coordinator 127.0.0.1:$PORT); logs in $LOG_DIR"
forward() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap forward TERM INT
rc=0
for p in "${pids[@]}"; do
  while true; do
    if wait "$p"; then c=0; else c=$?; fi
    # wait returns >128 when a trapped signal interrupts it: keep waiting for that process.
    if (( c > 128 )) && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  if (( c > rc )); then rc=$c; fi
done
exit "$rc"

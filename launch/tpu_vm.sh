#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create it, install the repo on every worker, run a stage.
#
#   export TPU_NAME=mmada ZONE=us-east5-a ACCELERATOR=v5p-64 RUNTIME=v2-alpha-tpuv5 [PROJECT=...] [SPOT=1]
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                       # copies this checkout to ~/mmada_jax on all workers
#   launch/tpu_vm.sh train configs/mmada_8b.py:stage1_1,root=/mnt/runs,data_root=/mnt/data /mnt/runs/stage1_1 \
#       [--config.steps=1000 ...]
#   launch/tpu_vm.sh logs | status | stop | delete
#
# ``train`` starts the same command on every worker (``--worker=all``) in the background, one log per
# worker (~/train.log). JAX finds the other hosts itself (``--config.distributed.mode=on`` makes the
# trainer call ``jax.distributed.initialize()``, which reads the TPU metadata). The workdir must be
# shared by all workers: a bucket mounted with gcsfuse (set BUCKET to mount gs://$BUCKET at
# /mnt/gcs during ``setup``) or NFS. After a preemption (the trainer saves on SIGTERM) or a crash,
# rerunning the same ``train`` command resumes from the newest checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
REMOTE_DIR="${REMOTE_DIR:-mmada_jax}"
GCLOUD=(gcloud compute tpus tpu-vm)
EXTRA=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && EXTRA+=(--project "$PROJECT")

ssh_all() { "${GCLOUD[@]}" ssh "$TPU_NAME" "${EXTRA[@]}" --worker=all --command "$1"; }

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    spot=(); [[ -n "${SPOT:-}" ]] && spot=(--spot)
    "${GCLOUD[@]}" create "$TPU_NAME" "${EXTRA[@]}" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
    ;;
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    tarball="$(mktemp -t mmada_jax.XXXX).tar.gz"
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude='*.egg-info' -czf "$tarball" .
    "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:~/mmada_jax.tar.gz" "${EXTRA[@]}" --worker=all
    rm -f "$tarball"
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/mmada_jax.tar.gz && cd ~/$REMOTE_DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
    if [[ -n "${BUCKET:-}" ]]; then
      ssh_all "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && (mountpoint -q /mnt/gcs || \
        gcsfuse --implicit-dirs $BUCKET /mnt/gcs)"
    fi
    ;;
  train)
    config="${1:?usage: tpu_vm.sh train CONFIG WORKDIR [overrides...]}"; workdir="${2:?WORKDIR}"; shift 2
    args="--config=$config --workdir=$workdir --config.distributed.mode=on"
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    # Free the TPU from a previous run on this worker, then start in the background.
    ssh_all "cd ~/$REMOTE_DIR && (pkill -f 'mmada_jax.train' -u \$USER || true) && sleep 2 && \
      nohup .venv/bin/python -m mmada_jax.train $args > ~/train.log 2>&1 < /dev/null &"
    echo "started on all workers; follow with: $0 logs"
    ;;
  logs)   "${GCLOUD[@]}" ssh "$TPU_NAME" "${EXTRA[@]}" --worker=0 --command "tail -f ~/train.log" ;;
  status) ssh_all "hostname; tail -n 3 ~/train.log || true" ;;
  stop)   ssh_all "pkill -TERM -f 'mmada_jax.train' -u \$USER || true" ;;   # SIGTERM: save, then exit
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${EXTRA[@]}" --quiet ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# TPU pod launcher: the same uvjax command on every worker of a TPU VM slice (JAX multi-controller).
#
#   launch/tpu_pod.sh [--dry-run] [--name N] [--project P] [--zone Z] [--accelerator v5litepod-16]
#                     [--runtime v2-alpha-tpuv5-lite] [--queued] [--repo URL_OR_DIR] COMMAND [ARGS]
#
# COMMAND:
#   create            create the slice (or a queued resource with --queued)
#   setup             copy this checkout to every worker and pip install it there
#   run -- CMD...     run CMD on all workers (--worker=all), logs to ~/uvjax-<name>.log on each, streamed
#   logs              tail the log of worker 0
#   stop              stop the running command on all workers (SIGTERM: uvjax checkpoints and exits 0)
#   delete            delete the slice / queued resource
#
# Settings also come from the environment: UVJAX_TPU_NAME, GCP_PROJECT, GCP_ZONE, TPU_ACCELERATOR,
# TPU_RUNTIME. --dry-run prints every gcloud command instead of running it.
# Example (Vicuna-7B VQ-VQ with LoRA on v5e-16):
#   launch/tpu_pod.sh --accelerator v5litepod-16 create
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run -- python -m uvjax.train --config=configs/vqvq.py:tiny --workdir=gs://bucket/run
set -euo pipefail

DRY=0
NAME="${UVJAX_TPU_NAME:-uvjax}"
PROJECT="${GCP_PROJECT:-}"
ZONE="${GCP_ZONE:-us-west4-a}"
ACCEL="${TPU_ACCELERATOR:-v5litepod-16}"
RUNTIME="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
QUEUED=0
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,22p' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --name) NAME="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --repo) REPO_DIR="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage 2
CMD="$1"; shift

PROJ_FLAG=()
[[ -n "$PROJECT" ]] && PROJ_FLAG=(--project="$PROJECT")

run() {
  if [[ $DRY -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" --worker=all --command="$1"
}

case "$CMD" in
  create)
    if [[ $QUEUED -eq 1 ]]; then
      run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" \
        --accelerator-type="$ACCEL" --runtime-version="$RUNTIME"
    else
      run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" \
        --accelerator-type="$ACCEL" --version="$RUNTIME"
    fi
    ;;
  setup)
    TARBALL="/tmp/uvjax-src.tar.gz"
    run tar -C "$REPO_DIR" --exclude=runs --exclude=.git -czf "$TARBALL" .
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":/tmp/uvjax-src.tar.gz --zone="$ZONE" "${PROJ_FLAG[@]}" --worker=all
    ssh_all "mkdir -p ~/uvjax && tar -xzf /tmp/uvjax-src.tar.gz -C ~/uvjax && cd ~/uvjax && pip install -e '.[gcs]' 'jax[tpu]==0.10.2'"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || { echo "run needs a command after --" >&2; exit 2; }
    USER_CMD="$(printf '%q ' "$@")"
    ssh_all "cd ~/uvjax && nohup ${USER_CMD} > ~/uvjax-${NAME}.log 2>&1 & echo started on \$(hostname)"
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" --worker=0 \
      --command="tail -f ~/uvjax-${NAME}.log"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" --worker=0 \
      --command="tail -n 200 -f ~/uvjax-${NAME}.log"
    ;;
  stop)
    ssh_all "pkill -TERM -f 'uvjax\\.' || true"
    ;;
  delete)
    if [[ $QUEUED -eq 1 ]]; then
      run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" "${PROJ_FLAG[@]}" --quiet
    fi
    ;;
  *) echo "unknown command: $CMD" >&2; usage 2 ;;
esac

#!/usr/bin/env bash
# Usage: ./distributed_train.sh NUM_PROC DATA_DIR [train.py args...]
# Runs train.py in NUM_PROC processes on this host with torchrun (gloo on CPU, nccl on GPU).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NUM_PROC DATA_DIR [train.py args...]" >&2
  exit 2
fi
NUM_PROC=$1
shift
exec torchrun --standalone --nproc_per_node="$NUM_PROC" "$(dirname "$0")/train.py" "$@"

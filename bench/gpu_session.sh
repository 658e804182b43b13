#!/usr/bin/env bash
# The one command run on a lent GPU machine (repository root, no install): bench/gpu_check.sh (issue 12), then the
# second benchmark model's training (bench/train_benchmark_model_p4.sh, issue 13). Carried beside the tree: .whl/
# (timm 1.0.31, the version this project tests with) and .devdata/{train,val}.tar.gz (../shared/data/cifar10's tars,
# gzipped to fit the transfer). Everything comes back in at most 6 files under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
TRAIN_SECONDS=${TRAIN_SECONDS:-190}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
GC=/tmp/gc
bash bench/gpu_check.sh "$GC" "$@"
cp "$GC"/gpu_check.json "$GC"/gpu_check.md "$OUT"/ 2>/dev/null
if [[ -f .devdata/train.tar.gz ]]; then
  mkdir -p /tmp/c10 && gunzip -c .devdata/train.tar.gz > /tmp/c10/train.tar && gunzip -c .devdata/val.tar.gz > /tmp/c10/val.tar
  timeout -k 5 "$TRAIN_SECONDS" bash bench/train_benchmark_model_p4.sh /tmp/c10 /tmp/b2 cuda 2>&1 | tail -c 200000 > /tmp/b2_train.log
  run=/tmp/b2/cifar10_vit_p4
  if [[ ! -f $run/model/model.safetensors ]]; then  # stopped early: export the best (or last) epoch instead
    PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 bench/export_run.py "$run" "$run/model" >> /tmp/b2_train.log 2>&1
  fi
  mkdir -p "$OUT/model_p4" && cp "$run"/model/config.json "$run"/model/model.safetensors "$OUT/model_p4/" 2>/dev/null
  cp "$run"/summary.csv "$OUT/model_p4_summary.csv" 2>/dev/null
fi
tar -czf "$OUT/logs.tgz" -C /tmp gc b2_train.log b2/cifar10_vit_p4/args.yaml 2>/dev/null
ls -la "$OUT" "$OUT"/model_p4 2>/dev/null

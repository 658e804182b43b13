#!/usr/bin/env bash
# Trains the project's second, harder benchmark model: a 1.2M-parameter ViT (img 32, patch 4 -> 64 tokens, dim 128,
# depth 6, 4 heads, mlp_ratio 4) on the real CIFAR-10 JPEGs, with this repository's train.py. On CPU (default) it runs
# 2 single-threaded processes (distributed_train.sh 2, ~210 img/s on the shared 2-core machine, ~4 min per epoch);
# on a GPU one process with bf16 autocast. The export is copied to bench/models/cifar10_vit_p4/.
# Usage: bash bench/train_benchmark_model_p4.sh [DATA_DIR] [OUTPUT_ROOT] [DEVICE] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
OUT=${2:-bench/runs}
DEVICE=${3:-cpu}
EPOCHS=${4:-12}
ARGS=(--train-split train.tar --val-split val.tar
  --model vit_tiny_patch16_224
  --model-kwargs img_size=32 patch_size=4 embed_dim=128 depth=6 num_heads=4 mlp_ratio=4
  --num-classes 10 --device "$DEVICE"
  -b 128 --opt adamw --lr 1e-3 --weight-decay 0.05 --clip-grad 1.0
  --sched cosine --sched-on-updates --epochs "$EPOCHS" --warmup-epochs 1 --warmup-lr 1e-5 --min-lr 1e-5
  --smoothing 0.1 --scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --crop-pct 1.0
  --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616
  --seed 0 --log-interval 50 --checkpoint-hist 1 --output "$OUT" --experiment cifar10_vit_p4)
if [[ "$DEVICE" == cuda* ]]; then
  # one process, global batch 256 as on CPU (2 x 128)
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 train.py "$DATA" "${ARGS[@]}" -b 256 \
    --amp --amp-dtype bfloat16 --pin-mem --workers 12
else
  OMP_NUM_THREADS=1 ./distributed_train.sh 2 "$DATA" "${ARGS[@]}" --workers 1
  PYTHONPATH=. python bench/export_run.py "$OUT/cifar10_vit_p4" bench/models/cifar10_vit_p4
fi

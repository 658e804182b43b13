#!/usr/bin/env bash
# Trains the project's second, harder benchmark model: a 2.7M-parameter ViT (img 32, patch 4 -> 64 tokens, dim 192,
# depth 6, 3 heads, mlp_ratio 4) on the real CIFAR-10 JPEGs, with this repository's train.py (one process; on a GPU
# with bf16 autocast). The save_pretrained folder train.py writes at the end is OUTPUT_ROOT/cifar10_vit_p4/model;
# bench/models/cifar10_vit_p4/ holds the committed copy.
# Usage: bash bench/train_benchmark_model_p4.sh [DATA_DIR] [OUTPUT_ROOT] [DEVICE] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
OUT=${2:-bench/runs}
DEVICE=${3:-cuda}
EPOCHS=${4:-30}
AMP=()
WORKERS=2
if [[ "$DEVICE" == cuda* ]]; then AMP=(--amp --amp-dtype bfloat16 --pin-mem); WORKERS=12; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 train.py "$DATA" --train-split train.tar --val-split val.tar \
  --model vit_tiny_patch16_224 \
  --model-kwargs img_size=32 patch_size=4 embed_dim=192 depth=6 num_heads=3 mlp_ratio=4 \
  --num-classes 10 --device "$DEVICE" "${AMP[@]}" --workers "$WORKERS" \
  -b 256 --opt adamw --lr 1e-3 --weight-decay 0.05 --clip-grad 1.0 \
  --sched cosine --sched-on-updates --epochs "$EPOCHS" --warmup-epochs 2 --warmup-lr 1e-5 --min-lr 1e-5 \
  --smoothing 0.1 --scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --crop-pct 1.0 \
  --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 \
  --seed 0 --log-interval 50 --checkpoint-hist 1 --output "$OUT" --experiment cifar10_vit_p4

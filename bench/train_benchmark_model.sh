#!/usr/bin/env bash
# Trains the project's benchmark model: a 1.2M-parameter ViT (img 32, patch 8, dim 128, depth 6, 4 heads,
# mlp_ratio 4) on the real CIFAR-10 JPEGs of ../shared/data/cifar10, on CPU, with this repository's train.py in
# 2 single-threaded processes (distributed_train.sh 2): on the shared 2-core machine that ran ~14x faster than one
# 2-thread process (bench/results/train_scaling.json).
# The save_pretrained folder is copied to bench/models/cifar10_vit/ (load: timm.create_model('local-dir:...')).
# Usage: bash bench/train_benchmark_model.sh [DATA_DIR] [OUTPUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
OUT=${2:-bench/runs}
./distributed_train.sh 2 "$DATA" --train-split train.tar --val-split val.tar \
  --model vit_tiny_patch16_224 \
  --model-kwargs img_size=32 patch_size=8 embed_dim=128 depth=6 num_heads=4 mlp_ratio=4 \
  --num-classes 10 --device cpu --workers 1 \
  -b 128 --opt adamw --lr 1e-3 --weight-decay 0.05 --clip-grad 1.0 \
  --sched cosine --sched-on-updates --epochs 10 --warmup-epochs 0.5 --warmup-lr 1e-5 --min-lr 1e-5 \
  --smoothing 0.1 --scale 0.6 1.0 --hflip 0.5 --color-jitter 0 --crop-pct 1.0 \
  --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616 \
  --seed 0 --log-interval 50 --output "$OUT" --experiment cifar10_vit
# the run's own export (OUT/cifar10_vit/model) done again into the repository, with the run's preprocessing
PYTHONPATH=. python bench/export_run.py "$OUT/cifar10_vit" bench/models/cifar10_vit

#!/usr/bin/env bash
# Regenerates every benchmark that fits on one 2-core CPU machine, then the plots.
#
# Time on a quiet machine (2 Xeon cores, 1-minute load average < 1; measured 2026-11-24):
#   speed.py eager 8 min + deit_base 3.7 min, x3 (separate runs, for the run-to-run spread) | torch.compile 5 min x3 |
#   FiPS compiled vs materialize() 3 min | train_scaling.py 1.5 min | compress_cost.py 7.5 min | size.py 2 min |
#   nocalib.py 1-2 min | fips_init.py 2 x 0.7 min |
#   scratch.py 5.5 min (6 single-threaded one-epoch training runs, 2 at a time) | plots 10 s
#   =>  total about 75 min (the sum of the steps' measured times); `--runs 1` about 40 min (no spread tables).
# Timing steps are only meaningful on a quiet machine; their results record the load average per pass.
#
# Not included (hours): the accuracy-vs-budget table, `bash bench/run_compress_accuracy.sh`; the benchmark model
# itself, `bash bench/train_benchmark_model.sh`.
#
# Speed ratios use one thread (--threads 1): with two OpenMP threads on a shared 2-core machine a deit_tiny forward
# ran at 0.64 img/s instead of 29.8 img/s single-threaded (threads stall at every parallel region), so 2-thread
# timings would measure the neighbours, not the model.
#
# Usage: bash bench/run_all.sh [--no-scratch] [--no-init] [--only-timing] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=1
INIT=1
ONLY_TIMING=0
RUNS=3
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --runs) RUNS=$1; shift ;;
    --only-timing) ONLY_TIMING=1 ;;
    --no-scratch) SCRATCH=0 ;;
    --no-init) INIT=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
suffix() { [ "$1" -gt 1 ] && echo "_run$1"; true; }

step() {  # step NAME COMMAND...: run, and print how long it took
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$@"
  echo "=== $name took $((SECONDS - start)) s"
}

# timing first, while the machine is quiet; separate runs give the run-to-run spread
for i in $(seq 1 "$RUNS"); do
  step "speed$(suffix "$i")" python bench/speed.py --name "speed$(suffix "$i")" --modes eager --threads 1 --repeats 2
  step "speed_base$(suffix "$i")" python bench/speed.py --name "speed_base$(suffix "$i")" \
    --shapes deit_base_patch16_224 --variants shallow native_r2 --batches 8 32 --modes eager --threads 1 --repeats 2
done
for i in $(seq 1 "$RUNS"); do
  step "speed_compile$(suffix "$i")" python bench/speed.py --name "speed_compile$(suffix "$i")" --modes compile \
    --threads 1 --repeats 2
done
step speed_compile_fips python bench/speed.py --name speed_compile_fips --modes compile --variants fips_mat \
  --compile-variants fips fips_mat --threads 1 --repeats 2
if [ "$RUNS" -gt 1 ]; then
  names() { for i in $(seq 1 "$RUNS"); do echo "$1$(suffix "$i")"; done; }
  step speed_spread python bench/speed_spread.py --name speed_spread $(names speed)
  step speed_base_spread python bench/speed_spread.py --name speed_base_spread $(names speed_base)
  step speed_compile_spread python bench/speed_spread.py --name speed_compile_spread $(names speed_compile)
fi
step train_scaling python bench/train_scaling.py "${CIFAR10_DIR:-../shared/data/cifar10}" --train-split train.tar \
  --steps 20 --repeats 3
step compress_cost python bench/compress_cost.py
[ "$ONLY_TIMING" = 1 ] && exit 0
step size python bench/size.py
step nocalib python bench/nocalib.py
if [ "$INIT" = 1 ]; then
  step fips_init python bench/fips_init.py
  step fips_init_1thread python bench/fips_init.py --threads 1 --output bench/results/fips_init_1thread.json
fi
if [ "$SCRATCH" = 1 ]; then
  step scratch python bench/scratch.py --name scratch_epoch --patch 8 --dim 128 --heads 4 --epochs 1 \
    --steps-per-epoch 0 --batch-size 64 --seeds 0 1 --threads 1 --jobs 2 --fresh
fi
step plots python bench/plots.py

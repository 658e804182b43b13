#!/usr/bin/env bash
# Regenerates every benchmark of this branch that fits on one 2-core CPU machine, then the plots.
#
# Time (measured on 2 Xeon cores, each step timed when it produced the committed results; see docs/evidence.md):
#   size.py ~2 min | nocalib.py ~5 min (both at load ~8) | speed.py eager ~SPEED | deit_base ~BASE | compile ~COMPILE | fips_init.py ~INIT
#   scratch.py ~40 min under a load average of 7-9 (6 training runs) | plots.py < 1 min
#   total ~TOTAL. Timing steps are meaningless on a shared machine: run this on a quiet one (load average < 2.5).
#
# Not included: the accuracy-vs-budget table (bench/compress_accuracy.py on branch calib, ~hours) and the training
# scaling table (bench/train_scaling.py on branch train); their results are read by plots.py when present.
#
# Timing runs use one thread (--threads 1): with two OpenMP threads on a shared 2-core machine a deit_tiny forward
# ran at 0.64 img/s instead of 29.8 img/s single-threaded (threads stall at every parallel region), so 2-thread
# timings measure the neighbours, not the model.
#
# Usage: bash bench/run_all.sh [--no-scratch] [--no-init] [--only-timing]
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=1
INIT=1
ONLY_TIMING=0
for arg in "$@"; do
  case $arg in
    --only-timing) ONLY_TIMING=1 ;;
    --no-scratch) SCRATCH=0 ;;
    --no-init) INIT=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

step() {  # step NAME COMMAND...: run, and print how long it took
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$@"
  echo "=== $name took $((SECONDS - start)) s"
}

# timing first, while the machine is quiet
step speed python bench/speed.py --modes eager --threads 1 --repeats 2
step speed_base python bench/speed.py --name speed_base --shapes deit_base_patch16_224 --variants shallow native_r2 \
  --batches 8 32 --modes eager --threads 1 --repeats 2
step speed_compile python bench/speed.py --name speed_compile --modes compile --threads 1 --repeats 2
[ "$ONLY_TIMING" = 1 ] && exit 0
step size python bench/size.py
step nocalib python bench/nocalib.py
if [ "$INIT" = 1 ] && [ -f bench/fips_init.py ]; then  # the FiPS colleague's script (branch fips)
  step fips_init python bench/fips_init.py
fi
if [ "$SCRATCH" = 1 ]; then
  step scratch python bench/scratch.py --dim 96 --depth 6 --heads 3 --epochs 1 --steps-per-epoch 60 --batch-size 64 \
    --seeds 0 1 --fresh
fi
step plots python bench/plots.py

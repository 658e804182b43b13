#!/usr/bin/env bash
# Regenerates every benchmark of this branch that fits on one 2-core CPU machine, then the plots.
#
# Time (measured on 2 Xeon cores while 3-5 other sessions shared them, 1-minute load average 3-9):
#   speed.py eager 506 s | deit_base batch 8+32 3.8 min | torch.compile 390 s | size.py 2 min | nocalib.py 1-5 min
#   (half of it importing torch under load) | fips_init.py: not timed here (FiPS colleague's script)
#   scratch.py 5.5 min (6 single-threaded one-epoch training runs, 2 at a time) | plots.py 10 s
#   =>  total about 32 min plus fips_init.py.
# Timing steps are only meaningful on a quiet machine; their results record the load average per pass.
#
# Not included: the accuracy-vs-budget table (bench/compress_accuracy.py on branch calib, ~hours) and the training
# scaling table (bench/train_scaling.py from branch train); plots.py plots compress_accuracy.json when present.
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
  step scratch python bench/scratch.py --name scratch_epoch --patch 8 --dim 128 --heads 4 --epochs 1 \
    --steps-per-epoch 0 --batch-size 64 --seeds 0 1 --threads 1 --jobs 2 --fresh
fi
step plots python bench/plots.py

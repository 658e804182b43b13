#!/usr/bin/env bash
# One GPU check of timm_reduce, at most 5 minutes on one GPU: the `cuda` tests, then inference (eager and
# torch.compile), train.py and calibration measurements. Writes gpu_check.json, gpu_check.md, gpu_check.log,
# pytest.log and train/*.log into OUT_DIR.
#
#   bash bench/gpu_check.sh [OUT_DIR] [gpu_check.py flags]     # OUT_DIR default: $OUT, else bench/results/gpu_check
#   bash bench/gpu_check.sh /tmp/smoke --smoke                 # tiny code-path check, CPU allowed
#
# timm_reduce need not be installed: the repository root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
if [[ $# -gt 0 && "$1" != -* ]]; then OUT_DIR="$1"; shift; fi
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 270 s of sections (each checks the deadline before it starts); the hard stop leaves room for start-up and the
# final write, and results are rewritten after every section, so even a kill leaves what was measured
timeout -k 5 295 python3 bench/gpu_check.py "$OUT_DIR" --budget 270 "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Runs bench/compress_accuracy.py as two single-threaded processes (one per core; on a loaded 2-core machine two
# 1-thread processes finish far sooner than one 2-thread process), then merges their results into
# bench/results/compress_accuracy.{json,md}.
# Usage: [WEIGHTS=timm_ckpt] bash bench/run_compress_accuracy.sh MODEL_DIR [extra compress_accuracy.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
R=bench/results
mkdir -p "$R"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
python bench/compress_accuracy.py --model-dir "$MODEL" ${WEIGHTS:+--weights "$WEIGHTS"} "$@" \
  --out "$R/compress_accuracy_a.json" --resume --methods fips_gmp fips_rigl svd shallow_first grouped > "$R/compress_accuracy_a.log" 2>&1 &
A=$!
python bench/compress_accuracy.py --model-dir "$MODEL" ${WEIGHTS:+--weights "$WEIGHTS"} "$@" \
  --out "$R/compress_accuracy_b.json" --resume --no-original --methods fips_static fips_dense magnitude shallow_magnitude > "$R/compress_accuracy_b.log" 2>&1 &
B=$!
wait $A $B
python bench/compress_accuracy.py --model-dir "$MODEL" --out "$R/compress_accuracy.json" \
  --table-only "$R/compress_accuracy_a.json" "$R/compress_accuracy_b.json"
# peak memory of one calibration epoch in a fresh process, against the engine's formula
: > "$R/compress_memory.jsonl"
for probe in "fips_gmp 0.25 none" "fips_gmp 0.25 bf16" "fips_gmp 0.25 fp32" "shallow_magnitude 0.5 none"; do
  set -- $probe
  python bench/compress_accuracy.py --model-dir "$MODEL" ${WEIGHTS:+--weights "$WEIGHTS"} --calib-batches 16 \
    --batch-size 64 --probe-memory "$1" "$2" --cache "$3" | tail -n 1 >> "$R/compress_memory.jsonl"
done
cat "$R/compress_accuracy.md" "$R/compress_memory.jsonl"

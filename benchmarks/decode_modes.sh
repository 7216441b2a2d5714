#!/usr/bin/env bash
# `predict` end to end against the network alone for each --decode mode, alternated ROUNDS times
# (docs/benchmarks.md, "--decode auto"): the shipped bm8 with its int8 export (make it first with
# `marrowscope export bm8 --format int8`, ~9 min), batch 64, on the 4,356 cells of
# ../shared/data/bm-cells-dev. Run on a quiet machine; ~35 s per measurement on 2 cores.
#   bash benchmarks/decode_modes.sh [ROUNDS] [MIN_TIME_S]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-docs/results/predict_e2e_decode/auto}
IMAGES=${IMAGES:-../shared/data/bm-cells-dev}
ROUNDS=${1:-3}
MIN_TIME=${2:-8}
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for d in auto processes threads; do
    "$BIN/marrowscope" benchmark bm8 --backends int8 --batch-sizes 64 --images "$IMAGES" \
      --min-time "$MIN_TIME" --decode "$d" --out "$OUT/${d}_$r.md" > /dev/null
    echo "round $r, $d: $(grep -o 'end to end = [0-9]*%' "$OUT/${d}_$r.md")"
  done
done

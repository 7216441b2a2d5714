#!/usr/bin/env bash
# Cross-validated variants of configs/pbc-dev.yaml (docs/accuracy.md, "The same recipe on
# peripheral blood"): 3 folds of the 2,100-cell ../shared/data/pbc-cells-dev, fold seed 42, the
# same folds as the shipped pbc6's cross-validation (runs/cv2-pbc/default), so
# benchmarks/cv_compare.py --runs runs/cv2-pbc --base default pairs them cell by cell.
# Resumable (finished epochs and folds are reused); run alone on 2 cores.
#   bash benchmarks/cv_pbc.sh [variant ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/cv2-pbc}
declare -A VARIANTS=(
  # the recipe as configs/pbc-dev.yaml has it, then refitted on all 2,100 cells: the shipped pbc6
  # (scripts/pack_pretrained.py pbc6 runs/cv2-pbc/default --cv); ~22 min a fold, 25.5 min refit
  [default]="--refit"
  # 320 px instead of 250 (the 360 x 363 px crops shrink 0.89x instead of 0.69x): +0.013 on one
  # 318-cell split (docs/accuracy.md), 1.65x the training cost; ~36 min a fold
  [size320]="--set preprocess.size=320"
)
ORDER=(default size320)
[ $# -gt 0 ] && ORDER=("$@")
for v in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  "$BIN/marrowscope" cv --config configs/pbc-dev.yaml --folds 3 --fold-seed 42 \
    --out "$OUT/$v" --no-progress ${VARIANTS[$v]}
  mkdir -p docs/results/cv2-pbc
  cp "$OUT/$v/cv_summary.json" "docs/results/cv2-pbc/$v.json"
done

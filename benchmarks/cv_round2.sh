#!/usr/bin/env bash
# Round two of the recipe experiments (docs/accuracy.md, "Round two"): 3-fold cross-validation
# of configs/bm-dev.yaml as it is (10 epochs, MobileNetV2, 250 px) on the 4,350-cell
# ../shared/data/bm-cells-dev, and variants that cost about the same training time, all on the
# same folds (fold seed 42), so benchmarks/cv_compare.py can pair them cell by cell.
# Each variant takes about an hour on 2 CPU cores; run alone. Resumable (finished folds are reused).
#   bash benchmarks/cv_round2.sh [variant ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/cv2}
FOLDS=${FOLDS:-3}
declare -A VARIANTS=(
  [default]=""
  # progressive resizing: 13 epochs, the first 8 ramping from 160 px to 250 px (a 160 px step costs
  # ~0.4x a 250 px one here), about the training time of the default's 10 epochs at 250 px
  [prog160_13ep]="--set train.epochs=13 --set train.progressive_size=160 --set train.progressive_epochs=0.6"
  # the learning curve: the default on a quarter of each fold's training cells
  [frac25]="--train-fraction 0.25"
  # the shipped bm8's recipe (the config at 20 epochs, ~3 h of folds on 2 cores), then refitted on
  # all 4,350 cells (~1 h): the model scripts/pack_pretrained.py bm8 runs/cv2/bm8_20ep --cv packs
  [bm8_20ep]="--set train.epochs=20 --refit"
  # the learning curve at bm8's 20 epochs: half of each fold's training cells (1,450), scored on
  # the same 1,450 cells per fold as bm8_20ep (2026-12-01)
  [frac50_20ep]="--set train.epochs=20 --train-fraction 0.5"
)
# run on 2026-11-29: default, then prog160_13ep and frac25 (the next session), see docs/accuracy.md
# and bm8_20ep (started 2026-11-30; its refit is to be packed as the shipped bm8 once finished)
ORDER=(default prog160_13ep frac25)
[ $# -gt 0 ] && ORDER=("$@")
for v in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  "$BIN/marrowscope" cv --config configs/bm-dev.yaml --folds "$FOLDS" --fold-seed 42 \
    --out "$OUT/$v" --no-progress ${VARIANTS[$v]}
  mkdir -p docs/results/cv2
  cp "$OUT/$v/cv_summary.json" "docs/results/cv2/$v.json"
done

#!/usr/bin/env bash
# The recipe experiments behind docs/accuracy.md: 3-fold cross-validation of short (6-epoch; 11 for MobileNetV2)
# variants of configs/bm-dev.yaml on ../shared/data/bm-cells-dev. Each variant takes about
# 20-30 minutes on 2 CPU cores; run alone. Resumable (finished folds are reused).
# "base" pins the recipe as it was before these experiments (EfficientNet-Lite0, no stain jitter,
# EMA 0.998 of the weights, no TTA in the bundle; every variant's out-of-fold logits hold all 8 TTA
# views anyway; every variant keeps the EMA unless it says otherwise), so the
# variants stay comparable after the winners became the defaults of configs/bm-dev.yaml.
# Then: python benchmarks/cv_compare.py  (paired tests, docs/results/cv/comparison.json)
#   bash benchmarks/cv_experiments.sh [variant ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/cv}
FOLDS=${FOLDS:-3}
COMMON=(--set model.name=tf_efficientnet_lite0 --set train.epochs=6 --set train.ema_decay=0.998
        --set augment.stain=0.0 --set inference.tta=none)
# MobileNetV2 epochs take ~2/3 of a Lite0 epoch here: 11 of them cost ~1.2x the 6 of "stain"
MNV2="--set augment.stain=0.05 --set model.name=mobilenetv2_100 --set train.epochs=11"
declare -A VARIANTS=(
  [base]=""
  [mix]="--set augment.mixup_alpha=0.2 --set augment.cutmix_alpha=1.0 --set augment.mix_prob=0.5"
  [stain]="--set augment.stain=0.05"
  [sampler]="--set train.imbalance=sampler"
  [mnv2]="$MNV2"
  [mnv2_sampler]="$MNV2 --set train.imbalance=sampler"
  # the cells' native resolution (250 px) instead of 224 (no slower here: augmentation sets the pace)
  [mnv2_res250]="$MNV2 --set preprocess.size=250"
  # layer-wise lr decay 0.9 over MobileNetV2's 18 layers: the stem trains at 0.15x the head's lr
  [mnv2_llrd]="$MNV2 --set train.layer_decay=0.9"
  [mnv2_res250_llrd]="$MNV2 --set preprocess.size=250 --set train.layer_decay=0.9"
  # stochastic weight averaging of the last 4 of the 11 epochs (the cosine schedule unchanged)
  # instead of the EMA that COMMON keeps
  [mnv2_res250_llrd_swa]="$MNV2 --set preprocess.size=250 --set train.layer_decay=0.9 --set train.ema_decay=null --set train.swa_epochs=4"
  # no label smoothing (0.1 everywhere else)
  [mnv2_res250_llrd_ls0]="$MNV2 --set preprocess.size=250 --set train.layer_decay=0.9 --set train.label_smoothing=0"
)
ORDER=(base mix stain sampler mnv2 mnv2_sampler mnv2_res250 mnv2_llrd mnv2_res250_llrd
       mnv2_res250_llrd_swa mnv2_res250_llrd_ls0)
[ $# -gt 0 ] && ORDER=("$@")
for v in "${ORDER[@]}"; do
  # shellcheck disable=SC2086
  "$BIN/marrowscope" cv --config configs/bm-dev.yaml --folds "$FOLDS" --out "$OUT/$v" \
    --no-progress "${COMMON[@]}" ${VARIANTS[$v]}
  mkdir -p docs/results/cv
  cp "$OUT/$v/cv_summary.json" "docs/results/cv/$v.json"
done

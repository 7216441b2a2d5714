#!/usr/bin/env bash
# Every speed measurement behind docs/benchmarks.md, one after another (run on an idle machine).
#   bash benchmarks/run_all.sh [CHECKPOINT] [OUT_DIR]
# CHECKPOINT defaults to the shipped bone-marrow model bm8.
set -euo pipefail
cd "$(dirname "$0")/.."
CK=${1:-bm8}
OUT=${2:-runs/bench}
BIN=.venv/bin
mkdir -p "$OUT"
$BIN/python benchmarks/bench_preprocess.py --out "$OUT/preprocess.md"
$BIN/marrowscope benchmark "$CK" --out "$OUT/infer_demo.md"
$BIN/marrowscope benchmark convnext_tiny --out "$OUT/infer_convnext_tiny.md"
$BIN/python benchmarks/bench_models.py --out "$OUT/models.md"
$BIN/python benchmarks/train_throughput.py --config configs/bm-dev.yaml --out "$OUT/train_throughput.json"
# int8 (needs marrowscope[int8]); the Keras/TF comparison needs a separate Python with TensorFlow:
#   $BIN/marrowscope export "$CK" --format int8
#   $BIN/python benchmarks/keras_vs_marrowscope.py --tf-python /path/to/tfvenv/bin/python \
#       --out "$OUT/keras_vs_marrowscope.json"

"""Does the paper's preprocessing (NL-means denoise + 3x3 sharpening) help? A paired ablation.

Trains the same recipe twice on the same split — once on plain resized images, once with the
paper's ``fastNlMeansDenoisingColored`` + sharpening — then scores both best checkpoints on the
same validation images: macro-F1 and accuracy with 95% bootstrap CIs, the paired bootstrap CI of
the macro-F1 difference, and McNemar's exact test on the per-image correctness.

    python benchmarks/ablation_preprocess.py --config configs/bm-dev.yaml --out runs/ablation
    python benchmarks/ablation_preprocess.py --runs runs/bm-dev runs/bm-dev-paper-pre  # reuse runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from marrowscope.config import load_config
from marrowscope.engine.evaluate import evaluate_bundle
from marrowscope.engine.train import fit
from marrowscope.metrics.classification import paired_comparison

PAPER_PRE = ["preprocess.denoise=true", "preprocess.sharpen=true"]
PLAIN_PRE = ["preprocess.denoise=false", "preprocess.sharpen=false"]


def val_predictions(run: Path, out: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    m = evaluate_bundle(run / "best", run / "split.csv", split="val", out_dir=out, progress=False)
    import csv

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    classes = m["classes"]
    idx = {c: i for i, c in enumerate(classes)}
    order = np.argsort([r["path"] for r in rows])
    y = np.array([idx[rows[i]["label"]] for i in order])
    p = np.array([idx[rows[i]["predicted"]] for i in order])
    return y, p, classes, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--runs", nargs=2, type=Path, help="existing runs: plain, paper-preprocessed")
    args = ap.parse_args()
    if args.runs:
        plain, paper = args.runs
    else:
        plain, paper = args.out / "plain", args.out / "paper-pre"
        for run, over in ((plain, PLAIN_PRE), (paper, PAPER_PRE)):
            if not (run / "summary.json").exists():
                fit(load_config(args.config, over), run, progress=False)
    for run, want in ((plain, False), (paper, True)):
        cfg = load_config(run / "config.yaml")
        if cfg.preprocess.denoise != want or cfg.preprocess.sharpen != want:
            raise SystemExit(f"{run}: expected denoise/sharpen={want}")
    ya, pa, classes, ma = val_predictions(plain, args.out / "eval-plain")
    yb, pb, _, mb = val_predictions(paper, args.out / "eval-paper-pre")
    assert np.array_equal(ya, yb), "the two runs were not validated on the same images"
    paired = paired_comparison(ya, pa, pb, classes)
    result = {
        "n_val": len(ya),
        "plain": {
            "macro_f1": ma["macro_f1"],
            "accuracy": ma["accuracy"],
            "ci95": ma["ci95"],
            "per_class_f1": {k: v["f1"] for k, v in ma["per_class"].items()},
            "train_seconds": json.loads((plain / "summary.json").read_text())["train_seconds"],
        },
        "paper_preprocessing": {
            "macro_f1": mb["macro_f1"],
            "accuracy": mb["accuracy"],
            "ci95": mb["ci95"],
            "per_class_f1": {k: v["f1"] for k, v in mb["per_class"].items()},
            "train_seconds": json.loads((paper / "summary.json").read_text())["train_seconds"],
        },
        "macro_f1_difference_paper_minus_plain": mb["macro_f1"] - ma["macro_f1"],
        "difference_ci95_paired_bootstrap": paired["difference_ci95"],
        "mcnemar": {
            "plain_right_paper_wrong": paired["a_right_b_wrong"],
            "paper_right_plain_wrong": paired["b_right_a_wrong"],
            "p_value": paired["mcnemar_p"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

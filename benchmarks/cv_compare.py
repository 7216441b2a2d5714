"""Paired comparison of cross-validated recipe variants (the tables of docs/accuracy.md).

Reads the out-of-fold logits that ``benchmarks/cv_experiments.sh`` left in ``runs/cv/<variant>/``
(every variant uses the same folds, so each image is scored by one model per variant) and compares
each variant with ``base`` on the pooled out-of-fold predictions: macro-F1 with and without 8-view
TTA, the paired-bootstrap 95% interval of the difference, and McNemar's exact test. Also compares
TTA (d8, flips) with no TTA within ``base``. Writes ``docs/results/cv/comparison.json`` and prints
Markdown tables.

    python benchmarks/cv_compare.py [--runs runs/cv] [--base base] [--checkpoint best|last]
        [--ensemble]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from marrowscope.engine.cv import TTA_VIEWS
from marrowscope.inference.predictor import softmax
from marrowscope.metrics.classification import paired_comparison


def pooled_probabilities(
    run: Path, tta: str, checkpoint: str = "best"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, probabilities (the TTA views' mean softmax) and paths of every out-of-fold image
    (sorted by path), from each fold's best checkpoint (chosen on the scored fold) or its last one
    (no choice made on those cells)."""
    key = {"best": "logits", "last": "logits_last"}[checkpoint]
    labels, probs, paths = [], [], []
    for fold in sorted(run.glob("fold-*")):
        with np.load(fold / "oof.npz") as z:
            probs.append(softmax(z[key][TTA_VIEWS[tta]]).mean(axis=0))
            labels.append(z["labels"])
            paths += z["paths"].tolist()
    order = np.argsort(paths)
    return (
        np.concatenate(labels)[order],
        np.concatenate(probs)[order],
        [paths[i] for i in order],
    )


def pooled_predictions(
    run: Path, tta: str, checkpoint: str = "best"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, predictions and paths of every out-of-fold image, as :func:`pooled_probabilities`."""
    labels, probs, paths = pooled_probabilities(run, tta, checkpoint)
    return labels, probs.argmax(1), paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=Path, default=Path("runs/cv"))
    ap.add_argument("--base", default="base")
    ap.add_argument("--out", type=Path, default=Path("docs/results/cv/comparison.json"))
    ap.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="each fold's best checkpoint (chosen on the scored fold) or its last one",
    )
    ap.add_argument(
        "--ensemble",
        action="store_true",
        help="also score the mean of each variant's and the base's probabilities against the base",
    )
    args = ap.parse_args()
    ck = args.checkpoint
    summary = json.loads((args.runs / args.base / "cv_summary.json").read_text())
    classes = summary["classes"]
    complete = sorted(
        p.parent.name for p in args.runs.glob("*/cv_summary.json") if p.parent.name != args.base
    )
    result: dict[str, dict] = {"tta_within_base": {}, "variants_vs_base": {}}
    y0, p0, paths0 = pooled_predictions(args.runs / args.base, "none", ck)
    for tta in ("flips", "d8"):
        y, p, paths = pooled_predictions(args.runs / args.base, tta, ck)
        result["tta_within_base"][tta] = paired_comparison(y0, p0, p, classes)
    print(f"| TTA in {args.base} | macro-F1 none | with TTA | difference [95% CI] | McNemar p |")
    print("|---|---:|---:|---:|---:|")
    for tta, r in result["tta_within_base"].items():
        lo, hi = r["difference_ci95"]
        print(
            f"| {tta} | {r['macro_f1_a']:.3f} | {r['macro_f1_b']:.3f} | "
            f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['mcnemar_p']:.3g} |"
        )
    print()
    print(
        f"| variant vs {args.base} (d8 TTA) | {args.base} | variant | difference [95% CI] | McNemar p |"
    )
    print("|---|---:|---:|---:|---:|")
    yb, qb, pathsb = pooled_probabilities(args.runs / args.base, "d8", ck)
    pb = qb.argmax(1)
    for name in complete:
        yv, qv, pathsv = pooled_probabilities(args.runs / name, "d8", ck)
        if pathsv != pathsb:
            raise SystemExit(f"{name} was not cross-validated on the same images as {args.base}")
        theirs = json.loads((args.runs / name / "cv_summary.json").read_text())["classes"]
        if theirs != classes or not np.array_equal(yv, yb):
            raise SystemExit(
                f"{name} has other classes or labels than {args.base} ({theirs} vs {classes}): "
                "its predictions cannot be paired with the base's"
            )
        rows = {name: qv.argmax(1)}
        if args.ensemble:
            rows[f"{name}+{args.base}"] = ((qv + qb) / 2).argmax(1)
        for label, pv in rows.items():
            r = paired_comparison(yb, pb, pv, classes)
            result["variants_vs_base"][label] = r
            lo, hi = r["difference_ci95"]
            print(
                f"| {label} | {r['macro_f1_a']:.3f} | {r['macro_f1_b']:.3f} | "
                f"{r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['mcnemar_p']:.3g} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": ck, **result}, indent=2))


if __name__ == "__main__":
    main()

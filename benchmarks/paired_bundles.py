"""Paired comparison of two trained bundles on the same labelled cells (docs/accuracy.md).

Each bundle predicts every validation cell of a run's ``split.csv`` as it predicts by default (its
test-time augmentation and temperature); the script writes both macro-F1s with per-class F1 and
the paired difference B - A: paired-bootstrap 95% interval and McNemar's exact test. With
``--ensemble`` it also scores the mean of the two bundles' calibrated probabilities (each with its
own augmentation and temperature), paired against A and against B.

    python benchmarks/paired_bundles.py A_BUNDLE B_BUNDLE --split runs/x/split.csv --out FILE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from marrowscope.engine.evaluate import labelled_rows
from marrowscope.inference.predictor import Predictor
from marrowscope.metrics.classification import classification_metrics, paired_comparison


def probabilities(bundle: str, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    p = Predictor.from_checkpoint(bundle, device="cpu")
    return p.predict_proba(paths), list(p.classes_)


def summary(bundle: str, y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(y, pred, classes)
    return {
        "bundle": bundle,
        "macro_f1": m["macro_f1"],
        "accuracy": m["accuracy"],
        "per_class_f1": {c: round(v["f1"], 3) for c, v in m["per_class"].items()},
    }


def line(left: str, right: str, d: dict) -> str:
    """One paired comparison, ``left - right`` (``d`` from paired_comparison(y, right, left))."""
    lo, hi = d["difference_ci95"]
    return (
        f"{left}-{right} {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]  McNemar p "
        f"{d['mcnemar_p']:.3g} ({d['b_right_a_wrong']} cells right only with {left}, "
        f"{d['a_right_b_wrong']} only with {right}) on {d['n']} cells"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a", help="bundle A (the reference)")
    ap.add_argument("b", help="bundle B")
    ap.add_argument("--split", type=Path, required=True, help="a run's split.csv")
    ap.add_argument("--subset", default="val", help="which split's rows to score")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--ensemble", action="store_true", help="also score the mean of A's and B's probabilities"
    )
    args = ap.parse_args()
    rows = labelled_rows(args.split, args.subset)
    paths = [str(r.path) for r in rows]
    proba_a, classes = probabilities(args.a, paths)
    proba_b, classes_b = probabilities(args.b, paths)
    if classes != classes_b:
        raise SystemExit(f"the bundles name different classes: {classes} vs {classes_b}")
    y = np.array([classes.index(r.label) for r in rows])
    pred_a, pred_b = proba_a.argmax(1), proba_b.argmax(1)
    out = {"a": summary(args.a, y, pred_a, classes), "b": summary(args.b, y, pred_b, classes)}
    out["b_minus_a"] = paired_comparison(y, pred_a, pred_b, classes)
    report = [
        f"A {out['a']['macro_f1']:.3f}  B {out['b']['macro_f1']:.3f}",
        line("B", "A", out["b_minus_a"]),
    ]
    if args.ensemble:
        pred_e = ((proba_a + proba_b) / 2).argmax(1)
        out["ensemble"] = summary("mean of A and B", y, pred_e, classes)
        out["ensemble_minus_a"] = paired_comparison(y, pred_a, pred_e, classes)
        out["ensemble_minus_b"] = paired_comparison(y, pred_b, pred_e, classes)
        report += [
            f"ensemble {out['ensemble']['macro_f1']:.3f}",
            line("ensemble", "A", out["ensemble_minus_a"]),
            line("ensemble", "B", out["ensemble_minus_b"]),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()

"""Paired comparison of two trained bundles on the same labelled cells (docs/accuracy.md).

Each bundle predicts every validation cell of a run's ``split.csv`` as it predicts by default (its
test-time augmentation and temperature); the script writes both macro-F1s with per-class F1 and
the paired difference B - A: paired-bootstrap 95% interval and McNemar's exact test.

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


def predictions(bundle: str, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    p = Predictor.from_checkpoint(bundle, device="cpu")
    return p.predict_proba(paths).argmax(1), list(p.classes_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a", help="bundle A (the reference)")
    ap.add_argument("b", help="bundle B")
    ap.add_argument("--split", type=Path, required=True, help="a run's split.csv")
    ap.add_argument("--subset", default="val", help="which split's rows to score")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = labelled_rows(args.split, args.subset)
    paths = [str(r.path) for r in rows]
    pred_a, classes = predictions(args.a, paths)
    pred_b, classes_b = predictions(args.b, paths)
    if classes != classes_b:
        raise SystemExit(f"the bundles name different classes: {classes} vs {classes_b}")
    y = np.array([classes.index(r.label) for r in rows])
    out = {}
    for name, pred in (("a", pred_a), ("b", pred_b)):
        m = classification_metrics(y, pred, classes)
        out[name] = {
            "bundle": getattr(args, name),
            "macro_f1": m["macro_f1"],
            "accuracy": m["accuracy"],
            "per_class_f1": {c: round(v["f1"], 3) for c, v in m["per_class"].items()},
        }
    out["b_minus_a"] = paired_comparison(y, pred_a, pred_b, classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    d = out["b_minus_a"]
    print(
        f"A {out['a']['macro_f1']:.3f}  B {out['b']['macro_f1']:.3f}  B-A {d['difference']:+.3f} "
        f"[{d['difference_ci95'][0]:+.3f}, {d['difference_ci95'][1]:+.3f}]  McNemar p "
        f"{d['mcnemar_p']:.3g} ({d['b_right_a_wrong']} cells right only with B, "
        f"{d['a_right_b_wrong']} only with A) on {d['n']} cells"
    )


if __name__ == "__main__":
    main()

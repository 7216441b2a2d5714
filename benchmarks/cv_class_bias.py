"""Would per-class decision offsets tuned for macro-F1 help? A cross-fitted check on CV logits.

For each cross-validation variant in ``runs/cv/`` (``benchmarks/cv_experiments.sh``): take the
out-of-fold d8-averaged log-probabilities; for each fold, fit one additive offset per class on the
*other* folds (coordinate ascent on macro-F1, offsets in [-1.5, 1.5]) and apply it to this fold.
The pooled result is compared with plain argmax (paired bootstrap and McNemar), so the fitted
offsets never see the images they are scored on. Writes ``docs/results/cv/class_bias.json``.

    python benchmarks/cv_class_bias.py [--runs runs/cv] [--checkpoint best|last] [variant ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from marrowscope.engine.cv import TTA_VIEWS
from marrowscope.inference.predictor import softmax
from marrowscope.metrics.classification import paired_comparison

# tried nearest-to-zero first, so that among equally good offsets the smallest one wins
GRID = sorted(np.linspace(-1.5, 1.5, 31), key=abs)


def fit_offsets(logp: np.ndarray, y: np.ndarray, sweeps: int = 3) -> np.ndarray:
    """Per-class additive offsets maximising macro-F1 of ``argmax(logp + b)`` (mean zero)."""
    b = np.zeros(logp.shape[1])
    for _ in range(sweeps):
        for k in range(len(b)):
            scores = []
            for g in GRID:
                b[k] = g
                scores.append(f1_score(y, (logp + b).argmax(1), average="macro"))
            b[k] = GRID[int(np.argmax(scores))]
    return b - b.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/cv"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/cv/class_bias.json"))
    ap.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="each fold's best epoch (chosen on the scored fold) or its last one",
    )
    ap.add_argument("variants", nargs="*")
    args = ap.parse_args()
    key = {"best": "logits", "last": "logits_last"}[args.checkpoint]
    names = args.variants or sorted(p.parent.name for p in args.runs.glob("*/cv_summary.json"))
    result = {}
    for name in names:
        folds = []
        for fold in sorted((args.runs / name).glob("fold-*")):
            with np.load(fold / "oof.npz") as z:
                probs = softmax(z[key][TTA_VIEWS["d8"]]).mean(axis=0)
                folds.append((np.log(probs + 1e-9), z["labels"]))
        y, plain, shifted, offsets = [], [], [], []
        for i, (logp, labels) in enumerate(folds):
            rest = [f for j, f in enumerate(folds) if j != i]
            b = fit_offsets(
                np.concatenate([r[0] for r in rest]), np.concatenate([r[1] for r in rest])
            )
            offsets.append(np.round(b, 2).tolist())
            y.append(labels)
            plain.append(logp.argmax(1))
            shifted.append((logp + b).argmax(1))
        yy, a, bb = np.concatenate(y), np.concatenate(plain), np.concatenate(shifted)
        classes = [str(k) for k in range(folds[0][0].shape[1])]
        cmp = paired_comparison(yy, a, bb, classes)
        result[name] = {
            "checkpoint": args.checkpoint,
            "macro_f1_argmax": cmp["macro_f1_a"],
            "macro_f1_offsets": cmp["macro_f1_b"],
            "difference": cmp["difference"],
            "difference_ci95": cmp["difference_ci95"],
            "mcnemar_p": cmp["mcnemar_p"],
            "right_only_with_argmax": cmp["a_right_b_wrong"],
            "right_only_with_offsets": cmp["b_right_a_wrong"],
            "offsets_per_fold": offsets,
        }
        lo, hi = cmp["difference_ci95"]
        print(
            f"{name}: argmax {cmp['macro_f1_a']:.3f} -> offsets {cmp['macro_f1_b']:.3f} "
            f"({cmp['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], McNemar p = {cmp['mcnemar_p']:.2g})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

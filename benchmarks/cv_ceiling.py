"""What bounds the default recipe: full-length CV, ensembles and a learning curve.

Reads the out-of-fold logits that ``benchmarks/cv_full_sweep.sh`` left in ``RUNS/<variant>/``
(all on the same 3 folds as ``benchmarks/cv_experiments.sh``) and reports, on d8-TTA
probabilities:

- each variant's pooled macro-F1 and per-class F1, for the best-epoch and the last-epoch weights
  (the last epoch is chosen by nothing, so it is the unflattered estimate);
- ensembles (probabilities averaged) of the training seeds and of the two backbones, paired
  against the single default model (bootstrap interval of the difference, McNemar's test);
- the learning curve: macro-F1 against the number of training images, on the folds that every
  training fraction finished, with a least-squares fit of macro-F1 = a + b * log2(n) and what it
  predicts for more images;
- optionally the full-length recipe against an 11-epoch proxy run on the CPU (``--proxy``),
  paired image by image (paths are matched by class folder and file name, since the two machines
  held the data in different folders).

Writes ``--out`` (JSON) and prints Markdown tables.

    python benchmarks/cv_ceiling.py --runs runs/cv-full [--proxy runs/cv/mnv2_res250_llrd]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from marrowscope.engine.cv import TTA_VIEWS
from marrowscope.inference.predictor import softmax
from marrowscope.metrics.classification import classification_metrics, paired_comparison

SEEDS = ("full", "full_seed1", "full_seed2")
FRACTIONS = {"frac25": 0.25, "frac50": 0.5, "frac75": 0.75, "full": 1.0}


def _key(path: str) -> str:
    """``.../CLASS/file.jpg`` -> ``CLASS/file.jpg`` (the same image on either machine)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def load_folds(run: Path, logits_key: str) -> dict[int, dict[str, np.ndarray]]:
    """Finished folds of a run: fold -> {"probs" (d8 mean), "labels", "keys"}, sorted by key."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for fold in sorted(run.glob("fold-*")):
        oof = fold / "oof.npz"
        if not oof.is_file():
            continue
        with np.load(oof) as z:
            if logits_key not in z.files:  # a fold of an older marrowscope: best epoch only
                print(f"note: {oof} has no {logits_key!r}; left out of that checkpoint's rows")
                continue
            key = logits_key
            probs = softmax(z[key][TTA_VIEWS["d8"]].astype(np.float64)).mean(axis=0)
            keys = np.asarray([_key(p) for p in z["paths"].tolist()])
            order = np.argsort(keys)
            out[int(fold.name.split("-")[1])] = {
                "probs": probs[order],
                "labels": z["labels"][order],
                "keys": keys[order],
            }
    return out


def pooled(folds: dict[int, dict[str, np.ndarray]], which: list[int]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([folds[f][k] for f in which]) for k in ("probs", "labels", "keys")}


def macro_f1(y: np.ndarray, p: np.ndarray, classes: list[str]) -> dict:
    m = classification_metrics(y, p, classes)
    return {
        "n": int(y.size),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "per_class_f1": {c: m["per_class"][c]["f1"] for c in classes},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=Path, default=Path("runs/cv-full"))
    ap.add_argument("--proxy", type=Path, default=None, help="an 11-epoch CPU CV run to pair with")
    ap.add_argument("--out", type=Path, default=Path("docs/results/cv-full/ceiling.json"))
    args = ap.parse_args()
    classes = json.loads((args.runs / "full" / "cv_summary.json").read_text())["classes"]
    result: dict = {"variants": {}, "ensembles": {}, "learning_curve": {}}

    # each variant, best-epoch and last-epoch weights, on the folds it finished
    runs = {p.name: p for p in sorted(args.runs.iterdir()) if p.is_dir()}
    loaded = {
        (name, key): load_folds(run, key)
        for name, run in runs.items()
        for key in ("logits", "logits_last")
    }
    print("| variant | folds | n train (mean) | pooled macro-F1, best epoch | last epoch |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        best, last = loaded[(name, "logits")], loaded[(name, "logits_last")]
        if not best:
            continue
        which = sorted(best)
        n_train = [
            sum(
                1
                for r in csv.DictReader((run / f"fold-{f}" / "split.csv").open(newline=""))
                if r["split"] == "train"
            )
            for f in which
        ]
        pb, pl = pooled(best, which), pooled(last, which)
        rec = {
            "folds": which,
            "n_train": n_train,
            "best_epoch": macro_f1(pb["labels"], pb["probs"].argmax(1), classes),
            "last_epoch": macro_f1(pl["labels"], pl["probs"].argmax(1), classes),
        }
        result["variants"][name] = rec
        print(
            f"| {name} | {len(which)} | {np.mean(n_train):.0f} | "
            f"{rec['best_epoch']['macro_f1']:.3f} | {rec['last_epoch']['macro_f1']:.3f} |"
        )

    # ensembles of complete runs, last-epoch weights, paired against the default model
    complete = {n for n in runs if len(loaded[(n, "logits_last")]) == 3}
    base = pooled(loaded[("full", "logits_last")], [0, 1, 2])
    y = base["labels"]
    groups = {
        "3 seeds": [s for s in SEEDS if s in complete],
        "MobileNetV2 + Lite0": ["full", "lite0"],
        "3 seeds + Lite0": [*SEEDS, "lite0"],
    }
    print("\n| ensemble (last epoch, d8) | pooled macro-F1 | vs one model [95% CI] | McNemar p |")
    print("|---|---:|---:|---:|")
    for label, members in groups.items():
        if not set(members) <= complete or len(members) < 2:
            continue
        parts = [pooled(loaded[(m, "logits_last")], [0, 1, 2]) for m in members]
        assert all(np.array_equal(p["keys"], base["keys"]) for p in parts)
        probs = np.mean([p["probs"] for p in parts], axis=0)
        cmp = paired_comparison(y, base["probs"].argmax(1), probs.argmax(1), classes)
        result["ensembles"][label] = {
            "members": members,
            **macro_f1(y, probs.argmax(1), classes),
            "vs_single": cmp,
        }
        lo, hi = cmp["difference_ci95"]
        print(
            f"| {label} | {cmp['macro_f1_b']:.3f} | {cmp['difference']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] | {cmp['mcnemar_p']:.2g} |"
        )

    # learning curve on the folds every fraction finished
    fracs = {n: f for n, f in FRACTIONS.items() if loaded.get((n, "logits_last"))}
    common = sorted(set.intersection(*(set(loaded[(n, "logits_last")]) for n in fracs)))
    points = []
    print(f"\nLearning curve (folds {common}, last epoch, d8):\n")
    print("| training fraction | n train (mean) | pooled macro-F1 |")
    print("|---:|---:|---:|")
    for name, frac in sorted(fracs.items(), key=lambda t: t[1]):
        p = pooled(loaded[(name, "logits_last")], common)
        n = float(
            np.mean(
                [
                    result["variants"][name]["n_train"][result["variants"][name]["folds"].index(f)]
                    for f in common
                ]
            )
        )
        f1 = macro_f1(p["labels"], p["probs"].argmax(1), classes)
        points.append({"fraction": frac, "n_train": n, **f1})
        print(f"| {frac:.2f} | {n:.0f} | {f1['macro_f1']:.3f} |")
    x = np.log2([pt["n_train"] for pt in points])
    yv = np.asarray([pt["macro_f1"] for pt in points])
    b, a = np.polyfit(x, yv, 1)
    residual = float(np.sqrt(np.mean((a + b * x - yv) ** 2)))
    predict = {int(n): float(a + b * np.log2(n)) for n in (1317, 1550, 2 * 1550, 4 * 1550)}
    needed = float(2 ** ((0.85 - a) / b)) if b > 0 else float("inf")
    per_class = {}
    for c in classes:
        yc = np.asarray([pt["per_class_f1"][c] for pt in points])
        bc, ac = np.polyfit(x, yc, 1)
        per_class[c] = {
            "per_doubling": float(bc),
            "predicted_f1_at_1550": float(ac + bc * np.log2(1550)),
            "n_train_for_0.75": float(2 ** ((0.75 - ac) / bc)) if bc > 0 else float("inf"),
        }
    result["learning_curve"] = {
        "folds": common,
        "points": points,
        "fit": {"intercept": float(a), "per_doubling": float(b), "rms_residual": residual},
        "predicted_macro_f1": predict,
        "n_train_for_0.85": needed,
        "per_class": per_class,
    }
    print("\n| class | F1 gain per doubling | predicted F1 at 1,550 | cells for F1 0.75 |")
    print("|---|---:|---:|---:|")
    for c, pc in per_class.items():
        print(
            f"| {c} | {pc['per_doubling']:+.3f} | {pc['predicted_f1_at_1550']:.3f} | "
            f"{pc['n_train_for_0.75']:.0f} |"
        )
    print(
        f"\nfit: macro-F1 = {a:.3f} + {b:.3f} * log2(n)  (rms residual {residual:.3f}); "
        f"predicted: "
        + ", ".join(f"n={n}: {v:.3f}" for n, v in predict.items())
        + f"; 0.85 at n = {needed:.0f}"
    )

    if args.proxy:
        proxy = pooled(load_folds(args.proxy, "logits"), [0, 1, 2])
        full_best = pooled(loaded[("full", "logits")], [0, 1, 2])
        assert np.array_equal(proxy["keys"], full_best["keys"]), "the two runs scored other images"
        cmp = paired_comparison(y, proxy["probs"].argmax(1), full_best["probs"].argmax(1), classes)
        result["full_vs_proxy"] = {"proxy": str(args.proxy), **cmp}
        lo, hi = cmp["difference_ci95"]
        print(
            f"\n26 epochs (GPU) vs the 11-epoch proxy ({args.proxy}), best epoch, d8: "
            f"{cmp['macro_f1_b']:.3f} vs {cmp['macro_f1_a']:.3f}, {cmp['difference']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}], McNemar p = {cmp['mcnemar_p']:.2g}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()

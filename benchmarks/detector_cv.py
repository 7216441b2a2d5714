"""Cross-validate a white-cell detector recipe on field-dev's train split (docs/fields.md).

The 146 tune fields that fix a detector's threshold hold about 150 white cells: too few to tell
two recipes apart. This trains a recipe K times (default 5), each time on K-1 folds of the train
split (stratified by origin; the tune fields for the threshold are carved out of those folds by
the training rule) and detects on the held-out fold, so every one of the 977 train-split fields
is scored once by a detector that never saw it. The val split is not read.

It stores, per annotated white cell, whether it was found (and whether it is cut by the field's
border), and per field the false boxes, so two recipes run on the same folds can be paired later
(the recipe is ``configs/detect-fields.yaml``'s, wbc2's since 2026-12-01; ``--set paste=0`` is
wbc1's, the ``base`` runs of docs/fields.md):

    python benchmarks/detector_cv.py run --set paste=0 --out runs/detector-cv/base
    python benchmarks/detector_cv.py run --set cut=0.5 --out runs/detector-cv/cut50
    python benchmarks/detector_cv.py compare runs/detector-cv/base/cv.json \\
        runs/detector-cv/cut50/cv.json --out docs/results/detector-cv/cut50-vs-base.json

``rescore`` runs a finished run's fold detectors again on their held-out folds without training:
with the ruler as the code has it now (after a change to the ruler), or with each field's scale
taken from its annotated red cells (what ``--um-per-px`` gives when the magnification is known):

    python benchmarks/detector_cv.py rescore runs/detector-cv/base --scale annotated

``misses`` lists the cells a run missed with the best box its fold detector finds near each at a
low threshold (its score and overlap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.stats import binomtest

from marrowscope.data.fields import (
    FieldRecord,
    annotated_rbc_px,
    read_field_manifest,
    touches_border,
)
from marrowscope.engine.detector_train import (
    detect_all,
    evaluate_fields,
    format_scores,
    load_train_config,
    train_detector,
)
from marrowscope.inference.fields import FieldDetector, load_field
from marrowscope.metrics.detection import match_boxes
from marrowscope.preprocess import fields as ruler
from marrowscope.preprocess.fields import RBC_DIAMETER_UM
from marrowscope.utils.boxes import box_iou


def folds(records: Sequence[FieldRecord], k: int, seed: int) -> list[int]:
    """A fold number per field, each origin dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    out = [0] * len(records)
    for origin in sorted({r.origin for r in records}):
        idx = [i for i, r in enumerate(records) if r.origin == origin]
        for n, i in enumerate(rng.permutation(idx)):
            out[int(i)] = n % k
    return out


def code_version() -> dict[str, Any]:
    """The commit and the red-cell ruler's settings a run was made with."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                # new files count too where code lives (a benchmark not yet committed)
                ["git", "status", "--porcelain", "--", "src", "benchmarks", "scripts", "configs"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "commit": commit,
        "uncommitted_changes": dirty,
        "ruler": {"nucleus": ruler._NUCLEUS, "nucleus_share": ruler._NUCLEUS_SHARE},
    }


def per_cell(
    results: Sequence[tuple[np.ndarray, np.ndarray]], records: Sequence[FieldRecord]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per annotated white cell (found or not) and per field (false boxes)."""
    cells, fields = [], []
    for (boxes, scores), r in zip(results, records, strict=True):
        truth = np.asarray(r.wbc, np.float64).reshape(-1, 4)
        counts, matched = match_boxes(boxes, scores, truth)
        hit = set(matched[matched >= 0].tolist())
        border = touches_border(truth, r.width, r.height)
        for j in range(len(truth)):
            cells.append(
                {
                    "field": Path(r.path).name,
                    "origin": r.origin,
                    "cell": j,
                    "found": j in hit,
                    "at_border": bool(border[j]),
                }
            )
        fields.append({"field": Path(r.path).name, "origin": r.origin, "false": counts.fp})
    return cells, fields


def cmd_run(args: argparse.Namespace) -> None:
    overrides: dict[str, object] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    overrides["eval_every"] = 10**6  # only the final threshold fit on the tune fields
    cfg = load_train_config(args.config, overrides)
    code = code_version()  # at the start: the code that trains, not what is checked out at the end
    records = read_field_manifest(cfg.data, split="train")
    fold_of = folds(records, args.folds, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(records)
    thresholds, minutes = [], []
    t0 = time.perf_counter()
    for k in range(args.folds):
        train = [r for r, f in zip(records, fold_of, strict=True) if f != k]
        held = [i for i, f in enumerate(fold_of) if f == k]
        bundle, summary = train_detector(
            cfg, out / f"fold{k}", records=train, log=lambda m: print(m, flush=True)
        )
        det = FieldDetector.load(bundle)
        thresholds.append(summary["min_score"])
        minutes.append(summary["train_minutes"])
        for i, res in zip(held, detect_all(det, [records[i] for i in held]), strict=True):
            results[i] = res
        print(f"fold {k}: threshold {summary['min_score']}", flush=True)
    write_run_report(
        out,
        [r for r in results if r is not None],
        records,
        cfg=cfg,
        overrides={k: v for k, v in overrides.items() if k != "eval_every"},
        args=args,
        code=code,
        thresholds=thresholds,
        minutes=minutes,
        started=t0,
    )


def write_run_report(
    out: Path,
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[FieldRecord],
    *,
    cfg: Any,
    overrides: dict[str, object],
    args: argparse.Namespace,
    code: dict[str, Any],
    thresholds: list[float],
    minutes: list[float],
    started: float,
    **extra: Any,
) -> None:
    """Score a run's out-of-fold detections, print them and write ``OUT/cv.json`` (``extra``
    keys first), the report :func:`cmd_compare` pairs."""
    per = evaluate_fields(results, records)
    print(f"out-of-fold, {len(records)} train-split fields:\n{format_scores(per)}")
    cells, fields = per_cell(results, records)
    report = {
        **extra,
        "config": asdict(cfg),
        "overrides": overrides,
        "folds": args.folds,
        "fold_seed": args.seed,
        "code": code,
        "thresholds": thresholds,
        "train_minutes": minutes,
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "scores": {g: s.to_dict() for g, s in per.items()},
        "border_cells": _border(cells),
        "cells": cells,
        "fields": fields,
    }
    write_report(out / "cv.json", report)
    print(f"wrote {out / 'cv.json'}")


def annotated_um_per_px(r: FieldRecord) -> float | None:
    """The field's scale from its annotated red cells not cut by the border (median box side)."""
    side = annotated_rbc_px(r.rbc, r.width, r.height)
    return None if side is None else RBC_DIAMETER_UM / side


def cmd_rescore(args: argparse.Namespace) -> None:
    run = Path(args.run)
    old = read_report(run / "cv.json")
    records = read_field_manifest(old["config"]["data"], split="train")
    fold_of = folds(records, old["folds"], old["fold_seed"])
    if [Path(r.path).name for r in records] != [f["field"] for f in old["fields"]]:
        raise SystemExit(
            f"{run}: the train split's fields differ from the run's; its folds cannot be rebuilt"
        )
    dets = {k: FieldDetector.load(run / f"fold{k}" / "bundle") for k in range(old["folds"])}
    results, known = [], 0
    for r, k in zip(records, fold_of, strict=True):
        um = annotated_um_per_px(r) if args.scale == "annotated" else None
        known += um is not None
        d = dets[k].detect(load_field(r.path), um_per_px=um)
        results.append((d.boxes, d.scores))
    per = evaluate_fields(results, records)
    how = f"annotated red cells ({known} fields; the ruler elsewhere)" if known else "ruler"
    print(f"{run} rescored, scale from the {how}:")
    print(format_scores(per))
    cells, fields = per_cell(results, records)
    report = {
        **{k: old[k] for k in ("config", "overrides", "folds", "fold_seed", "thresholds")},
        "rescored": {"from": str(run / "cv.json"), "scale": args.scale, "annotated": known},
        "code": code_version(),
        "scores": {g: s.to_dict() for g, s in per.items()},
        "border_cells": _border(cells),
        "cells": cells,
        "fields": fields,
    }
    out = Path(args.out or run / f"rescored-{args.scale}.json")
    write_report(out, report)
    print(f"wrote {out}")


TABLES = ("cells", "fields")
"""The per-cell and per-field rows, stored as columns (one list per key) to stay small."""


def cmd_misses(args: argparse.Namespace) -> None:
    """Each annotated cell a run missed, with the best box its fold detector finds near it at a
    low threshold (how far from found it was: a low score, a loose box, or nothing). The
    detections are made again with the code as it is now, ruler included."""
    run = Path(args.run)
    old = read_report(run / "cv.json")
    records = {Path(r.path).name: r for r in read_field_manifest(old["config"]["data"], "train")}
    fold_of = dict(
        zip(
            [f["field"] for f in old["fields"]],
            folds([records[f["field"]] for f in old["fields"]], old["folds"], old["fold_seed"]),
            strict=True,
        )
    )
    dets = {
        k: FieldDetector.load(run / f"fold{k}" / "bundle", min_score=args.min_score)
        for k in range(old["folds"])
    }
    rows, found = [], {}
    for c in old["cells"]:
        if c["found"]:
            continue
        r, k = records[c["field"]], fold_of[c["field"]]
        g = np.asarray(r.wbc, np.float64).reshape(-1, 4)[c["cell"]]
        if c["field"] not in found:  # a field with several missed cells is detected once
            found[c["field"]] = dets[k].detect(load_field(r.path))
        d = found[c["field"]]
        ious = box_iou(g[None], d.boxes)[0] if len(d.boxes) else np.zeros(0)
        best = int(np.argmax(ious)) if len(ious) and ious.max() > 0 else -1
        rows.append(
            {
                **c,
                "box_px": [round(float(g[2] - g[0])), round(float(g[3] - g[1]))],
                "field_px": [r.width, r.height],
                "best_iou": round(float(ious[best]), 2) if best >= 0 else 0.0,
                "its_score": round(float(d.scores[best]), 2) if best >= 0 else 0.0,
                "threshold": old["thresholds"][k],
            }
        )
        print(rows[-1])
    out = Path(args.out or run / "misses.json")
    out.write_text(json.dumps({"from": str(run / "cv.json"), "misses": rows}, indent=1) + "\n")
    print(f"{len(rows)} missed cells; wrote {out}")


def write_report(path: Path, report: dict[str, Any]) -> None:
    """One top-level key per line, each value compact, the row tables as columns."""
    out = dict(report)
    for key in TABLES:
        rows = out[key]
        out[key] = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    body = ",\n".join(
        f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in out.items()
    )
    path.write_text("{\n" + body + "\n}\n", encoding="utf-8")


def read_report(path: str | Path) -> dict[str, Any]:
    """A report written by :func:`write_report`, its row tables back as lists of rows."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in TABLES:
        cols = report[key]
        if isinstance(cols, dict):
            n = len(next(iter(cols.values()), []))
            report[key] = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return report


def _border(cells: Sequence[dict[str, Any]]) -> dict[str, int]:
    b = [c for c in cells if c["at_border"]]
    return {"cells": len(b), "found": sum(c["found"] for c in b)}


def cmd_compare(args: argparse.Namespace) -> None:
    a, b = (read_report(p) for p in (args.a, args.b))
    if (a["folds"], a["fold_seed"]) != (b["folds"], b["fold_seed"]):
        raise SystemExit("the two runs used different folds; pair only runs on the same folds")
    key = lambda c: (c["field"], c["cell"])  # noqa: E731
    fa = {key(c): c for c in a["cells"]}
    fb = {key(c): c for c in b["cells"]}
    if fa.keys() != fb.keys() or [f["field"] for f in a["fields"]] != [
        f["field"] for f in b["fields"]
    ]:
        raise SystemExit("the two runs scored different fields or cells")
    report: dict[str, Any] = {"a": args.a, "b": args.b}
    for group in ["all", *sorted({c["origin"] for c in a["cells"]})]:
        ks = [k for k in fa if group == "all" or fa[k]["origin"] == group]
        only_a = sum(fa[k]["found"] and not fb[k]["found"] for k in ks)
        only_b = sum(fb[k]["found"] and not fa[k]["found"] for k in ks)
        p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        false_a = sum(f["false"] for f in a["fields"] if group in ("all", f["origin"]))
        false_b = sum(f["false"] for f in b["fields"] if group in ("all", f["origin"]))
        # false boxes, paired by field: a sign test over the fields where the two differ
        pairs = [
            (x["false"], y["false"])
            for x, y in zip(a["fields"], b["fields"], strict=True)
            if group in ("all", x["origin"])
        ]
        more_a = sum(x > y for x, y in pairs)
        more_b = sum(y > x for x, y in pairs)
        p_false = binomtest(more_a, more_a + more_b).pvalue if more_a + more_b else 1.0
        report[group] = {
            "cells": len(ks),
            "found_a": sum(fa[k]["found"] for k in ks),
            "found_b": sum(fb[k]["found"] for k in ks),
            "only_a": only_a,
            "only_b": only_b,
            "mcnemar_exact_p": round(float(p), 4),
            "false_boxes_a": false_a,
            "false_boxes_b": false_b,
            "fields_more_false_a": more_a,
            "fields_more_false_b": more_b,
            "false_boxes_sign_test_p": round(float(p_false), 4),
            "recall_a": a["scores"][group]["recall"],
            "recall_b": b["scores"][group]["recall"],
            "precision_a": a["scores"][group]["precision"],
            "precision_b": b["scores"][group]["precision"],
        }
        r = report[group]
        print(
            f"{group:<11} cells {r['cells']:4d}  found A {r['found_a']} B {r['found_b']} "
            f"(only A {only_a}, only B {only_b}, p {r['mcnemar_exact_p']})  "
            f"false boxes A {false_a} B {false_b} (fields with more: A {more_a}, B {more_b}, "
            f"p {r['false_boxes_sign_test_p']})"
        )
    report["border_cells"] = {"a": a["border_cells"], "b": b["border_cells"]}
    print(f"border cells found: A {a['border_cells']}  B {b['border_cells']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="configs/detect-fields.yaml")
    r.add_argument("--set", action="append", help="override a setting: key=value")
    r.add_argument("--folds", type=int, default=5)
    r.add_argument("--seed", type=int, default=0, help="seeds the folds (not the training)")
    r.add_argument("--out", required=True)
    q = sub.add_parser("rescore")
    q.add_argument("run", help="a finished run folder (with cv.json and fold*/bundle)")
    q.add_argument("--scale", choices=["ruler", "annotated"], default="ruler")
    q.add_argument("--out")
    m = sub.add_parser("misses")
    m.add_argument("run", help="a finished run folder (with cv.json and fold*/bundle)")
    m.add_argument("--min-score", type=float, default=0.03)
    m.add_argument("--out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out")
    args = ap.parse_args()
    {"run": cmd_run, "rescore": cmd_rescore, "misses": cmd_misses, "compare": cmd_compare}[
        args.cmd
    ](args)


if __name__ == "__main__":
    main()

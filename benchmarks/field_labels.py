"""White cells boxed twice in field-dev's labels, and what they do to recall (docs/fields.md).

Two annotated white-cell boxes of one field that overlap by more than half (IoU > 0.5) are one
cell boxed twice (:func:`marrowscope.data.fields.duplicate_boxes`; every such pair in field-dev
was checked by eye: all are in the BCD fields). A detector that boxes the cell once matches one of
the pair, so every pair caps the recall of its origin. This lists the pairs per split, the recall
ceiling per origin, and, for detector cross-validation runs (``benchmarks/detector_cv.py``), the
recall counted with each pair as one cell (found when either of its boxes was matched):

    python benchmarks/field_labels.py --runs docs/results/detector-cv/base-ruler2.json \\
        docs/results/detector-cv/reflect32.json docs/results/detector-cv/reflect32-cut50.json \\
        --out docs/results/field-labels.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from detector_cv import read_report

from marrowscope.data.fields import duplicate_boxes, read_field_manifest
from marrowscope.utils.boxes import box_iou


def duplicates(data: str, split: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The pairs of one split and the recall ceiling per origin."""
    pairs, cells, dup = [], defaultdict(int), defaultdict(int)
    for r in read_field_manifest(data, split=split):
        boxes = np.asarray(r.wbc, np.float64).reshape(-1, 4)
        cells[r.origin] += len(boxes)
        for i, j in duplicate_boxes(boxes):
            dup[r.origin] += 1
            pairs.append(
                {
                    "field": Path(r.path).name,
                    "origin": r.origin,
                    "box_index": [i, j],
                    "boxes": np.round(boxes[[i, j]]).astype(int).tolist(),
                    "iou": round(float(box_iou(boxes[[i]], boxes[[j]])[0, 0]), 2),
                }
            )
    ceiling = {
        o: {"cells": n, "boxed_twice": dup[o], "recall_ceiling": round((n - dup[o]) / n, 4)}
        for o, n in sorted(cells.items())
    }
    return pairs, ceiling


def deduplicated_recall(run: str, pairs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Recall per origin of a cross-validation run as labelled and with each pair as one cell."""
    cells = read_report(run)["cells"]
    found = {(c["field"], c["cell"]): c["found"] for c in cells}
    drop = set()
    for p in pairs:
        i, j = p["box_index"]
        if found[(p["field"], i)] or found[(p["field"], j)]:
            # the cell was found: keep the matched box's row, drop the other
            drop.add((p["field"], j if found[(p["field"], i)] else i))
        else:
            drop.add((p["field"], j))
    out: dict[str, dict[str, Any]] = {}
    for origin in sorted({c["origin"] for c in cells}) + ["all"]:
        rows = [c for c in cells if origin in ("all", c["origin"])]
        kept = [c for c in rows if (c["field"], c["cell"]) not in drop]
        out[origin] = {
            "cells": len(rows),
            "found": sum(c["found"] for c in rows),
            "recall": round(sum(c["found"] for c in rows) / len(rows), 4),
            "cells_deduplicated": len(kept),
            "found_deduplicated": sum(c["found"] for c in kept),
            "recall_deduplicated": round(sum(c["found"] for c in kept) / len(kept), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--runs", nargs="*", default=[], help="detector_cv.py reports (train split)")
    ap.add_argument("--out")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    for split in ("train", "val"):
        pairs, ceiling = duplicates(args.data, split)
        report[split] = {"pairs": pairs, "ceiling": ceiling}
        print(f"{split}: {len(pairs)} white cells boxed twice")
        for p in pairs:
            print(f"  {p['field']} ({p['origin']}): boxes {p['box_index']}, IoU {p['iou']}")
        for o, c in ceiling.items():
            print(f"  {o:<11} {c['cells']} boxes, recall at most {c['recall_ceiling']:.3f}")
    report["runs"] = {}
    for run in args.runs:
        per = deduplicated_recall(run, report["train"]["pairs"])
        report["runs"][run] = per
        print(run)
        for o, s in per.items():
            print(
                f"  {o:<11} recall {s['found'] / s['cells']:.3f} ({s['found']}/{s['cells']}), "
                f"with each pair as one cell "
                f"{s['found_deduplicated'] / s['cells_deduplicated']:.3f} "
                f"({s['found_deduplicated']}/{s['cells_deduplicated']})"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

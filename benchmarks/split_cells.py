"""Does a detector box one lobed cell as two? Measured on real single-cell images of each class.

A detector taught to keep touching cells apart (``wbc2``: pasted neighbours) may also cut a
segmented neutrophil's lobes, or an eosinophil's, into two "cells". field-dev's val split shows
it once (docs/fields.md); this measures it on many real cells whose class is known: every image
of a crop set (bm-cells-dev: Matek bone-marrow crops, 250 px at a known 0.069 um/px; pbc-cells-dev:
PBC crops, 360 x 363 px, which are PBC fields of view with one centred cell) run through each
detector as a field, at the set's known scale (``--um-per-px``, so the ruler plays no part).

Per image, the boxes whose centre lies within ``CENTRE`` of the shorter side from the image's
centre are the labelled (centred) cell's: two or more are a *split* (or a neighbour pressed
against it: the rate in round-nucleus classes, lymphocytes, is the control). The centred cell is
*missed* when no box covers the image's centre point. Detectors are paired on the same images (exact McNemar on split, and on missed).
Matek's crops are tight (the cell often fills the 250 px frame and is cut by its border), unlike
a field, so their missed centre cells say more about crops than about fields.

    python benchmarks/split_cells.py --out docs/results/split-cells.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from marrowscope.inference.fields import FieldDetector
from marrowscope.utils.image import list_image_files

ROOT = Path(__file__).resolve().parents[1]
CENTRE = 0.2
"""A box belongs to the centred cell when its centre is this share of the shorter side from the
image's centre, or closer."""
SETS = {
    # name: (folder under ../shared/data, um per px)
    "bm-cells-dev": ("bm-cells-dev", 0.069),
    "pbc-cells-dev": ("pbc-cells-dev", 0.088),
}


def centre_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[int, bool]:
    """How many of ``boxes`` have their centre within :data:`CENTRE` of the image's centre, and
    whether any box covers the image's centre point."""
    if len(boxes) == 0:
        return 0, False
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 - width / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2
    near = int((np.hypot(cx, cy) <= CENTRE * min(width, height)).sum())
    covered = bool(
        (
            (boxes[:, 0] <= width / 2)
            & (boxes[:, 2] >= width / 2)
            & (boxes[:, 1] <= height / 2)
            & (boxes[:, 3] >= height / 2)
        ).any()
    )
    return near, covered


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, object]:
    """Images where only the first / only the second detector has the property, exact McNemar."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return {"counts": [only_a, only_b], "mcnemar_p": round(float(p), 4)}


def run(detector: FieldDetector, folder: Path, um_per_px: float) -> dict[str, list[int]]:
    """Per class (sub-folder with at least 100 images), per image: the number of centred boxes,
    or -1 when no box covers the image's centre point (the centred cell missed)."""
    out: dict[str, list[int]] = {}
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = list_image_files(cls)[0]
        if len(files) < 100:
            continue
        counts = []
        for f in files:
            found = detector.detect(f, um_per_px=um_per_px, name=str(f))
            near, covered = centre_boxes(found.boxes, found.width, found.height)
            counts.append(near if covered else -1)
        out[cls.name] = counts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", nargs="+", default=["wbc1", "wbc2"])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out")
    args = ap.parse_args()
    t0 = time.perf_counter()
    raw: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name in args.detectors:
        det = FieldDetector.load(name)
        for label, (sub, um) in SETS.items():
            raw.setdefault(label, {})[name] = run(det, Path(args.shared) / sub, um)
            print(f"{name} on {label} done", flush=True)
    summary: dict[str, dict[str, dict[str, object]]] = {}
    for label, per_det in raw.items():
        for cls in next(iter(per_det.values())):
            row: dict[str, object] = {"images": len(next(iter(per_det.values()))[cls])}
            for name, per_cls in per_det.items():
                c = np.array(per_cls[cls])
                row[name] = {
                    "split": int((c >= 2).sum()),
                    "missed": int((c < 0).sum()),
                    "split_share": round(float((c >= 2).mean()), 4),
                }
            if len(per_det) == 2:
                first, second = (np.array(v[cls]) for v in per_det.values())
                for what, a, b in (
                    ("split", first >= 2, second >= 2),
                    ("missed", first < 0, second < 0),
                ):
                    row[f"{what}_only_first_second"] = _paired(a, b)
            summary.setdefault(label, {})[cls] = row
            print(label, cls, json.dumps(row), flush=True)
        if len(per_det) == 2:  # all classes of the set together
            first, second = (
                np.concatenate([np.array(c) for c in v.values()]) for v in per_det.values()
            )
            summary[label]["all"] = {
                "images": len(first),
                "split_only_first_second": _paired(first >= 2, second >= 2),
                "missed_only_first_second": _paired(first < 0, second < 0),
            }
            print(label, "all", json.dumps(summary[label]["all"]), flush=True)
    result = {
        "detectors": args.detectors,
        "centre": CENTRE,
        "scales_um_per_px": {k: v[1] for k, v in SETS.items()},
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

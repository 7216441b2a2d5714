"""How close can two white cells be before the detector joins or loses one? (docs/fields.md)

Bone-marrow smears are crowded: nucleated cells touch and overlap far more often than in the
blood fields of field-dev, where nearly every white cell stands alone, so field-dev's scores say
little about touching cells. This puts a second, mirrored copy of a field's one annotated white
cell beside it, at a set gap, blended into the field with OpenCV's Poisson cloning
(``cv2.seamlessClone``: the copy takes the field's colours at its edge, no pasted rectangle), and
asks whether the detector finds both cells:

- gap, as a fraction of the cell's width:
  ``1.0`` is a control (two cells well apart: a miss there is the pasting, not the closeness),
  ``0`` boxes that touch, negative values boxes that overlap by that fraction (the copy lies over
  the original's edge, as in a squashed smear);
- every val field with exactly one annotated white cell, clear of the border (the copy goes to
  its right, the field widened with its background colour to make room); ``--split tune`` takes
  the train split's tune fields instead, held out by every detector trained here, to compare
  training recipes without val;
- a pair is *found* when both cells are matched at IoU >= 0.5 (``marrowscope.metrics.detection``),
  *merged* when a found box covers the pair: it overlaps the union of the two boxes by half, and
  more than it overlaps either cell.

Synthetic by construction (the copy is the same cell, mirrored; ``--copy shift`` moves it
instead, ``--copy rotate`` turns it by 180 degrees: a mirrored pair is symmetric about the line
where the cells meet, which a detector trained with mirrored margins learns to box as one cell),
so read it as where the detector's separation breaks down, not as an accuracy on real marrow.

    python benchmarks/touching_cells.py --out docs/results/fields-touching.json \\
        --picture docs/images/fields-touching.jpg
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from marrowscope.data.fields import (
    TOUCHING_COPIES,
    FieldRecord,
    read_field_manifest,
    touches_border,
    touching_pair,
)
from marrowscope.engine.detector_train import DetectorTrainConfig, split_tune
from marrowscope.inference.fields import FieldDetector, load_field
from marrowscope.metrics.detection import match_boxes
from marrowscope.utils.boxes import box_iou

GAPS = (1.0, 0.25, 0.1, 0.0, -0.1, -0.2, -0.3)


def pick_fields(root: str, split: str) -> list[FieldRecord]:
    """The fields with exactly one annotated white cell, clear of the border: of the val split,
    or (``tune``) of the train-split fields every detector trained here holds out to fit its
    threshold (:func:`~marrowscope.engine.detector_train.split_tune`, the default fraction and
    seed), which compares training recipes without looking at val."""
    if split == "tune":
        cfg = DetectorTrainConfig()
        records = split_tune(read_field_manifest(root, split="train"), cfg.tune_fraction, cfg.seed)[
            1
        ]
    else:
        records = read_field_manifest(root, split=split)
    return [
        r
        for r in records
        if len(r.wbc) == 1 and not touches_border(r.wbc, r.width, r.height, margin=3).any()
    ]


def run(
    root: str,
    detector: FieldDetector,
    gaps: tuple[float, ...],
    split: str = "val",
    copy: str = "mirror",
) -> dict[str, Any]:
    fields = pick_fields(root, split)
    per_gap: dict[str, Any] = {}
    examples: dict[float, dict[str, tuple[Any, ...]]] = {}
    t0 = time.perf_counter()
    n_detect = 0
    for gap in gaps:
        rows = []
        for r in fields:
            field, cell, second = touching_pair(load_field(r.path), r.wbc[0], gap, copy)
            truth = np.stack([cell, second])
            found = detector.detect(field, name=r.path)
            n_detect += 1
            counts, _ = match_boxes(found.boxes, found.scores, truth, iou=0.5)
            # merged: a found box that covers the pair, i.e. overlaps the union of the two
            # boxes by half and more than it overlaps either cell (at strong overlaps one cell's
            # box alone overlaps the union by half)
            union = np.concatenate([truth[:, :2].min(0), truth[:, 2:].max(0)])[None]
            merged = False
            if len(found.boxes):
                with_union = box_iou(found.boxes, union)[:, 0]
                with_cells = box_iou(found.boxes, truth).max(1)
                merged = bool(((with_union >= 0.5) & (with_union > with_cells)).any())
            rows.append(
                {
                    "field": Path(r.path).name,
                    "origin": r.origin,
                    "found_both": counts.tp == 2,
                    "found_one": counts.tp == 1,
                    "merged": merged,
                    "boxes_found": len(found.boxes),
                }
            )
            # the picture: one pair per origin, a failure where there is one
            shown = examples.setdefault(gap, {})
            if r.origin not in shown or (shown[r.origin][4] and not rows[-1]["found_both"]):
                shown[r.origin] = (field, truth, found.boxes, r.origin, rows[-1]["found_both"])
        n = len(rows)
        by_origin: dict[str, dict[str, Any]] = {}
        for o in sorted({x["origin"] for x in rows}):
            sub = [x for x in rows if x["origin"] == o]
            by_origin[o] = {
                "pairs": len(sub),
                "found_both": round(sum(x["found_both"] for x in sub) / len(sub), 3),
            }
        per_gap[f"{gap:g}"] = {
            "pairs": n,
            "found_both": round(sum(x["found_both"] for x in rows) / n, 3),
            "found_one": round(sum(x["found_one"] for x in rows) / n, 3),
            "merged": round(sum(x["merged"] for x in rows) / n, 3),
            "cells_recall": round(
                sum(2 * x["found_both"] + x["found_one"] for x in rows) / (2 * n), 3
            ),
            "mean_count_error": round(float(np.mean([abs(x["boxes_found"] - 2) for x in rows])), 3),
            "by_origin": by_origin,
            "misses": [x["field"] for x in rows if not x["found_both"]],
        }
        print(
            f"gap {gap:+.2f}: {n} pairs, both found {per_gap[f'{gap:g}']['found_both']:.3f}, "
            f"merged {per_gap[f'{gap:g}']['merged']:.3f}, one {per_gap[f'{gap:g}']['found_one']:.3f}"
        )
    seconds = time.perf_counter() - t0
    return {
        "detector": detector.name_,
        "min_score": detector.min_score_,
        "split": split,
        "copy": copy,
        "fields": len(fields),
        "gaps": per_gap,
        "detections": n_detect,
        "seconds": round(seconds, 1),
        "_examples": examples,
    }


def picture(examples: dict[float, dict], path: Path, gaps: tuple[float, ...]) -> None:
    """One row per gap, one tile per origin (a failure where the gap has one): green the two
    cells, magenta what was found."""
    size = 160
    rows = []
    for gap in gaps:
        tiles = []
        for field, truth, found, _origin, _ok in examples.get(gap, {}).values():
            img = cv2.cvtColor(field, cv2.COLOR_RGB2BGR)
            for b in truth:
                cv2.rectangle(
                    img, tuple(int(v) for v in b[:2]), tuple(int(v) for v in b[2:]), (0, 200, 0), 2
                )
            for b in found:
                cv2.rectangle(
                    img,
                    tuple(int(v) for v in b[:2]),
                    tuple(int(v) for v in b[2:]),
                    (255, 0, 255),
                    2,
                )
            x0, y0 = np.maximum(np.floor(truth.min(0)[:2]).astype(int) - 20, 0)
            x1, y1 = np.ceil(truth.max(0)[2:]).astype(int) + 20
            crop = img[y0:y1, x0:x1]
            scale = size / max(crop.shape[:2])
            crop = cv2.resize(crop, (int(crop.shape[1] * scale), int(crop.shape[0] * scale)))
            tile = np.full((size, size, 3), 255, np.uint8)
            tile[: crop.shape[0], : crop.shape[1]] = crop
            tiles.append(tile)
        while len(tiles) < 4:
            tiles.append(np.full((size, size, 3), 255, np.uint8))
        label = np.full((size, 90, 3), 255, np.uint8)
        cv2.putText(
            label, f"gap {gap:+g}", (4, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1
        )
        rows.append(np.hstack([label, *tiles]))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 85])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--detector", default="wbc1", help="a shipped detector, classical, or a folder")
    ap.add_argument(
        "--split",
        choices=["val", "tune"],
        default="val",
        help="val, or the train split's tune fields (to compare recipes without val)",
    )
    ap.add_argument(
        "--copy",
        choices=TOUCHING_COPIES,
        default="mirror",
        help="the second cell: the first mirrored (default), moved, or turned by 180 degrees",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--picture", type=Path, default=None)
    args = ap.parse_args()
    detector = FieldDetector.load(args.detector)
    result = run(args.data, detector, GAPS, args.split, args.copy)
    examples = result.pop("_examples")
    if args.picture is not None:
        picture(examples, args.picture, GAPS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

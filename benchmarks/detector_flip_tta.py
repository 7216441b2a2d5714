"""Does flip test-time augmentation of the white-cell detector's heat map pay? (docs/fields.md)

Scores the shipped detector on field-dev's train split (the fields it was fitted on and the 15%
tune fields that fixed its threshold; the val split is not read) with the plain input and with the
horizontal, vertical and double flip averaged back onto the stride-8 grid (heat map after the
sigmoid and log box sizes averaged, offsets from the plain view), refits the threshold on the
tune fields by the training rule and prints recall / precision per origin for each; the plain
view is also scored at every threshold the flipped views chose (so a gain is not just the
threshold's), and the annotated cells it misses are listed with what they are (cut by the field's
border or not, the best overlap and score of any found box).

    python benchmarks/detector_flip_tta.py [--detector wbc1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.data.fields import FieldRecord, read_field_manifest, touches_border
from marrowscope.engine.detector_train import (
    evaluate_fields,
    fit_threshold,
    format_scores,
    split_tune,
)
from marrowscope.inference.fields import FieldDetector, load_field
from marrowscope.metrics.detection import match_boxes
from marrowscope.models.detector import to_input
from marrowscope.utils.boxes import box_iou

VIEWS = {"plain": (), "hflip": ((-1,),), "flips": ((-1,), (-2,), (-2, -1))}


class FlipDetector(FieldDetector):
    """The learned detector with its heat map averaged over flipped inputs."""

    flips: tuple[tuple[int, ...], ...] = ()

    def _maps(self, work: np.ndarray) -> np.ndarray:
        plain = super()._maps(work)  # the shipped path, unchanged
        if not self.flips:
            return plain
        meta = self.metadata_
        assert meta is not None
        # the input the plain view saw; sides are multiples of 32: flips map grid cells onto cells
        x = to_input(work, meta.margin, meta.pad)

        def run(a: np.ndarray) -> np.ndarray:
            return self._session.run(None, {"images": np.ascontiguousarray(a)})[0][0]

        views = [plain] + [np.flip(run(np.flip(x, axes)), axes) for axes in self.flips]
        heat = np.mean([1.0 / (1.0 + np.exp(-v[0])) for v in views], axis=0)
        heat = np.clip(heat, 1e-6, 1 - 1e-6)
        out = plain.copy()
        out[0] = np.log(heat / (1.0 - heat))
        out[1:3] = np.mean([v[1:3] for v in views], axis=0)
        return out


def misses(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[FieldRecord],
    min_score: float,
) -> list[dict[str, Any]]:
    """The annotated white cells left unmatched at ``min_score`` (greedy matching, IoU 0.5)."""
    rows = []
    for (boxes, scores), r in zip(results, records, strict=True):
        truth = np.asarray(r.wbc, np.float64).reshape(-1, 4)
        keep = scores >= min_score
        _, matched = match_boxes(boxes[keep], scores[keep], truth)
        border = touches_border(truth, r.width, r.height)
        for j in sorted(set(range(len(truth))) - set(matched.tolist())):
            g = truth[j]
            ious = box_iou(g[None], boxes)[0] if len(boxes) else np.zeros(0)
            best = int(np.argmax(ious)) if len(ious) and ious.max() > 0 else -1
            rows.append(
                {
                    "field": Path(r.path).name,
                    "origin": r.origin,
                    "box": [round(float(v)) for v in g],
                    "at_border": bool(border[j]),
                    "best_iou": round(float(ious[best]), 2) if best >= 0 else 0.0,
                    "its_score": round(float(scores[best]), 2) if best >= 0 else 0.0,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="wbc1")
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fit, tune = split_tune(read_field_manifest(args.data, split="train"), 0.15, 42)
    report: dict[str, Any] = {"fit_fields": len(fit), "tune_fields": len(tune)}
    plain: dict[str, Any] = {}
    for mode, flips in VIEWS.items():
        det = FlipDetector.load(args.detector, min_score=0.05)
        det.flips = flips
        results = {}
        t0 = time.perf_counter()
        for name, recs in (("tune", tune), ("fit", fit)):
            results[name] = [
                (d.boxes, d.scores) for d in (det.detect(load_field(r.path)) for r in recs)
            ]
        ms = 1000 * (time.perf_counter() - t0) / (len(fit) + len(tune))
        thr, per_tune = fit_threshold(results["tune"], tune)
        per_fit = evaluate_fields(results["fit"], fit, min_score=thr)
        print(f"{mode}: threshold {thr} (fitted on tune), {ms:.1f} ms a field")
        print("tune\n" + format_scores(per_tune) + "\nfit\n" + format_scores(per_fit))
        report[mode] = {
            "min_score": thr,
            "ms_per_field": round(ms, 1),
            "tune": {g: s.to_dict() for g, s in per_tune.items()},
            "fit": {g: s.to_dict() for g, s in per_fit.items()},
        }
        if not flips:
            plain = results
        else:
            at = evaluate_fields(plain["fit"], fit, min_score=thr)
            report[mode]["plain_fit_at_this_threshold"] = {g: s.to_dict() for g, s in at.items()}
            print(f"plain view at {thr}, fit\n" + format_scores(at))
    thr = report["plain"]["min_score"]
    report["plain"]["misses"] = missed = misses(plain["fit"] + plain["tune"], fit + tune, thr)
    border = [m for m in missed if m["at_border"]]
    print(
        f"plain view at {thr}: {len(missed)} annotated cells missed on the train split, "
        f"{len(border)} of them cut by the field's border"
    )
    for m in missed:
        print(f"  {m}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

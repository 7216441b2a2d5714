"""Detection scores: matching found boxes to annotated ones, recall / precision / F1, count error.

A found box is a true positive when it overlaps a not yet matched annotated box with IoU at
least ``iou``; found boxes are matched best score first, each to the free annotated box it
overlaps most (COCO's greedy rule; PASCAL VOC would not fall back to the next-best free box).
Everything else found is a false positive; every annotated box left over is a false negative.
Pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from marrowscope.utils.boxes import as_boxes, box_iou

__all__ = [
    "DetectionCounts",
    "DetectionScores",
    "match_boxes",
    "score_detections",
    "scores_by_group",
]


@dataclass(frozen=True)
class DetectionCounts:
    """True positives, false positives and false negatives of one field (or a sum of fields)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def match_boxes(
    found: object, scores: object, truth: object, *, iou: float = 0.5
) -> tuple[DetectionCounts, np.ndarray]:
    """Match one field's found boxes to its annotated boxes (greedy, best score first).

    Args:
        found: ``(N, 4)`` found boxes.
        scores: ``(N,)`` their scores.
        truth: ``(M, 4)`` annotated boxes.
        iou: the overlap a match needs.

    Returns:
        ``(counts, matched)``: the counts, and for each found box the index of its annotated
        box (``-1``: false positive).
    """
    f, t = as_boxes(found), as_boxes(truth)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(f):
        raise ValueError(f"{len(f)} boxes but {len(s)} scores")
    matched = np.full(len(f), -1, np.int64)
    if len(f) and len(t):
        overlaps = box_iou(f, t)
        free = np.ones(len(t), bool)
        for i in np.argsort(-s, kind="stable"):
            cand = np.where(free, overlaps[i], -1.0)
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                matched[i] = j
                free[j] = False
    tp = int((matched >= 0).sum())
    return DetectionCounts(tp=tp, fp=len(f) - tp, fn=len(t) - tp), matched


@dataclass(frozen=True)
class DetectionScores:
    """Recall, precision, F1 and count error over a set of fields.

    Attributes:
        fields: fields scored.
        counts: summed true/false positives and false negatives.
        count_error: mean over fields of ``|cells found - cells annotated|``.
        exact_count: share of fields whose count is exactly right.
    """

    fields: int
    counts: DetectionCounts
    count_error: float
    exact_count: float

    @property
    def recall(self) -> float:
        c = self.counts
        return c.tp / (c.tp + c.fn) if c.tp + c.fn else 1.0

    @property
    def precision(self) -> float:
        c = self.counts
        return c.tp / (c.tp + c.fp) if c.tp + c.fp else 1.0

    @property
    def f1(self) -> float:
        r, p = self.recall, self.precision
        return 2 * r * p / (r + p) if r + p else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """The numbers as a JSON-ready dict."""
        c = self.counts
        return {
            "fields": self.fields,
            "recall": self.recall,
            "precision": self.precision,
            "f1": self.f1,
            "tp": c.tp,
            "fp": c.fp,
            "fn": c.fn,
            "count_error": self.count_error,
            "exact_count": self.exact_count,
        }


def score_detections(
    results: Iterable[tuple[object, object, object]], *, iou: float = 0.5
) -> DetectionScores:
    """Score ``(found boxes, scores, annotated boxes)`` per field."""
    total = DetectionCounts()
    errors: list[int] = []
    for found, scores, truth in results:
        counts, _ = match_boxes(found, scores, truth, iou=iou)
        total = total + counts
        errors.append(abs(len(as_boxes(found)) - len(as_boxes(truth))))
    n = len(errors)
    return DetectionScores(
        fields=n,
        counts=total,
        count_error=float(np.mean(errors)) if n else 0.0,
        exact_count=float(np.mean([e == 0 for e in errors])) if n else 1.0,
    )


def scores_by_group(
    results: Iterable[tuple[str, object, object, object]], *, iou: float = 0.5
) -> Mapping[str, DetectionScores]:
    """:func:`score_detections` per group (``(group, found, scores, truth)`` per field),
    groups in sorted order."""
    groups: dict[str, list[tuple[object, object, object]]] = {}
    for g, found, scores, truth in results:
        groups.setdefault(g, []).append((found, scores, truth))
    return {g: score_detections(groups[g], iou=iou) for g in sorted(groups)}

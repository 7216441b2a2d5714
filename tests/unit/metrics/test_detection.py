"""Detection scores: greedy matching at an IoU, recall / precision / F1, count error."""

from __future__ import annotations

import numpy as np

from marrowscope.metrics.detection import (
    DetectionCounts,
    match_boxes,
    score_detections,
    scores_by_group,
)

TRUTH = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], float)


def test_best_score_matches_first_and_duplicates_are_false_positives() -> None:
    found = [[0, 0, 10, 10], [0.5, 0, 10.5, 10], [20, 0, 30, 10]]
    counts, matched = match_boxes(found, [0.5, 0.9, 0.8], TRUTH, iou=0.5)
    assert counts == DetectionCounts(tp=2, fp=1, fn=0)
    assert matched.tolist() == [-1, 0, 1]  # the higher-scoring duplicate took truth 0


def test_a_box_below_the_iou_is_a_miss_and_a_false_positive() -> None:
    found = [[0, 0, 10, 4]]  # IoU 0.4 with truth 0
    counts, _ = match_boxes(found, [1.0], TRUTH, iou=0.5)
    assert counts == DetectionCounts(tp=0, fp=1, fn=2)
    counts, _ = match_boxes(found, [1.0], TRUTH, iou=0.3)
    assert counts == DetectionCounts(tp=1, fp=0, fn=1)


def test_scores_and_count_error_over_fields() -> None:
    s = score_detections(
        [
            (TRUTH, [0.9, 0.8], TRUTH),  # perfect, count right
            ([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], TRUTH[:1]),  # one false positive
            (np.zeros((0, 4)), [], TRUTH[:1]),  # one miss
            (np.zeros((0, 4)), [], np.zeros((0, 4))),  # empty field, nothing found
        ]
    )
    assert s.fields == 4 and s.counts == DetectionCounts(tp=3, fp=1, fn=1)
    assert s.recall == 0.75 and s.precision == 0.75 and s.f1 == 0.75
    assert s.count_error == (0 + 1 + 1 + 0) / 4 and s.exact_count == 0.5


def test_scores_by_group_sorted() -> None:
    per = scores_by_group([("b", TRUTH, [1, 1], TRUTH), ("a", [], [], TRUTH)])
    assert list(per) == ["a", "b"]
    assert per["a"].recall == 0.0 and per["a"].precision == 1.0 and per["b"].f1 == 1.0

"""Box geometry: IoU and greedy non-maximum suppression."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope.utils.boxes import as_boxes, box_iou, clip_boxes, nms


def test_iou_of_known_boxes() -> None:
    a = [[0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]]
    iou = box_iou(a, b)
    assert iou.shape == (1, 4)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 25 / 100])


def test_iou_of_empty_sets_and_degenerate_boxes() -> None:
    assert box_iou([], [[0, 0, 1, 1]]).shape == (0, 1)
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 0.0  # no area: no overlap, no NaN


def test_nms_keeps_the_best_of_each_cluster_best_first() -> None:
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]]
    scores = [0.6, 0.9, 0.5, 0.3]
    keep = nms(boxes, scores, iou=0.5)
    assert keep.tolist() == [1, 2]
    # a looser rule keeps overlapping boxes
    assert nms(boxes, scores, iou=0.99).tolist() == [1, 0, 2, 3]


def test_as_boxes_and_clip() -> None:
    assert as_boxes([1, 2, 3, 4]).shape == (1, 4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        as_boxes([[1, 2, 3]])
    np.testing.assert_array_equal(clip_boxes([[-5, -1, 20, 8]], 10, 6), [[0, 0, 10, 6]])

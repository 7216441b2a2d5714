"""Axis-aligned boxes as ``(N, 4)`` float arrays of ``x_min, y_min, x_max, y_max`` (pixels).

The one place for box geometry: pairwise IoU and greedy non-maximum suppression, used by the
field detectors (:mod:`marrowscope.preprocess.fields`, :mod:`marrowscope.models.detector`) and by
the detection metrics (:mod:`marrowscope.metrics.detection`). Pure numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_boxes", "box_iou", "clip_boxes", "nms"]


def as_boxes(boxes: object) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array (an empty input gives ``(0, 4)``).

    Raises:
        ValueError: not reshapeable to ``(N, 4)``.
    """
    a = np.asarray(boxes, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4), np.float64)
    if a.ndim == 1 and a.shape[0] == 4:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (N, 4) (x_min, y_min, x_max, y_max), got {a.shape}"
        )
    return a


def box_iou(a: object, b: object) -> np.ndarray:
    """Pairwise intersection over union ``(len(a), len(b))`` of two box sets."""
    a, b = as_boxes(a), as_boxes(b)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: object, scores: object, iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    A box is dropped when it overlaps an already kept, higher-scoring box by more than ``iou``.
    Ties in score keep the lower index first (stable).
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(b), bool)
    overlaps = box_iou(b, b) if len(b) else np.zeros((0, 0))
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= overlaps[i] > iou
    return np.asarray(keep, dtype=np.int64)


def clip_boxes(boxes: object, width: int, height: int) -> np.ndarray:
    """Boxes clipped to the image ``[0, width] x [0, height]``."""
    b = as_boxes(boxes).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    return b

"""The real field-dev fields shipped for the tests (tests/data/fields, see its README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marrowscope.data.fields import field_origin, read_yolo_labels
from marrowscope.utils.image import read_image

FIELDS_DIR = Path(__file__).resolve().parent / "data" / "fields"
EMPTY = FIELDS_DIR / "empty-315edff7-left.jpg"
"""A field with red cells only: the left part of :data:`EMPTY_PARENT`."""
EMPTY_PARENT = FIELDS_DIR / "315edff7-47bc-5c8f-a6d4-8008b4982dca.jpg"
ANNOTATED = sorted(p for p in FIELDS_DIR.glob("*.jpg") if p != EMPTY)
BCCD = FIELDS_DIR / "0fd98bba-de2a-568e-a6a9-e94cb9a5675a.jpg"
"""A 640 x 480 BCCD field with one white cell near the centre."""
PBC = FIELDS_DIR / "0479948c-7e6f-5e76-bf6c-ab89b843da9b.jpg"
"""A 360 x 363 PBC field (one white cell centred, at pbc6's own scale)."""
LARGE_PALE_WBC = [
    FIELDS_DIR / "ruler" / "0c2e7e09-4de1-5aeb-8ba9-f9dfe73c5f41.jpg",
    FIELDS_DIR / "ruler" / "ba6e9a8a-5855-523e-a7e8-c19dca591c29.jpg",
]
"""Two train-split fields (Raabin-WBC, PBC) with a large white cell whose pale cytoplasm the ruler
once took for the largest red cell (it read 2.5x the annotated red-cell size in both)."""


def field(path: Path) -> tuple[np.ndarray, dict[int, np.ndarray], str]:
    """``(rgb, boxes per class, origin)`` of a shipped test field."""
    rgb = read_image(path)
    h, w = rgb.shape[:2]
    boxes = read_yolo_labels(path.with_suffix(".txt"), w, h)
    origin = "BCCD (crop)" if path == EMPTY else field_origin(w, h)
    return rgb, boxes, origin

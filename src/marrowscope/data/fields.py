"""Annotated fields of view (YOLO layout): the records detection is trained and measured on.

A field set is a folder with ``MANIFEST.csv`` (columns ``image``, ``labels``, ``split``, ``width``,
``height`` at least) and, per image, a YOLO label file: one line per box, ``CLASS XC YC W H``
relative to the image size, class 0 = white cell (the other classes, red cells and platelets,
are read too). ``../shared/data/field-dev`` is one (see its README).

The origin of a field-dev image (Raabin-WBC, PBC, BCD, BCCD: four microscopes, four stains) is
told by its size, as the dataset's README documents; detection is reported per origin.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marrowscope.utils.boxes import box_iou

__all__ = [
    "FIELD_DEV_ORIGINS",
    "FieldDataError",
    "FieldRecord",
    "annotated_rbc_px",
    "duplicate_boxes",
    "field_origin",
    "read_field_manifest",
    "read_yolo_labels",
    "touches_border",
]

FIELD_DEV_ORIGINS = {
    (575, 575): "Raabin-WBC",
    (360, 363): "PBC",
    (366, 369): "PBC",
    (416, 416): "BCD",
    (640, 480): "BCCD",
}
"""field-dev image size -> origin of the field (from the dataset's README)."""

WBC, RBC, PLATELET = 0, 1, 2


class FieldDataError(ValueError):
    """A field manifest or label file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class FieldRecord:
    """One annotated field.

    Attributes:
        path: the image file.
        split: ``train`` / ``val`` / ... as in the manifest.
        origin: where the field comes from (see :func:`field_origin`).
        width, height: the image size.
        wbc: ``(N, 4)`` white-cell boxes in pixels (``x_min, y_min, x_max, y_max``).
        rbc: ``(M, 4)`` red-cell boxes.
        platelets: ``(K, 4)`` platelet boxes.
    """

    path: str
    split: str
    origin: str
    width: int
    height: int
    wbc: np.ndarray = field(repr=False)
    rbc: np.ndarray = field(repr=False)
    platelets: np.ndarray = field(repr=False)


def touches_border(boxes: np.ndarray, width: int, height: int, margin: float = 2.0) -> np.ndarray:
    """Per box, whether it reaches within ``margin`` pixels of the image's border (a cell the
    field's edge cuts: its box is the visible part only)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (
        (b[:, 0] <= margin)
        | (b[:, 1] <= margin)
        | (b[:, 2] >= width - margin)
        | (b[:, 3] >= height - margin)
    )


def duplicate_boxes(boxes: np.ndarray, iou: float = 0.5) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of boxes that overlap by more than ``iou``: in annotated white
    cells, one cell boxed twice (cells in a smear touch, they do not overlap by half; field-dev's
    BCD labels hold such pairs, checked by eye). A detector that boxes the cell once (its
    suppression removes a second box at IoU 0.4) matches one of the pair at IoU 0.5, so each pair
    caps its recall."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) < 2:
        return []
    m = np.triu(box_iou(b, b), k=1)
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(m > iou), strict=True)]


def annotated_rbc_px(
    rbc: np.ndarray, width: int, height: int, *, min_cells: int = 1
) -> float | None:
    """The annotated red-cell size of a field: the median longer box side of its red cells not
    cut by the border, or ``None`` with fewer than ``min_cells`` of them."""
    b = np.asarray(rbc, np.float64).reshape(-1, 4)
    b = b[~touches_border(b, width, height)]
    if len(b) < min_cells:
        return None
    return float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))


def field_origin(width: int, height: int) -> str:
    """The field-dev origin of an image of this size (``"other"`` when unknown)."""
    return FIELD_DEV_ORIGINS.get((int(width), int(height)), "other")


def read_yolo_labels(path: str | Path, width: int, height: int) -> dict[int, np.ndarray]:
    """Boxes per class (pixels) from a YOLO label file.

    Raises:
        FieldDataError: a line that is not ``CLASS XC YC W H``.
    """
    boxes: dict[int, list[list[float]]] = {WBC: [], RBC: [], PLATELET: []}
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cls = int(parts[0])
            xc, yc, bw, bh = (float(v) for v in parts[1:5])
        except (ValueError, IndexError):
            raise FieldDataError(
                f"{path}:{n}: expected 'CLASS XC YC W H' (YOLO, relative), got {line!r}"
            ) from None
        boxes.setdefault(cls, []).append(
            [
                (xc - bw / 2) * width,
                (yc - bh / 2) * height,
                (xc + bw / 2) * width,
                (yc + bh / 2) * height,
            ]
        )
    return {c: np.asarray(b, np.float64).reshape(-1, 4) for c, b in boxes.items()}


def read_field_manifest(root: str | Path, split: str | None = None) -> list[FieldRecord]:
    """The annotated fields of a field set, in manifest order (one split, or all).

    Raises:
        FieldDataError: no manifest, or a manifest without the needed columns.
    """
    root = Path(root)
    manifest = root / "MANIFEST.csv"
    if not manifest.is_file():
        raise FieldDataError(
            f"{manifest}: no field manifest; pass the folder of a field set such as field-dev"
        )
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"image", "labels", "split", "width", "height"}
    if rows and not need <= set(rows[0]):
        raise FieldDataError(f"{manifest}: needs the columns {', '.join(sorted(need))}")
    out = []
    for r in rows:
        if split is not None and r["split"] != split:
            continue
        w, h = int(r["width"]), int(r["height"])
        boxes = read_yolo_labels(root / r["labels"], w, h)
        out.append(
            FieldRecord(
                path=str(root / r["image"]),
                split=r["split"],
                origin=field_origin(w, h),
                width=w,
                height=h,
                wbc=boxes[WBC],
                rbc=boxes[RBC],
                platelets=boxes[PLATELET],
            )
        )
    return out

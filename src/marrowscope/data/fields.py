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

import cv2
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
    "touching_pair",
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


TOUCHING_PAD = 0.2
"""Surround taken with the cell by :func:`touching_pair`, as a fraction of its longer side (the
blend needs some)."""


TOUCHING_COPIES = ("mirror", "shift", "rotate")
"""How :func:`touching_pair` makes the second cell: the cell mirrored left to right, the same cell
moved, or the cell turned by 180 degrees."""


def touching_pair(
    rgb: np.ndarray, box: np.ndarray, gap: float, copy: str = "mirror"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rgb`` widened to the right, with a copy of the cell in ``box`` to its right ``gap`` of its
    width away; returns the new field, the cell's box in it and the copy's box.

    A synthetic pair of touching white cells, the test of how close two cells may be before a
    detector joins or loses one (``benchmarks/touching_cells.py``, docs/fields.md): ``gap`` 0 makes
    the two boxes touch, a negative gap makes them overlap by that fraction of the cell's width.
    The copy is blended in with OpenCV's Poisson cloning (``cv2.seamlessClone``, an elliptical mask
    around the cell), so it takes the field's colours at its edge and shows no pasted rectangle.

    The fields of field-dev are cut close around their cells (a 300 px cell in a 575 px field),
    so the copy would rarely fit: the field is first surrounded by its background colour (the
    median outside the cell; room for a copy a whole cell width away, the same for every gap,
    so every gap is scored on the same fields and the same canvas).

    ``copy`` (:data:`TOUCHING_COPIES`): a mirrored copy makes the pair symmetric about the gap,
    which is also what a detector trained with mirrored margins (``pad: reflect``) learns to box
    as *one* cell cut by the field's edge; ``shift`` and ``rotate`` make pairs without that
    symmetry."""
    if copy not in TOUCHING_COPIES:
        raise ValueError(f"copy {copy!r}: one of {', '.join(TOUCHING_COPIES)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    w = x1 - x0
    pad = int(round(TOUCHING_PAD * max(w, y1 - y0)))
    outside = np.ones(rgb.shape[:2], bool)
    outside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = False
    fill = [int(v) for v in np.median(rgb[outside], axis=0)]
    edge = pad + 2
    room = int(np.ceil(2 * w)) + 2 * pad + 4
    canvas = cv2.copyMakeBorder(rgb, edge, edge, edge, edge + room, cv2.BORDER_CONSTANT, value=fill)
    cell = np.array([x0 + edge, y0 + edge, x1 + edge, y1 + edge])
    px0, py0 = int(np.floor(cell[0])) - pad, int(np.floor(cell[1])) - pad
    px1, py1 = int(np.ceil(cell[2])) + pad, int(np.ceil(cell[3])) + pad
    if (px1 - px0) % 2:  # an odd patch has no pixel at its centre: keep the copy's box exact
        px1 += 1
    if (py1 - py0) % 2:
        py1 += 1
    patch = canvas[py0:py1, px0:px1]
    patch = np.ascontiguousarray(
        {"mirror": patch[:, ::-1], "shift": patch, "rotate": patch[::-1, ::-1]}[copy]
    )
    ph, pw = patch.shape[:2]
    mask = np.zeros((ph, pw), np.uint8)
    axes = (int(round(w / 2 + pad / 2)), int(round((y1 - y0) / 2 + pad / 2)))
    cv2.ellipse(mask, (pw // 2, ph // 2), axes, 0, 0, 360, 255, -1)
    shift = w * (1 + gap)
    centre = (int(round((px0 + px1) / 2 + shift)), (py0 + py1) // 2)
    out = cv2.seamlessClone(patch, canvas, mask, centre, cv2.NORMAL_CLONE)
    # the cell's box inside its patch, turned as the patch was, then placed with it
    bx0, by0, bx1, by1 = cell[0] - px0, cell[1] - py0, cell[2] - px0, cell[3] - py0
    if copy in ("mirror", "rotate"):
        bx0, bx1 = pw - bx1, pw - bx0
    if copy == "rotate":
        by0, by1 = ph - by1, ph - by0
    second = np.array([bx0 + px0 + shift, by0 + py0, bx1 + px0 + shift, by1 + py0])
    return out, cell, second

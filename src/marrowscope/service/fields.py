"""Whole fields of view inside the app: find the white cells of a stored field and cut each one
out as the classifier's training crops were cut (:mod:`marrowscope.inference.fields`, the path
``marrowscope count --fields`` takes), or cut one around a point a reviewer clicked.

Pure image work, no database: the background worker (:mod:`.worker`) and the add-a-cell routes
call these outside any transaction, then record the result. A cut cell is a lossless PNG, stored
in the image store like an uploaded crop, so the classifier, the gallery and Grad-CAM treat it
as any other cell.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from marrowscope.inference.fields import CropSpec, FieldDetector

__all__ = [
    "ADDED_CELL_UM",
    "CutCell",
    "FieldFindings",
    "cut_cell_at",
    "find_cells",
    "png_bytes",
]

ADDED_CELL_UM = 14.0
"""Side (micrometres) of the box drawn around a cell a reviewer added by clicking on its
centre: about one neutrophil or lymphocyte across (the crop itself is the classifier's)."""


@dataclass(frozen=True)
class CutCell:
    """One cell cut from a field.

    Attributes:
        png: the crop, PNG-encoded (RGB, the classifier's crop side).
        box: ``(x_min, y_min, x_max, y_max)`` in field pixels.
        score: the detection score (``None`` for a cell a reviewer added).
    """

    png: bytes
    box: tuple[float, float, float, float]
    score: float | None


@dataclass(frozen=True)
class FieldFindings:
    """What the detector found in one field.

    Attributes:
        cells: the cut cells, best detection first.
        um_per_px: the field's scale.
        scale_source: where it came from (``ruler``, ``given``, ``default``).
        detector: the detector's name.
        warnings: what the reviewer should know (grayscale field, assumed scale ...).
    """

    cells: tuple[CutCell, ...]
    um_per_px: float
    scale_source: str
    detector: str
    warnings: tuple[str, ...]


def png_bytes(rgb: np.ndarray) -> bytes:
    """RGB uint8 (HWC) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def find_cells(path: Path, detector: FieldDetector, spec: CropSpec) -> FieldFindings:
    """Detect the white cells of the field stored at ``path`` and cut each one out.

    Raises:
        FieldError: the field cannot be used (the message names why and the fix).
    """
    from marrowscope.inference.fields import cell_crop, load_field

    rgb = load_field(path)
    found = detector.detect(rgb)
    cells = tuple(
        CutCell(
            png=png_bytes(cell_crop(rgb, box, found.scale, spec)),
            box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            score=float(score),
        )
        for box, score in zip(found.boxes, found.scores, strict=True)
    )
    return FieldFindings(
        cells=cells,
        um_per_px=float(found.scale.um_per_px),
        scale_source=str(found.scale.source),
        detector=str(found.method),
        warnings=tuple(found.warnings),
    )


def cut_cell_at(
    path: Path, x: float, y: float, *, um_per_px: float, scale_source: str, spec: CropSpec
) -> CutCell:
    """The crop of a cell centred on the point ``(x, y)`` (field pixels) of the stored field,
    at the field's recorded scale, and a box of :data:`ADDED_CELL_UM` around the point.

    Raises:
        FieldError: the field cannot be read, or the point lies outside it.
    """
    from marrowscope.inference.fields import FieldError, cell_crop, load_field
    from marrowscope.preprocess.fields import FieldScale

    rgb = load_field(path)
    h, w = rgb.shape[:2]
    if not (0 <= x < w and 0 <= y < h):
        raise FieldError(
            f"the point ({x:g}, {y:g}) is outside the {w}x{h} field; click on the cell itself"
        )
    half = ADDED_CELL_UM / um_per_px / 2
    box = (max(0.0, x - half), max(0.0, y - half), min(float(w), x + half), min(float(h), y + half))
    scale = FieldScale(um_per_px=um_per_px, source=scale_source)
    return CutCell(png=png_bytes(cell_crop(rgb, box, scale, spec)), box=box, score=None)

"""The synthetic touching pairs of ``data.fields.touching_pair`` (benchmarks/touching_cells.py) on
real fields of tests/data/fields."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from field_samples import BCCD, PBC, field

from marrowscope.data.fields import TOUCHING_COPIES, touching_pair


def _stain(rgb: np.ndarray) -> np.ndarray:
    """The dark (stained) pixels of a cell's box, by Otsu's threshold on its gray levels."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    _, mask = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return mask.astype(bool)


@pytest.mark.parametrize("path", [BCCD, PBC], ids=["BCCD", "PBC"])
@pytest.mark.parametrize("copy", TOUCHING_COPIES)
def test_touching_pair_boxes_the_copy_it_made(path: Path, copy: str) -> None:
    """The second box holds the copy: the stained shape inside it is the first cell's, mirrored,
    moved or turned (Poisson cloning shifts colours, not shapes; 10 px off, the overlap of the
    two shapes falls below 0.8), and the two boxes overlap by the fraction asked."""
    rgb, boxes, _ = field(path)
    box = boxes[0][0]
    pair, cell, second = touching_pair(rgb, box, -0.1, copy)
    assert pair.shape[0] > rgb.shape[0] and pair.shape[1] > rgb.shape[1]
    w, h = cell[2] - cell[0], cell[3] - cell[1]
    assert second[0] - cell[2] == pytest.approx(-0.1 * w, abs=2.5)
    assert (second[2] - second[0], second[3] - second[1]) == pytest.approx((w, h))
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    original = rgb[y0:y1, x0:x1]
    want = _stain(
        {"mirror": original[:, ::-1], "shift": original, "rotate": original[::-1, ::-1]}[copy]
    )
    sx, sy = int(round(second[0])), int(round(second[1]))
    got = _stain(pair[sy : sy + want.shape[0], sx : sx + want.shape[1]])
    assert (want & got).sum() / (want | got).sum() > 0.9
    with pytest.raises(ValueError, match="copy 'flip': one of mirror, shift, rotate"):
        touching_pair(rgb, box, 0.0, "flip")

"""Whole microscope fields: the red-cell ruler, rescaling, crops at a model's scale, tiles, and the
classical stain-based white-cell detector. Pure numpy/OpenCV (no torch).

Array contract: every image is RGB, HWC, uint8; boxes are ``(N, 4)`` float arrays of
``x_min, y_min, x_max, y_max`` in pixels of the image they were found in.

**The ruler** (:func:`estimate_scale`). Red cells are about 7.5 um across and are in nearly every
blood or marrow field, so their size in pixels gives the field's magnification. The cells are
separated from the bright background by Otsu's threshold on the green channel (computed without
the stained nuclei, so a big dark nucleus does not take the threshold for itself), holes (the red
cells' pale centres) are filled, and the distance transform's maxima give the radius of the
largest disc inside each cell; overlapping maxima are suppressed greedily (largest first) and
maxima that touch the image border (cut cells), sit on nuclear stain or hold more than a few
percent of nucleus pixels (a white cell's disc) are dropped. The red-cell diameter is twice the
area-weighted median radius of the maxima above 40% of the largest, times :data:`RULER_GAIN`,
which maps the inscribed-disc diameter onto the annotated red-cell box size (fitted on
field-dev's train split, see ``docs/fields.md``).

**The classical detector** (:func:`detect_classical`): nuclear-stain thresholding (the Lab
``a - b`` "purple" channel), morphology, a distance-transform watershed that splits touching
nuclei of different cells, and a box grown from the nucleus by a fitted factor. It is the
baseline the learned detector is measured against, and a fallback that needs no model file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from marrowscope.preprocess.ops import check_image
from marrowscope.utils.boxes import as_boxes, clip_boxes, nms

__all__ = [
    "CROP_FILL",
    "CROP_FILL_FEW_RBC",
    "DEFAULT_UM_PER_PX",
    "MAX_FIELD_PIXELS",
    "RBC_DIAMETER_UM",
    "RULER_GAIN",
    "WORK_UM_PER_PX",
    "ClassicalParams",
    "FieldScale",
    "Tile",
    "crop_at_scale",
    "detect_classical",
    "estimate_scale",
    "fill_holes",
    "looks_like_crop",
    "looks_like_field",
    "plan_tiles",
    "rescale",
    "stain_map",
]

RBC_DIAMETER_UM = 7.5
"""Diameter of a normal red cell on a dried, stained smear (micrometres): the ruler's unit."""

RULER_GAIN = 1.24
"""Annotated red-cell box side / (2 x inscribed-disc radius) on field-dev's train split
(the median over its 1,000 fields; measured by ``scripts/train_detector.py --fit-ruler``)."""

WORK_UM_PER_PX = RBC_DIAMETER_UM / 32.0
"""The working scale of the detectors: a red cell is 32 pixels across (0.234 um/px)."""

DEFAULT_UM_PER_PX = 0.075
"""Scale assumed when a field has no measurable red cell and none is given (100x oil on a
typical camera); the field's record says so."""

MAX_FIELD_PIXELS = 50_000_000
"""Largest field accepted (width x height); larger ones are refused with this limit named."""

UM_PER_PX_RANGE = (0.01, 2.0)
"""Scales accepted from the user."""

MIN_RBC_RADIUS_PX = 8.0
"""Smallest red-cell radius the ruler measures (pixels of the field): a red cell under 16 px
across (coarser than about 0.4 um/px) is too small to measure, and the specks of a single-cell
crop's background must not pass for red cells."""

_PURPLE = 35
"""Lab ``a - b`` above which a pixel counts as nuclear stain for the ruler's background fit."""

_NUCLEUS = 70
"""Lab ``a - b`` above which a pixel counts as nucleus inside a red-cell disc (at the background
fit's 35 the lilac red cells of some Raabin-WBC fields would count as nucleus and go unmeasured)."""

_NUCLEUS_SHARE = 0.03
"""Largest share of nucleus pixels a red-cell disc may hold (chosen with :data:`_NUCLEUS` on
field-dev's train split: fields whose measured red-cell size is off by more than 1.6x from the
annotated one, 18 -> 7 of 975)."""


@dataclass(frozen=True)
class FieldScale:
    """The magnification used for one field.

    Attributes:
        um_per_px: micrometres per pixel of the field as given.
        source: ``"given"`` (the user's value), ``"ruler"`` (measured on the red cells),
            ``"model"`` (the classifier's training scale, assumed) or ``"default"``
            (:data:`DEFAULT_UM_PER_PX`: nothing measurable and nothing given).
        red_cells: red cells the ruler measured (0 unless ``source == "ruler"``).
        rbc_px: the red-cell diameter in pixels the ruler found (``None`` unless measured).
    """

    um_per_px: float
    source: str
    red_cells: int = 0
    rbc_px: float | None = None

    def describe(self) -> str:
        """One phrase for logs and tables: ``0.071 um/px (ruler, 23 red cells)``."""
        extra = {
            "ruler": f"ruler, {self.red_cells} red cells",
            "given": "given",
            "model": "the model's training scale",
            "default": "default: no red cell measurable",
        }.get(self.source, self.source)
        return f"{self.um_per_px:.4f} um/px ({extra})"


# ------------------------------------------------------------------------------------- stains


def stain_map(rgb: np.ndarray) -> np.ndarray:
    """Nuclear-stain strength: OpenCV Lab ``a - b`` clipped to ``[0, 255]`` (uint8, HxW).

    Romanowsky-stained nuclei (purple to blue) are red-shifted in ``a`` and blue-shifted in
    ``b``; red cells and background are near neutral (about 0-20), nuclei about 60-100.
    """
    lab = cv2.cvtColor(check_image(rgb, "field"), cv2.COLOR_RGB2LAB)
    a = lab[:, :, 1].astype(np.int16)
    b = lab[:, :, 2].astype(np.int16)
    return np.clip(a - b, 0, 255).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """A uint8 0/1 mask with every hole (background not connected to the border) filled."""
    m = (mask > 0).astype(np.uint8)
    h, w = m.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = m
    flood = pad.copy()
    ff = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (m | holes).astype(np.uint8)


def _cell_mask(rgb: np.ndarray, stain: np.ndarray) -> np.ndarray:
    """Cells (red and white) vs background: Otsu on the green channel fitted without nuclei."""
    g = cv2.GaussianBlur(rgb[:, :, 1], (5, 5), 0)
    purple = stain > _PURPLE
    values = g[~purple]
    if values.size < 100:
        values = g.ravel()
    t, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = ((g < t) | purple).astype(np.uint8)
    fg = fill_holes(fg)
    return cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def _disc_share(mask: np.ndarray, y: float, x: float, radius: float) -> float:
    """Share of the pixels of the disc ``(y, x, radius)`` that are set in ``mask``."""
    h, w = mask.shape
    y0, y1 = max(0, int(y - radius)), min(h, int(y + radius) + 1)
    x0, x1 = max(0, int(x - radius)), min(w, int(x + radius) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    disc = (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    return float(mask[y0:y1, x0:x1][disc].mean()) if disc.any() else 0.0


def _disc_maxima(mask: np.ndarray, min_radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres ``(ys, xs)`` and radii of non-overlapping inscribed discs (largest first)."""
    dt = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    peaks = (dt >= cv2.dilate(dt, np.ones((5, 5), np.uint8))) & (dt > min_radius)
    ys, xs = (v.astype(np.float64) for v in np.nonzero(peaks))
    r = dt[peaks].astype(np.float64)
    order = np.argsort(-r, kind="stable")
    ys, xs, r = ys[order], xs[order], r[order]
    keep = np.zeros(len(r), bool)
    free = np.ones(len(r), bool)
    for i in range(len(r)):
        if not free[i]:
            continue
        keep[i] = True
        free &= (ys - ys[i]) ** 2 + (xs - xs[i]) ** 2 >= r[i] ** 2
    return ys[keep], xs[keep], r[keep]


def estimate_scale(rgb: np.ndarray, *, min_cells: int = 1) -> FieldScale | None:
    """Measure the field's magnification on its red cells (the ruler; see the module docstring).

    Args:
        rgb: the field (RGB, HWC, uint8).
        min_cells: fewest red cells the estimate may rest on.

    Returns:
        The scale (``source="ruler"``), or ``None`` when fewer than ``min_cells`` red cells
        (discs of radius at least :data:`MIN_RBC_RADIUS_PX`, not cut by the border) are
        measurable.
    """
    check_image(rgb, "field")
    h, w = rgb.shape[:2]
    # measure on a copy halved (or more, for large fields) while red cells stay >= 40 px there
    shrink = min(0.5, math.sqrt(400_000 / (h * w))) if h * w > 100_000 else 1.0
    while True:
        small = rescale(rgb, shrink) if shrink < 1 else rgb
        found = _ruler(small, min_cells, max(3.0, MIN_RBC_RADIUS_PX * shrink))
        if found is None or shrink >= 1 or found[0] >= 40 * RULER_GAIN:
            break
        shrink = min(1.0, shrink * 2)
    if found is None:
        return None
    rbc_px = found[0] / shrink
    um = RBC_DIAMETER_UM / rbc_px
    return FieldScale(um_per_px=um, source="ruler", red_cells=found[1], rbc_px=rbc_px)


def _ruler(rgb: np.ndarray, min_cells: int, min_radius: float) -> tuple[float, int] | None:
    """``(red-cell diameter in px, cells measured)`` of one image, or ``None``."""
    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        return None
    stain = stain_map(rgb)
    ys, xs, r = _disc_maxima(_cell_mask(rgb, stain), min_radius=min_radius)
    inside = (xs - r > 1) & (ys - r > 1) & (xs + r < w - 1) & (ys + r < h - 1)
    local = cv2.blur(stain, (9, 9))  # red cells: no nuclear stain around the disc's centre
    red = inside & (local[ys.astype(np.intp), xs.astype(np.intp)] < _PURPLE)
    # ... nor anywhere in the disc: a white cell's pale cytoplasm beside its nucleus makes a
    # large disc whose centre is clear of the nucleus, and it outweighed the red cells
    nucleus = stain > _NUCLEUS
    for i in np.flatnonzero(red):
        red[i] = _disc_share(nucleus, ys[i], xs[i], r[i]) <= _NUCLEUS_SHARE
    if red.sum() < min_cells:
        return None
    radii = r[red]
    radii = radii[radii > 0.4 * radii.max()]
    if len(radii) < min_cells:
        return None
    order = np.argsort(radii)
    weights = np.cumsum(radii[order] ** 2)
    median = float(radii[order][np.searchsorted(weights, weights[-1] / 2)])
    return 2.0 * median * RULER_GAIN, int(len(radii))


# ------------------------------------------------------------------------------ rescale, crops


def rescale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """``rgb`` resized by ``factor`` (area interpolation when shrinking, linear when growing)."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return rgb
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def crop_at_scale(
    rgb: np.ndarray,
    center: tuple[float, float],
    *,
    um_per_px: float,
    crop_um: float,
    out_px: int,
) -> np.ndarray:
    """A square crop of ``crop_um`` micrometres centred on ``center``, resampled to ``out_px``.

    This is how a cell is cut from a field so that it looks like the crops a classifier was
    trained on: the same field of view in micrometres, at the same pixel size. Parts of the
    window outside the field are filled by mirroring the field at its border.

    Args:
        rgb: the field (RGB, HWC, uint8).
        center: ``(x, y)`` of the cell in field pixels.
        um_per_px: the field's scale.
        crop_um: side of the crop in micrometres (the classifier's training crop).
        out_px: side of the returned image in pixels.
    """
    check_image(rgb, "field")
    if um_per_px <= 0 or crop_um <= 0 or out_px < 1:
        raise ValueError(
            f"crop_at_scale needs positive scales and size, got um_per_px={um_per_px}, "
            f"crop_um={crop_um}, out_px={out_px}"
        )
    side = crop_um / um_per_px  # in field pixels
    cx, cy = center
    # affine map: output pixel (u, v) -> field (cx + (u + 0.5) * s - side / 2 - 0.5, ...)
    s = side / out_px
    m = np.array(
        [[s, 0.0, cx - side / 2 + 0.5 * s - 0.5], [0.0, s, cy - side / 2 + 0.5 * s - 0.5]],
        np.float64,
    )
    src = rgb
    if s > 1.5:  # shrinking: pre-blur by area resize so the warp does not alias
        k = 1.0 / s
        src = rescale(rgb, k)
        fy = src.shape[0] / rgb.shape[0]
        fx = src.shape[1] / rgb.shape[1]
        m = np.array(
            [
                [s * fx, 0.0, (cx - side / 2 + 0.5 * s) * fx - 0.5],
                [0.0, s * fy, (cy - side / 2 + 0.5 * s) * fy - 0.5],
            ],
            np.float64,
        )
    return cv2.warpAffine(
        src,
        m,
        (out_px, out_px),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


CROP_FILL = 0.63
"""Side of the centred cell's box (mean of width and height) as a share of the image's shorter
side at or above which an image is a single-cell crop whatever else it shows. No field of
field-dev (1,256) reaches it (largest 0.62); see ``docs/fields.md``, *Bad input*."""

CROP_FILL_FEW_RBC = 0.55
"""The same share for an image with at most :data:`CROP_FEW_RBC` red cells measured (or none
measurable): a crop of marrow shows few whole red cells, a blood field many."""

CROP_FEW_RBC = 2
"""Red cells measured by the ruler at or below which an image counts as showing few of them."""

CROP_MAX_OFFSET = 0.25
"""Largest distance of a crop's cell centre from the image centre (share of the shorter side)."""

FIELD_MIN_RBC = 3
"""Red cells an image must show (measured by the ruler) to be judged a whole field by
:func:`looks_like_field`."""

FIELD_MAX_SMALL_FILL = 0.25
"""A centred white cell whose box side is under this share of the shorter side is too small for
the cell of a crop (:func:`looks_like_field`)."""

FIELD_MIN_OFFSET = 0.2
"""A white cell this far from the image centre (share of the shorter side) or further is not the
centred cell of a crop."""


def _centre_box(boxes: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """``(offset, fill)`` of the box nearest the image centre: its centre's distance from the image
    centre and its side (mean of width and height), both as shares of the image's shorter side;
    ``None`` without a box."""
    b = as_boxes(boxes)
    if len(b) == 0:
        return None
    short = float(min(width, height))
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    offset = np.hypot(cx - width / 2, cy - height / 2) / short
    i = int(np.argmin(offset))
    side = ((b[i, 2] - b[i, 0]) + (b[i, 3] - b[i, 1])) / 2
    return float(offset[i]), float(side / short)


def looks_like_crop(
    boxes: np.ndarray, width: int, height: int, *, red_cells: int | None = None
) -> bool:
    """True when an image given as a field looks like a single-cell crop.

    The white cell nearest the image centre is judged; other boxes (neighbours cut by the crop's
    border, or whole neighbours, which marrow crops often show) are ignored. It is a crop when
    that cell is centred (within :data:`CROP_MAX_OFFSET`) and fills the frame: its box side at
    least :data:`CROP_FILL` of the shorter side, or :data:`CROP_FILL_FEW_RBC` when the ruler
    measured at most :data:`CROP_FEW_RBC` red cells (0: none measurable). Fitted on real Matek
    crops against the field-dev fields (``docs/fields.md``): with the shipped detectors silent
    on every val field and on 974-976 of 977 train fields of field-dev, it fires on a little over
    half of the Matek crops. PBC crops (a centred cell at about 38% of the frame with red cells
    around) are indistinguishable from PBC fields and are not flagged.

    Args:
        boxes: the white cells found in it.
        width, height: the image size.
        red_cells: red cells the ruler measured (0 when nothing was measurable); ``None`` when
            not measured (a scale given by the user): only the stricter fill applies.
    """
    found = _centre_box(boxes, width, height)
    if found is None:
        return False
    offset, fill = found
    if offset > CROP_MAX_OFFSET:
        return False
    few_rbc = red_cells is not None and red_cells <= CROP_FEW_RBC
    return fill >= (CROP_FILL_FEW_RBC if few_rbc else CROP_FILL)


def looks_like_field(boxes: np.ndarray, width: int, height: int, *, red_cells: int) -> bool:
    """True when an image given as a single-cell crop looks like a whole field of view.

    It is a field when the ruler measured at least :data:`FIELD_MIN_RBC` red cells and no white
    cell sits in the middle as a crop's does: none was found, the one nearest the centre is at
    least :data:`FIELD_MIN_OFFSET` away from it, or it is small for the frame (side below
    :data:`FIELD_MAX_SMALL_FILL` of the shorter side). Whole neighbours inside the frame do not
    count: marrow crops show them. On real images (``docs/fields.md``) it fires on 0.3-3.3% of
    Matek and PBC crops and on about 70% of the BCCD and BCD fields of field-dev; fields of PBC and Raabin-WBC (one centred
    white cell) look like crops to it.

    Args:
        boxes: the white cells found in it.
        width, height: the image size.
        red_cells: red cells the ruler measured (0: none, or the scale was not measured).
    """
    if red_cells < FIELD_MIN_RBC:
        return False
    found = _centre_box(boxes, width, height)
    if found is None:
        return True
    offset, fill = found
    return offset >= FIELD_MIN_OFFSET or fill < FIELD_MAX_SMALL_FILL


# ----------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Tile:
    """A window of a large image: ``x0, y0`` (top-left) and its ``width, height``."""

    x0: int
    y0: int
    width: int
    height: int


def plan_tiles(width: int, height: int, *, tile: int, overlap: int) -> list[Tile]:
    """Overlapping windows of at most ``tile`` pixels that cover the image.

    Neighbouring windows share ``overlap`` pixels, so a cell smaller than the overlap lies
    whole inside at least one window.
    """
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        step = tile - overlap
        k = math.ceil((n - tile) / step)
        return [round(i * (n - tile) / k) for i in range(k + 1)]

    return [
        Tile(x, y, min(tile, width - x), min(tile, height - y))
        for y in starts(height)
        for x in starts(width)
    ]


def iter_tiles(rgb: np.ndarray, *, tile: int, overlap: int) -> Iterator[tuple[Tile, np.ndarray]]:
    """The windows of :func:`plan_tiles` with their pixels (views, no copy)."""
    h, w = rgb.shape[:2]
    for t in plan_tiles(w, h, tile=tile, overlap=overlap):
        yield t, rgb[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width]


# ------------------------------------------------------------------------ classical detector


@dataclass(frozen=True)
class ClassicalParams:
    """Settings of :func:`detect_classical`, in micrometres so they hold at any magnification.

    The defaults were fitted on field-dev's train split (``scripts/train_detector.py
    --fit-classical``); see ``docs/fields.md``.

    Attributes:
        stain_threshold: Lab ``a - b`` above which a pixel is nuclear stain.
        min_nucleus_um2: smallest nucleus (after grouping lobes); platelets are smaller.
        lobe_gap_um: lobes of one nucleus closer than this are grouped.
        split_um: nuclei whose centres are at least this far apart are split by the watershed.
        grow: the cell box side is the nucleus box side times this factor ...
        min_cell_um: ... but at least this many micrometres.
    """

    stain_threshold: float = 55.0
    min_nucleus_um2: float = 12.0
    lobe_gap_um: float = 1.5
    split_um: float = 7.0
    grow: float = 1.15
    min_cell_um: float = 8.0


def detect_classical(
    rgb: np.ndarray, *, um_per_px: float, params: ClassicalParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """White cells by nuclear-stain thresholding + morphology + watershed.

    Args:
        rgb: the field (RGB, HWC, uint8).
        um_per_px: its scale.
        params: thresholds in micrometres (default :class:`ClassicalParams`).

    Returns:
        ``(boxes, scores)``: boxes in field pixels and scores in ``[0, 1]`` (the mean stain
        strength of the nucleus above the threshold, squashed), best first.
    """
    p = params or ClassicalParams()
    check_image(rgb, "field")
    h0, w0 = rgb.shape[:2]
    factor = um_per_px / WORK_UM_PER_PX
    img = rescale(rgb, factor)
    px = WORK_UM_PER_PX  # um per working pixel
    stain = cv2.GaussianBlur(stain_map(img), (5, 5), 0)
    stained = (stain > p.stain_threshold).astype(np.uint8)
    mask = cv2.morphologyEx(stained, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    gap = max(1, round(p.lobe_gap_um / px))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1))
    grouped = fill_holes(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, disc))
    min_area = p.min_nucleus_um2 / px**2
    n, labels, stats, _ = cv2.connectedComponentsWithStats(grouped)
    boxes: list[list[float]] = []
    scores: list[float] = []
    split_px = p.split_um / px
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, w, h = (int(v) for v in stats[i, :4])
        comp = (labels[y : y + h, x : x + w] == i).astype(np.uint8)
        for part in _split(comp, split_px, min_area):
            ys, xs = np.nonzero(part)
            if len(xs) == 0:
                continue
            nx0, nx1, ny0, ny1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            side = max(p.grow * max(nx1 - nx0, ny1 - ny0), p.min_cell_um / px)
            cx, cy = x + (nx0 + nx1) / 2, y + (ny0 + ny1) / 2
            strength = float(stain[y : y + h, x : x + w][part > 0].mean())
            boxes.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            scores.append(1.0 - math.exp(-max(0.0, strength - p.stain_threshold) / 20.0))
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0)
    b = clip_boxes(np.asarray(boxes) / factor, w0, h0)
    s = np.asarray(scores)
    keep = nms(b, s, 0.3)
    return b[keep], s[keep]


def _split(comp: np.ndarray, split_px: float, min_area: float) -> list[np.ndarray]:
    """Split a nucleus mask at the watershed between distance maxima ``split_px`` apart."""
    dt = cv2.distanceTransform(comp, cv2.DIST_L2, 5)
    ys, xs, r = _disc_maxima(comp, min_radius=1.0)
    if len(r) < 2:
        return [comp]
    # markers: maxima at least split_px from every stronger marker, and deep enough
    markers: list[tuple[int, int]] = []
    for y, x, rad in zip(ys, xs, r, strict=True):
        if rad < 0.25 * split_px:
            continue
        if all((y - my) ** 2 + (x - mx) ** 2 >= split_px**2 for my, mx in markers):
            markers.append((int(y), int(x)))
    if len(markers) < 2:
        return [comp]
    lab = np.zeros(comp.shape, np.int32)
    for k, (y, x) in enumerate(markers, start=1):
        lab[y, x] = k
    relief = cv2.cvtColor(
        (255 - np.clip(dt * 255.0 / max(float(dt.max()), 1e-6), 0, 255)).astype(np.uint8),
        cv2.COLOR_GRAY2BGR,
    )
    lab[comp == 0] = len(markers) + 1  # background marker
    cv2.watershed(relief, lab)
    parts = [((lab == k) & (comp > 0)).astype(np.uint8) for k in range(1, len(markers) + 1)]
    parts = [q for q in parts if q.sum() >= min_area]
    return parts or [comp]

"""Whole fields, pure part: the red-cell ruler, crops at a model's scale, tiles, the crop check
and the classical detector, on real field-dev fields (tests/data/fields)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from field_samples import ANNOTATED, EMPTY, EMPTY_PARENT, LARGE_PALE_WBC, field

from marrowscope.data.fields import annotated_rbc_px, duplicate_boxes, touches_border
from marrowscope.preprocess.fields import (
    RBC_DIAMETER_UM,
    crop_at_scale,
    detect_classical,
    estimate_scale,
    looks_like_crop,
    looks_like_field,
    plan_tiles,
    stain_map,
)
from marrowscope.utils.boxes import box_iou


@pytest.mark.parametrize("path", [*ANNOTATED, EMPTY], ids=lambda p: p.name[:8])
def test_the_ruler_measures_red_cells_like_the_annotators(path) -> None:
    rgb = field(path)[0]
    scale = estimate_scale(rgb)
    assert scale is not None and scale.source == "ruler" and scale.red_cells >= 1
    annotated, boxes, _ = field(EMPTY_PARENT if path == EMPTY else path)  # the crop has no labels
    truth = annotated_rbc_px(boxes[1], annotated.shape[1], annotated.shape[0])
    assert scale.rbc_px == pytest.approx(truth, rel=0.15)
    assert scale.um_per_px == pytest.approx(RBC_DIAMETER_UM / scale.rbc_px)


@pytest.mark.parametrize("path", LARGE_PALE_WBC, ids=lambda p: p.name[:8])
def test_the_ruler_does_not_take_a_white_cells_cytoplasm_for_a_red_cell(
    path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb, boxes, _ = field(path)
    truth = annotated_rbc_px(boxes[1], rgb.shape[1], rgb.shape[0])
    scale = estimate_scale(rgb)
    assert scale is not None and scale.rbc_px == pytest.approx(truth, rel=0.15)
    # the disc in the white cell's pale cytoplasm, beside its nucleus, is what the rule drops
    monkeypatch.setattr("marrowscope.preprocess.fields._NUCLEUS_SHARE", 1.0)
    unchecked = estimate_scale(rgb)
    assert unchecked is not None and unchecked.rbc_px > 2 * truth


def test_annotated_red_cell_size_leaves_out_cells_cut_by_the_border() -> None:
    # a 200 x 150 field: the first box starts at x = 0, the last ends 1 px from the right edge
    boxes = np.array([[0, 10, 30, 40], [50, 50, 80, 82], [100, 100, 126, 130], [170, 20, 199, 50]])
    assert touches_border(boxes, 200, 150).tolist() == [True, False, False, True]
    assert annotated_rbc_px(boxes, 200, 150) == 31.0  # median of the longer sides 32 and 30
    assert annotated_rbc_px(boxes, 200, 150, min_cells=3) is None
    assert annotated_rbc_px(np.zeros((0, 4)), 200, 150) is None


def test_a_cell_boxed_twice_is_found_touching_cells_are_not() -> None:
    # field-dev BCD 70b11907: one neutrophil boxed twice (IoU 0.69); 4e80ae99: touching cells
    twice = np.array([[170, 0, 343, 172], [125, 1, 321, 172]])
    touching = np.array([[141, 80, 254, 267], [1, 229, 80, 322], [1, 308, 21, 381]])
    assert duplicate_boxes(np.concatenate([touching, twice])) == [(3, 4)]
    assert duplicate_boxes(touching) == []
    assert duplicate_boxes(twice, iou=0.7) == []
    assert duplicate_boxes(np.zeros((0, 4))) == []


def test_the_ruler_follows_the_magnification() -> None:
    rgb, _, _ = field(ANNOTATED[0])
    full = estimate_scale(rgb)
    half = estimate_scale(cv2.resize(rgb, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    assert full is not None and half is not None
    assert half.um_per_px == pytest.approx(2 * full.um_per_px, rel=0.12)


def test_the_ruler_gives_up_on_a_blank_image() -> None:
    assert estimate_scale(np.full((200, 200, 3), 235, np.uint8)) is None


def test_stain_map_separates_nuclei_from_red_cells() -> None:
    rgb, boxes, _ = field(ANNOTATED[0])
    stain = stain_map(rgb)
    x0, y0, x1, y1 = boxes[0][0].astype(int)
    nucleus = np.percentile(stain[y0:y1, x0:x1], 90)
    red = [np.median(stain[int(b[1]) : int(b[3]), int(b[0]) : int(b[2])]) for b in boxes[1]]
    assert nucleus > 50 and max(red) < 30


def test_crop_at_scale_keeps_micrometres_and_centres_the_cell() -> None:
    # a field at 0.1 um/px with a 10 um disc (100 px) centred at (300, 200)
    field_img = np.full((400, 600, 3), 230, np.uint8)
    cv2.circle(field_img, (300, 200), 50, (120, 40, 160), -1)
    # the model's crops: 40 um wide at 200 px -> 0.2 um/px: the disc must be 50 px across
    crop = crop_at_scale(field_img, (300.0, 200.0), um_per_px=0.1, crop_um=40.0, out_px=200)
    assert crop.shape == (200, 200, 3) and crop.dtype == np.uint8
    disc = np.all(np.abs(crop.astype(int) - (120, 40, 160)) < 30, axis=2)
    ys, xs = np.nonzero(disc)
    assert xs.max() - xs.min() + 1 == pytest.approx(50, abs=2)
    assert ys.max() - ys.min() + 1 == pytest.approx(50, abs=2)
    assert (xs.mean(), ys.mean()) == pytest.approx((99.5, 99.5), abs=1.0)


def test_crop_at_scale_mirrors_the_field_beyond_its_border() -> None:
    rgb, _, _ = field(ANNOTATED[0])
    crop = crop_at_scale(rgb, (5.0, 5.0), um_per_px=0.05, crop_um=30.0, out_px=120)
    assert crop.shape == (120, 120, 3)
    assert (crop.sum(axis=2) > 0).all()  # no black fill


def test_tiles_cover_the_image_with_the_overlap() -> None:
    tiles = plan_tiles(1000, 700, tile=400, overlap=100)
    cover = np.zeros((700, 1000), int)
    for t in tiles:
        assert t.width <= 400 and t.height <= 400
        cover[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += 1
    assert cover.min() >= 1
    xs = sorted({t.x0 for t in tiles})
    assert all(b - a <= 300 for a, b in zip(xs, xs[1:], strict=False))  # >= 100 px shared
    assert plan_tiles(300, 200, tile=400, overlap=100)[0].width == 300
    with pytest.raises(ValueError, match="larger than overlap"):
        plan_tiles(10, 10, tile=50, overlap=50)


def test_looks_like_crop() -> None:
    assert looks_like_crop(np.array([[40, 40, 210, 210]]), 250, 250)  # a Matek-like crop
    # a PBC field: one centred white cell about 38% of the frame: a field, not a crop
    assert not looks_like_crop(np.array([[112, 113, 248, 249]]), 360, 363)
    # big but off-centre (0.28 of the shorter side from the centre)
    assert not looks_like_crop(np.array([[0, 0, 180, 180]]), 300, 300, red_cells=0)
    # the cell nearest the centre is judged; a neighbour cut by the border does not hide it
    assert looks_like_crop(np.array([[0, 0, 60, 90], [40, 40, 210, 210]]), 250, 250)
    # 0.58 of the frame: a crop only where few red cells were measured (marrow crops)
    cell = np.array([[52.5, 52.5, 197.5, 197.5]])
    assert looks_like_crop(cell, 250, 250, red_cells=0)
    assert looks_like_crop(cell, 250, 250, red_cells=2)
    assert not looks_like_crop(cell, 250, 250, red_cells=6)
    assert not looks_like_crop(cell, 250, 250)  # scale given: red cells not measured
    assert not looks_like_crop(np.zeros((0, 4)), 250, 250, red_cells=0)


def test_looks_like_field() -> None:
    # red cells all around and the white cell off-centre, small, or none at all: a field
    assert looks_like_field(np.array([[10, 10, 110, 110]]), 640, 480, red_cells=20)
    assert looks_like_field(np.array([[300, 220, 340, 260]]), 640, 480, red_cells=20)
    assert looks_like_field(np.zeros((0, 4)), 640, 480, red_cells=20)
    # a centred cell (a crop), or too few red cells to tell: not a field
    assert not looks_like_field(np.array([[112, 113, 248, 249]]), 360, 363, red_cells=8)
    assert not looks_like_field(np.array([[10, 10, 110, 110]]), 640, 480, red_cells=2)


@pytest.mark.parametrize("path", ANNOTATED, ids=lambda p: p.name[:8])
def test_the_classical_detector_finds_the_white_cells(path) -> None:
    rgb, boxes, _ = field(path)
    scale = estimate_scale(rgb)
    found, scores = detect_classical(rgb, um_per_px=scale.um_per_px)
    assert len(found) == len(boxes[0])
    assert (box_iou(found, boxes[0]).max(axis=0) >= 0.5).all()
    assert ((scores > 0) & (scores <= 1)).all()


def test_the_classical_detector_finds_nothing_in_a_field_of_red_cells() -> None:
    rgb, _, _ = field(EMPTY)
    found, _ = detect_classical(rgb, um_per_px=estimate_scale(rgb).um_per_px)
    assert len(found) == 0

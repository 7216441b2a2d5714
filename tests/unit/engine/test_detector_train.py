"""The white-cell detector's training pieces: targets, training windows, settings, threshold."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from marrowscope.data.fields import FieldRecord
from marrowscope.engine import detector_train as dt
from marrowscope.models.detector import STRIDE, pad_field

BG, CELL = 50, 200


def _field(w: int = 160, h: int = 120) -> dt._Prepared:
    """A field at the working scale: grey background, two bright 60 px square 'cells'."""
    img = np.full((h, w, 3), BG, np.uint8)
    boxes = np.array([[10, 10, 70, 70], [90, 50, 150, 110]], np.float64)
    for x0, y0, x1, y1 in boxes.astype(int):
        img[y0:y1, x0:x1] = CELL
    return dt._Prepared(img, boxes, rest=1.0, origin="test")


def _bright_boxes(canvas: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes of the connected bright regions of a window."""
    n, _, stats, _ = cv2.connectedComponentsWithStats((canvas[:, :, 0] == CELL).astype(np.uint8))
    return sorted((int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:n])


@pytest.fixture
def no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """Geometry only: the colour jitter is exercised by training, not here."""
    monkeypatch.setattr(dt, "_colour", lambda img, rng, hue, gray: img)


@pytest.mark.parametrize("cut", [0.0, 1.0])
def test_window_boxes_follow_the_pixels_they_box(no_colour: None, cut: float) -> None:
    cfg = dt.DetectorTrainConfig(canvas=192, scale_jitter=1.0, cut=cut)
    p = _field()
    shown_areas = []
    for seed in range(60):
        canvas, boxes = dt._augment(p, cfg, np.random.default_rng(seed))
        assert canvas.shape == (192, 192, 3)
        shown_areas.append(int((canvas[:, :, 0] > 0).sum()))
        # every kept box is exactly the visible part of a cell; no cell visible enough is lost
        visible = [b for b in _bright_boxes(canvas) if b[2] - b[0] >= 6 and b[3] - b[1] >= 6]
        got = sorted(tuple(int(round(v)) for v in b) for b in boxes)
        if cut == 0.0:
            assert got == visible
        else:  # slivers under 15% of the cell's area are dropped, as the training rule says
            assert set(got) <= set(visible)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            assert all(area(b) >= 0.15 * 60 * 60 for b in got)
            assert all(area(b) < 0.15 * 60 * 60 for b in set(visible) - set(got))
    full = 160 * 120
    if cut == 0.0:  # the whole field is shown every time, only rotated/flipped
        assert set(shown_areas) == {full}
    else:  # a part of 50-100% of each side
        assert all(0.25 * full - 200 <= a <= full for a in shown_areas)
        assert np.mean(shown_areas) < 0.7 * full


def test_cut_zero_keeps_the_random_stream_of_earlier_recipes() -> None:
    """``cut: 0`` (the default) draws no extra random number, so wbc1's recipe reproduces
    unchanged: the first window's boxes and the generator's state after three windows are those of
    the code before ``cut`` existed (values recorded with commit 9aa960a's ``_augment``)."""
    assert dt.DetectorTrainConfig().cut == 0.0
    cfg = dt.DetectorTrainConfig(canvas=192, cut=0.0)
    rng = np.random.default_rng(3)
    first = dt._augment(_field(), cfg, rng)[1]
    for _ in range(2):
        dt._augment(_field(), cfg, rng)
    np.testing.assert_allclose(
        first, [[22.3125, 48.3333, 72.1875, 98.3333], [88.8125, 81.6667, 138.6875, 131.6667]],
        atol=1e-3,
    )  # fmt: skip
    assert rng.random() == 0.12963948164639638


def test_targets_mark_each_centre_with_its_size_and_offset() -> None:
    boxes = np.array([[20.0, 36.0, 60.0, 68.0], [100.0, 100.0, 103.0, 103.0]])
    t = dt.make_targets(boxes, 24, 24)
    cx, cy = 40.0 / STRIDE, 52.0 / STRIDE  # 5.0, 6.5
    assert t["mask"].sum() == 1  # the 3 px box is under half a grid cell: no target
    assert t["heat"][6, 5] == 1.0 and t["mask"][6, 5] == 1.0
    assert t["heat"].max() == 1.0 and 0 < t["heat"][6, 7] < 1  # a Gaussian around the centre
    np.testing.assert_allclose(t["size"][:, 6, 5], [math.log(40 / STRIDE), math.log(32 / STRIDE)])
    np.testing.assert_allclose(t["offset"][:, 6, 5], [cx - 5, cy - 6])


def test_loss_is_lower_for_the_right_answer() -> None:
    t = dt.make_targets(np.array([[20.0, 36.0, 60.0, 68.0]]), 24, 24)
    tt = {k: torch.from_numpy(v[None]) for k, v in t.items()}
    good = torch.zeros(1, 5, 24, 24)
    good[0, 0] = torch.logit(torch.from_numpy(t["heat"]).clamp(1e-3, 1 - 1e-3))
    good[0, 1:3] = torch.from_numpy(t["size"])
    good[0, 3:5] = torch.from_numpy(t["offset"])
    bad = torch.zeros(1, 5, 24, 24)
    lg, _ = dt.centernet_loss(good, tt)
    lb, parts = dt.centernet_loss(bad, tt)
    assert float(lg) < 0.1 < float(lb)
    assert parts["size"] > 0 and parts["offset"] > 0


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "d.yaml"
    cfg.write_text("epochs: 3\ncut: 0.5\n")
    got = dt.load_train_config(cfg, {"lr": 1})
    assert (got.epochs, got.cut, got.lr) == (3, 0.5, 1.0)
    with pytest.raises(
        ValueError, match=r"unknown detector training setting\(s\) cutt; known: .*cut"
    ):
        dt.load_train_config(cfg, {"cutt": 0.5})
    with pytest.raises(ValueError, match="setting epochs: expected int"):
        dt.load_train_config(None, {"epochs": "ten"})


def _record(origin: str, truth: list[list[float]]) -> FieldRecord:
    return FieldRecord(
        path=f"{origin}.jpg", split="train", origin=origin, width=100, height=100,
        wbc=np.asarray(truth, np.float64).reshape(-1, 4),
        rbc=np.zeros((0, 4)), platelets=np.zeros((0, 4)),
    )  # fmt: skip


def test_threshold_is_the_middle_of_the_best_range() -> None:
    # one origin; a true cell scored 0.6 and a false box scored 0.3: every threshold in
    # (0.3, 0.6] is perfect, and the rule picks the middle of that run of the grid
    recs = [_record("A", [[10, 10, 40, 40]])]
    found = np.array([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]])
    thr, per = dt.fit_threshold([(found, np.array([0.6, 0.3]))], recs)
    assert per["A"].f1 == 1.0
    grid = np.round(np.arange(0.10, 0.81, 0.025), 3)
    good = grid[(grid > 0.3) & (grid <= 0.6)]
    assert thr == pytest.approx(good[(len(good) - 1) // 2])


def test_tune_split_is_per_origin_and_seeded() -> None:
    recs = [_record(o, []) for o in ["A"] * 20 + ["B"] * 10]
    recs = [replace(r, path=f"{i}.jpg") for i, r in enumerate(recs)]
    fit, tune = dt.split_tune(recs, 0.2, seed=1)
    assert sorted(r.origin for r in tune) == ["A"] * 4 + ["B"] * 2
    assert len(fit) + len(tune) == 30 and not {r.path for r in fit} & {r.path for r in tune}
    assert [r.path for r in dt.split_tune(recs, 0.2, seed=1)[1]] == [r.path for r in tune]


def test_mirrored_targets_are_the_cells_the_mirrored_field_shows() -> None:
    """A cell touching the edge and its mirror image are one symmetric object; a cell near the
    edge has a separate image in the margin (cut by the margin's outer edge); across a corner,
    the double reflection. Checked against the pixels of the field padded as at prediction time."""
    w, h, m = 100, 80, 20
    img = np.full((h, w, 3), BG, np.uint8)
    boxes = np.array([[0, 30, 15, 60], [40, 8, 70, 30], [85, 65, 100, 80]], np.float64)
    for x0, y0, x1, y1 in boxes.astype(int):
        img[y0:y1, x0:x1] = CELL
    padded = pad_field(img, m, "reflect")
    got, ref = dt.mirror_boxes(boxes, w, h, m)
    assert sorted(tuple(int(round(v)) for v in b) for b in got) == _bright_boxes(padded)
    by_box = {tuple(int(round(v)) for v in b): r for b, r in zip(got, ref, strict=True)}
    assert by_box[(5, 50, 35, 80)] == 30 * 30  # the left cell joined with its image: 2 x 15 wide
    assert by_box[(60, 0, 90, 12)] == 30 * 22  # the top cell's image, 12 of its 22 rows shown
    # the corner cell (touching the right and bottom edges) and its three images: one object
    assert by_box[(105, 85, 135, 115)] == 30 * 30
    assert len(got) == 4


@pytest.mark.parametrize("x0", [0, 3, 12])
def test_a_field_narrower_than_the_margin_is_mirrored_once(x0: int) -> None:
    """Mirrored across its own width, zeros beyond: a cell touching the edge, one near it and one
    farther in all match the pixels."""
    w, h, m = 20, 60, 32
    img = np.full((h, w, 3), BG, np.uint8)
    boxes = np.array([[x0, 20, x0 + 5, 40]], np.float64)
    img[20:40, x0 : x0 + 5] = CELL
    padded = pad_field(img, m, "reflect")
    assert padded.shape == (h + 2 * m, w + 2 * m, 3)
    assert not padded[:, : m - w].any() and not padded[:, m + 2 * w :].any()
    got, _ = dt.mirror_boxes(boxes, w, h, m)
    assert sorted(tuple(int(round(v)) for v in b) for b in got) == _bright_boxes(padded)


def test_a_mirror_image_is_judged_against_its_whole_cell() -> None:
    """A cell half cut away by a training window (its whole area given) keeps that reference in
    its mirror images, as the zero-margin windows judge a cut cell against its whole area."""
    box = np.array([[0.0, 40.0, 20.0, 60.0]])  # 20 x 20 visible of a 40 x 20 cell
    got, ref = dt.mirror_boxes(box, 100, 100, 16, areas=np.array([800.0]))
    by_box = {tuple(int(round(v)) for v in b): r for b, r in zip(got, ref, strict=True)}
    assert by_box[(0, 56, 36, 76)] == 800 * 36 / 20  # joined: the cell grown as its box grew
    assert len(got) == 1
    # near the top edge, not touching it: the separate image keeps the whole cell's area
    got, ref = dt.mirror_boxes(np.array([[40.0, 4.0, 60.0, 24.0]]), 100, 100, 16, np.array([800.0]))
    by_box = {tuple(int(round(v)) for v in b): r for b, r in zip(got, ref, strict=True)}
    assert by_box == {(56, 20, 76, 40): 800.0, (56, 0, 76, 12): 800.0}


def test_mirrored_cells_too_wide_for_the_margin_are_cut_by_it() -> None:
    got, ref = dt.mirror_boxes(np.array([[0.0, 20.0, 50.0, 50.0]]), 100, 80, 16)
    np.testing.assert_allclose(got, [[0, 36, 66, 66]])  # 16 px of its 50 px image
    np.testing.assert_allclose(ref, [66 * 30])
    assert dt.mirror_boxes(np.zeros((0, 4)), 100, 80, 16)[0].shape == (0, 4)


def _edge_field() -> dt._Prepared:
    """Like :func:`_field`, with one cell cut by the field's left edge."""
    img = np.full((120, 160, 3), BG, np.uint8)
    boxes = np.array([[0, 10, 30, 70], [90, 50, 150, 110]], np.float64)
    for x0, y0, x1, y1 in boxes.astype(int):
        img[y0:y1, x0:x1] = CELL
    return dt._Prepared(img, boxes, rest=1.0, origin="test")


@pytest.mark.parametrize("cut", [0.0, 1.0])
def test_reflect_windows_box_what_they_show(
    no_colour: None, cut: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``pad: reflect`` the training windows show the field mirrored at its edges, and
    their targets are the bright objects they show: the edge cell joined with its image, the
    images of the other cell in the margin; nothing shown whole is left out."""
    cfg = dt.DetectorTrainConfig(canvas=192, scale_jitter=1.0, cut=cut, pad="reflect", margin=24)
    joined = 0
    # the cells' whole areas reach the mirror step, however much of them a cut window shows
    areas: list[float] = []
    mirror = dt.mirror_boxes

    def spy(boxes, w, h, m, whole=None):  # type: ignore[no-untyped-def]
        areas.extend(whole.tolist())
        return mirror(boxes, w, h, m, whole)

    monkeypatch.setattr(dt, "mirror_boxes", spy)
    for seed in range(60):
        canvas, boxes = dt._augment(_edge_field(), cfg, np.random.default_rng(seed))
        visible = [b for b in _bright_boxes(canvas) if b[2] - b[0] >= 6 and b[3] - b[1] >= 6]
        # a cell within 1 px of an edge touches it: it and its image (2 px apart) are one object
        joins = {
            (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
            for a in visible
            for b in visible
            if (a[1::2] == b[1::2] and 0 < b[0] - a[2] <= 2)
            or (a[::2] == b[::2] and 0 < b[1] - a[3] <= 2)
        }
        got = sorted(tuple(int(round(v)) for v in b) for b in boxes)
        assert set(got) <= set(visible) | joins
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        inside = lambda a, b: b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]  # noqa: E731
        assert all(any(inside(v, b) for b in got) for v in visible if area(v) >= 60 * 60)
        # the edge cell (30 x 60) joined with its image (up to 24 px more on the axis it was cut)
        joined += any(sorted((b[2] - b[0], b[3] - b[1]))[1] == 60 for b in got if area(b) > 31 * 60)
    assert joined >= 20
    assert set(areas) == {30 * 60, 60 * 60}


def test_reflect_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="pad"):
        dt.load_train_config(None, {"pad": "wrap"})
    with pytest.raises(ValueError, match="margin"):
        dt.load_train_config(None, {"margin": 999})
    assert dt.load_train_config(None, {"pad": "reflect", "margin": 32}).pad == "reflect"


DONOR = 120


def _donor(side: int = 100, r: int = 20) -> np.ndarray:
    """A field with one round 'cell' of radius ``r`` centred at (50, 50)."""
    img = np.full((side, side, 3), BG, np.uint8)
    cv2.circle(img, (50, 50), r, (DONOR, DONOR, DONOR), -1)
    return img


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_a_pasted_cell_lands_beside_its_neighbour_where_its_box_says(factor: float) -> None:
    img = np.full((240, 240, 3), BG, np.uint8)
    img[90:150, 90:150] = CELL
    boxes = np.array([[90.0, 90.0, 150.0, 150.0]])
    donor, cell = _donor(), np.array([30.0, 30.0, 70.0, 70.0])
    gaps = []
    for seed in range(40):
        out, got = dt.paste_neighbour(img, boxes, donor, cell, factor, np.random.default_rng(seed))
        assert len(got) == 2 and np.array_equal(got[0], boxes[0])
        new = got[1]
        assert new[2] - new[0] == pytest.approx(40 * factor, abs=1)
        assert new[3] - new[1] == pytest.approx(40 * factor, abs=1)
        cx, cy = int((new[0] + new[2]) / 2), int((new[1] + new[3]) / 2)
        assert out[cy, cx, 0] == DONOR  # the pasted cell's own pixels are under its box
        ring = cv2.circle(np.zeros((240, 240), np.uint8), (cx, cy), int(30 * factor), 1, -1)
        donor_px = (np.abs(out[:, :, 0].astype(int) - DONOR) <= 3) & (ring == 0)
        assert not donor_px.any()  # and nowhere else: the blend fades out around the cell
        # the centres are (r1 + r2) * (1 + gap) apart, gap in PASTE_GAPS
        d = math.hypot(cx - 120, cy - 120)
        gaps.append(d / (30 + 20 * factor) - 1)
        covered = (min(150, new[2]) - max(90, new[0])) * (min(150, new[3]) - max(90, new[1]))
        assert max(covered, 0) <= 0.5 * 60 * 60
    lo, hi = dt.PASTE_GAPS
    assert lo - 0.05 <= min(gaps) and max(gaps) <= hi + 0.05
    assert min(gaps) < 0 < max(gaps)  # both touching-with-overlap and a little apart


def test_a_paste_that_does_not_fit_leaves_the_window_unchanged() -> None:
    """A 40 px cell beside a 36 px one in a 40 px window: less than half of it would show."""
    img = np.full((40, 40, 3), BG, np.uint8)
    boxes = np.array([[2.0, 2.0, 38.0, 38.0]])
    out, got = dt.paste_neighbour(
        img, boxes, _donor(), np.array([30.0, 30.0, 70.0, 70.0]), 1.0, np.random.default_rng(0)
    )
    assert out is img and got is boxes
    empty = np.zeros((0, 4))
    assert (
        dt.paste_neighbour(img, empty, _donor(), boxes[0], 1.0, np.random.default_rng(0))[1]
        is empty
    )


def test_paste_adds_a_target_and_paste_zero_ignores_the_donor(no_colour: None) -> None:
    donor = dt._Prepared(_donor(), np.array([[30.0, 30.0, 70.0, 70.0]]), rest=1.0, origin="test")
    cfg0 = dt.DetectorTrainConfig(canvas=256, scale_jitter=1.0)
    a = dt._augment(_field(), cfg0, np.random.default_rng(5))
    b = dt._augment(_field(), cfg0, np.random.default_rng(5), donor)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    cfg1 = replace(cfg0, paste=1.0)
    added = 0
    for seed in range(30):
        canvas, boxes = dt._augment(_field(), cfg1, np.random.default_rng(seed), donor)
        if len(boxes) == 3:
            added += 1
            cx, cy = (int(v) for v in (boxes[2, :2] + boxes[2, 2:]) / 2)
            assert canvas[cy, cx, 0] == DONOR
    assert added >= 20  # most windows have room for a neighbour


def test_the_window_edge_may_cut_a_pasted_cell() -> None:
    """A neighbour pasted across the window's edge is boxed by its visible part (as annotators
    box a cell the field's edge cuts), at least half of it."""
    img = np.full((100, 100, 3), BG, np.uint8)
    img[30:70, 30:70] = CELL
    boxes = np.array([[30.0, 30.0, 70.0, 70.0]])
    donor, cell = _donor(), np.array([30.0, 30.0, 70.0, 70.0])
    cut = 0
    for seed in range(40):
        out, got = dt.paste_neighbour(img, boxes, donor, cell, 1.0, np.random.default_rng(seed))
        if len(got) == 1:
            continue
        new = got[1]
        assert (new >= 0).all() and (new <= 100).all()
        area = (new[2] - new[0]) * (new[3] - new[1])
        assert area >= 0.5 * 40 * 40
        if area < 40 * 40 - 1:
            cut += 1
            cx, cy = int((new[0] + new[2]) / 2), int((new[1] + new[3]) / 2)
            assert out[cy, cx, 0] == DONOR  # the visible part is the pasted cell's
    assert cut >= 5


def test_paste_setting_is_a_probability() -> None:
    with pytest.raises(ValueError, match="paste"):
        dt.load_train_config(None, {"paste": 1.5})
    assert dt.load_train_config(None, {"paste": 0.5}).paste == 0.5

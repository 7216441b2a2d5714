"""Whole fields through the shipped detectors (wbc2, the default, and wbc1): real field-dev fields,
every input kind, an empty field, huge and tiled fields, touching cells, crops given as fields, and
classification at scale."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from field_samples import ANNOTATED, BCCD, EMPTY, FIELDS_DIR, PBC, field
from PIL import Image

from marrowscope.data.fields import touching_pair
from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.inference import fields as fields_mod
from marrowscope.inference.fields import (
    FieldDetector,
    FieldError,
    analyze_field,
    cell_crop,
    crop_spec,
    load_field,
)
from marrowscope.metrics.detection import match_boxes
from marrowscope.utils.boxes import box_iou

MATEK = Path(__file__).resolve().parents[3] / "src" / "marrowscope" / "sample_data" / "bm"


@pytest.fixture(scope="module")
def detector() -> FieldDetector:
    return FieldDetector.from_pretrained()


@pytest.fixture(scope="module")
def wbc1() -> FieldDetector:
    return FieldDetector.from_pretrained("wbc1")


def test_the_default_detector_is_wbc2(detector: FieldDetector) -> None:
    assert DEFAULT_DETECTOR == "wbc2" and detector.name_ == "wbc2"
    assert FieldDetector.load().name_ == "wbc2"


@pytest.mark.parametrize("name", ["wbc2", "wbc1"])
@pytest.mark.parametrize("path", ANNOTATED, ids=lambda p: p.name[:8])
def test_every_white_cell_is_found_and_nothing_else(
    detector: FieldDetector, wbc1: FieldDetector, name: str, path: Path
) -> None:
    detector = {"wbc2": detector, "wbc1": wbc1}[name]
    rgb, boxes, _ = field(path)
    found = detector.detect(rgb)
    assert len(found) == len(boxes[0])
    assert (box_iou(found.boxes, boxes[0]).max(axis=0) >= 0.5).all()
    assert found.scale.source == "ruler" and found.method == name and found.warnings == ()
    assert ((found.scores >= detector.min_score_) & (found.scores <= 1)).all()
    assert (found.boxes[:, [0, 1]] >= 0).all()
    assert (found.boxes[:, 2] <= found.width).all() and (found.boxes[:, 3] <= found.height).all()


@pytest.mark.parametrize(("path", "gap"), [(BCCD, -0.1), (PBC, -0.3)], ids=["BCCD", "PBC"])
def test_wbc2_keeps_overlapping_cells_apart_where_wbc1_does_not(
    detector: FieldDetector, wbc1: FieldDetector, path: Path, gap: float
) -> None:
    """A real field's cell and a mirrored copy whose boxes overlap by ``-gap`` of its width (the
    synthetic pairs of benchmarks/touching_cells.py): wbc2, trained with pasted neighbours, boxes
    both cells; wbc1 boxes one of them or one box over the pair (docs/fields.md, touching cells)."""
    rgb, boxes, _ = field(path)
    pair, cell, copy = touching_pair(rgb, boxes[0][0], gap)
    assert pair.shape[1] > rgb.shape[1] and copy[0] < cell[2]  # widened; the boxes overlap
    truth = np.stack([cell, copy])
    found = detector.detect(pair)
    counts, _ = match_boxes(found.boxes, found.scores, truth, iou=0.5)
    assert counts.tp == 2 and len(found) == 2, found.boxes
    older = wbc1.detect(pair)
    assert match_boxes(older.boxes, older.scores, truth, iou=0.5)[0].tp == 1


def test_a_field_without_white_cells_gives_zero(detector: FieldDetector) -> None:
    found = detector.detect(EMPTY)
    assert len(found) == 0 and found.boxes.shape == (0, 4) and found.warnings == ()


def test_every_input_kind_gives_the_same_cells(detector: FieldDetector) -> None:
    path = ANNOTATED[-1]
    rgb = load_field(path)
    want = detector.detect(rgb).boxes
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    deep = rgb.astype(np.uint16) * 257  # 16-bit
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    for image in (path, str(path), buf.getvalue(), Image.fromarray(rgb), rgba, deep):
        np.testing.assert_allclose(detector.detect(image).boxes, want, atol=1e-6)


def test_a_grayscale_field_is_processed_with_a_warning(detector: FieldDetector) -> None:
    gray = np.asarray(Image.open(ANNOTATED[0]).convert("L"))
    found = detector.detect(gray)
    assert found.width == gray.shape[1] and any("grayscale" in w for w in found.warnings)


def test_a_given_scale_is_used_and_recorded(detector: FieldDetector) -> None:
    rgb, boxes, _ = field(ANNOTATED[0])
    measured = detector.detect(rgb).scale.um_per_px
    found = detector.detect(rgb, um_per_px=measured)
    assert found.scale.source == "given" and found.scale.um_per_px == measured
    assert (box_iou(found.boxes, boxes[0]).max(axis=0) >= 0.5).all()
    with pytest.raises(FieldError, match="plausible"):
        detector.detect(rgb, um_per_px=50.0)


def test_a_huge_field_is_refused_with_the_limit_named(
    detector: FieldDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    array = load_field(ANNOTATED[0])  # 360 x 363 = 130,680 pixels
    monkeypatch.setattr(fields_mod, "MAX_FIELD_PIXELS", 100_000)
    want = r"130,680 pixels, above the 100,000-pixel limit of a field; cut it into smaller"
    with pytest.raises(FieldError, match=want):
        detector.detect(ANNOTATED[0])  # a file: refused before it is decoded
    with pytest.raises(FieldError, match=want):
        detector.detect(array)


def test_a_large_field_is_cut_into_tiles_and_merged(
    detector: FieldDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb, boxes, _ = field(BCCD)  # one white cell near the centre
    h, w = rgb.shape[:2]
    mosaic = np.vstack([np.hstack([rgb, rgb]), np.hstack([rgb, rgb])])
    truth = np.vstack([boxes[0] + [dx, dy, dx, dy] for dy in (0, h) for dx in (0, w)])
    whole = detector.detect(mosaic)
    monkeypatch.setattr(fields_mod, "TILE_SIDE", 256)
    monkeypatch.setattr(fields_mod, "TILE_OVERLAP", 96)
    tiled = detector.detect(mosaic)
    assert whole.tiles == 1 and tiled.tiles > 1
    for found in (whole, tiled):
        assert len(found) == 4
        assert (box_iou(found.boxes, truth).max(axis=0) >= 0.5).all()


def _crop_warned(detector: FieldDetector, path: Path) -> bool:
    return any("single-cell crop" in w for w in detector.detect(path).warnings)


def test_single_cell_crops_given_as_fields_are_flagged_and_real_fields_are_not(
    detector: FieldDetector,
) -> None:
    """The crop warning on real images: most of the 192 shipped Matek crops (measured 108, 56%;
    docs/fields.md), none of the shipped real fields (every field of tests/data/fields)."""
    crops = sorted(MATEK.rglob("*.jpg"))
    assert len(crops) == 192
    rate = sum(_crop_warned(detector, p) for p in crops) / len(crops)
    assert rate >= 0.5
    fields = sorted(FIELDS_DIR.rglob("*.jpg"))
    assert len(fields) == 9
    assert not any(_crop_warned(detector, p) for p in fields)


def test_whole_fields_given_as_crops_are_flagged_and_real_crops_are_not(
    detector: FieldDetector,
) -> None:
    """The opposite check of single-cell ``count``: the shipped Matek crops (``make demo``) are
    not taken for fields (per image 3 of 192, and no warning for the sample), while the shipped
    test fields given as crops are."""
    from marrowscope.engine.count import field_like_images
    from marrowscope.preprocess.fields import looks_like_field

    def field_like(p: Path) -> bool:
        d = detector.detect(p)
        red = d.scale.red_cells if d.scale.source == "ruler" else 0
        return looks_like_field(d.boxes, d.width, d.height, red_cells=red)

    crops = sorted(MATEK.rglob("*.jpg"))
    assert sum(field_like(p) for p in crops) / len(crops) <= 0.05
    assert field_like_images(crops, detector) == []
    fields = [*ANNOTATED, EMPTY]
    assert len(field_like_images(fields, detector)) >= 3


def test_a_field_too_small_at_its_scale_is_named_with_advice_for_its_scale(
    detector: FieldDetector, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.png"
    Image.fromarray(load_field(BCCD)[200:240, 300:340]).save(path)  # 40 x 40 pixels
    with pytest.raises(FieldError) as err:
        detector.detect(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "default" in msg and "check --um-per-px" not in msg
    with pytest.raises(FieldError, match=r"tiny\.png: .*\(given\).*check --um-per-px"):
        detector.detect(path, um_per_px=0.05)


def test_a_field_with_exif_orientation_is_detected_as_viewers_show_it(
    detector: FieldDetector, tmp_path: Path
) -> None:
    """A JPEG stored sideways with EXIF Orientation 6: the boxes are in the upright frame (the
    one viewers, overlays and crops show), found as in the upright field."""
    rgb, boxes, _ = field(BCCD)  # 640 x 480, one white cell
    im = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # stored turned left
    exif = im.getexif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    path = tmp_path / "sideways.jpg"
    im.save(path, quality=95, exif=exif.tobytes())
    found = detector.detect(path)
    assert (found.width, found.height) == (640, 480)
    assert len(found) == 1 and box_iou(found.boxes, boxes[0]).max() >= 0.5


def test_the_classical_detector_has_the_same_interface() -> None:
    det = FieldDetector.load("classical")
    rgb, boxes, _ = field(BCCD)
    found = det.detect(rgb)
    assert found.method == "classical" and len(found) == 1
    assert box_iou(found.boxes, boxes[0]).max() >= 0.5


def test_cells_are_cut_at_the_classifiers_scale_and_classified() -> None:
    from marrowscope.inference.predictor import Predictor

    pred = Predictor.from_pretrained("pbc6", device="cpu", tta="none")
    spec = crop_spec(pred)
    assert (spec.side_px, spec.um_per_px) == (360, pytest.approx(0.088))
    pbc = PBC
    result = analyze_field(pbc, FieldDetector.from_pretrained(), pred)
    assert len(result.cells) == 1 and result.crop == spec
    cell = result.cells[0]
    assert cell.predicted in pred.classes_ and cell.probs.shape == (6,)
    assert cell.confidence == pytest.approx(float(cell.probs.max()))
    # a PBC field is at the classifier's own scale, so its crop is (nearly) the field itself
    rgb = load_field(pbc)
    crop = cell_crop(rgb, result.detections.boxes[0], result.detections.scale, spec)
    assert crop.shape == (360, 360, 3)
    assert 0.8 < result.detections.scale.um_per_px / spec.um_per_px < 1.25


def test_unknown_or_altered_detectors_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from marrowscope.models import detector as detector_mod
    from marrowscope.models.bundle import PRETRAINED_DIR, BundleError

    with pytest.raises(BundleError, match=r"unknown detector 'nope'.*wbc1.*wbc2.*classical"):
        FieldDetector.load("nope")
    copy = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED_DIR / "wbc1", copy / "wbc1")
    shutil.copyfile(PRETRAINED_DIR / "detectors.json", copy / "detectors.json")
    with (copy / "wbc1" / "model.onnx").open("ab") as f:
        f.write(b"\0")
    monkeypatch.setattr(detector_mod, "PRETRAINED_DIR", copy)
    with pytest.raises(BundleError, match=r"sha256 .* does not match"):
        FieldDetector.from_pretrained("wbc1")
    # by its folder in the package too, by any path to it (--detector PATH)
    link = tmp_path / "my-detector"
    link.symlink_to(copy / "wbc1", target_is_directory=True)
    for path in (copy / "wbc1", link):
        with pytest.raises(BundleError, match=r"sha256 .* does not match"):
            FieldDetector.load(path)
    # the package's own folder, intact, is the shipped detector and is named so
    with (copy / "wbc1" / "model.onnx").open("r+b") as f:
        f.truncate((copy / "wbc1" / "model.onnx").stat().st_size - 1)
    assert FieldDetector.load(link).name_ == "wbc1"
    # a copy elsewhere is the user's own detector folder, loaded as it is (no index entry)
    mine = tmp_path / "mine"
    shutil.copytree(copy / "wbc1", mine)
    (mine / "note.txt").write_text("my own copy")
    assert FieldDetector.load(mine).name_ == str(mine)

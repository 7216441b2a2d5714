"""The detector's field margins: zeros (wbc1) or the field mirrored (``pad: reflect``), how
boxes are read back from a mirrored margin, and the metadata that records the choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marrowscope.inference.fields import FieldDetector
from marrowscope.models.bundle import BundleError
from marrowscope.models.detector import (
    INSIDE_SHARE,
    MARGIN,
    STRIDE,
    CellDetector,
    DetectorMetadata,
    decode_maps,
    pad_field,
    read_detector_metadata,
)


def _maps(peaks: list[tuple[int, int, float, float]], h: int = 12, w: int = 16) -> np.ndarray:
    """Output maps with a confident peak at each grid cell ``(gx, gy)`` of box size ``(bw, bh)``
    in input pixels, centred on the cell's corner (offset 0)."""
    maps = np.zeros((5, h, w), np.float32)
    maps[0] = -10.0
    for gx, gy, bw, bh in peaks:
        maps[0, gy, gx] = 5.0
        maps[1, gy, gx] = np.log(bw / STRIDE)
        maps[2, gy, gx] = np.log(bh / STRIDE)
    return maps


def test_boxes_mostly_in_a_mirrored_margin_are_dropped() -> None:
    """Field 96 x 64 inside a 16 px margin. A cell cut by the left edge comes back as itself plus
    its mirror image, centred on the edge: clipped, it is the visible part. A box 30% inside
    is a mirror image of a cell near the edge: kept with zero margins, dropped with mirrored ones."""
    margin = 16
    on_edge = (2, 4, 32.0, 40.0)  # centre x = 16 - 16 = 0: half inside
    mostly_out = (1, 8, 40.0, 24.0)  # centre x = -8, spans -28..12: 12 of 40 px inside
    inside = (8, 5, 40.0, 40.0)
    maps = _maps([on_edge, mostly_out, inside])
    kw = {"min_score": 0.5, "nms_iou": 0.4, "width": 96, "height": 64, "margin": margin}
    kept, _ = decode_maps(maps, **kw)
    assert len(kept) == 3
    boxes, _ = decode_maps(maps, **kw, min_inside=INSIDE_SHARE)
    got = sorted(tuple(np.round(b).astype(int)) for b in boxes)
    assert got == [(0, 0, 16, 36), (28, 4, 68, 44)]  # the edge cell's visible 16 px; the inner cell


def test_reflect_margins_mirror_the_field() -> None:
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    out = pad_field(img, 3, "reflect")
    assert out.shape == (11, 13, 3)
    np.testing.assert_array_equal(out[3:8, 3:10], img)
    np.testing.assert_array_equal(out[3:8, 2::-1], img[:, :3])  # cba|abc
    assert not pad_field(img, 3, "zero")[:3].any()
    with pytest.raises(ValueError, match="wrap"):
        pad_field(img, 3, "wrap")


def test_a_mirrored_box_is_dropped_before_suppression() -> None:
    """A confident mirror image mostly outside the field overlaps the real cell's box by more
    than the NMS IoU once clipped: dropped first, it cannot suppress the cell."""
    margin = 16
    mirror = (1, 5, 48.0, 40.0)  # centre x -8, spans -32..16: a third of 48 inside, clipped 0..16
    cell = (3, 5, 24.0, 40.0)  # centre x 8, spans -4..20, clipped 0..20
    maps = _maps([mirror, cell])
    maps[0, 5, 1] = 9.0  # the mirror image scores higher
    kw = {"min_score": 0.5, "nms_iou": 0.4, "width": 96, "height": 64, "margin": margin}
    assert len(decode_maps(maps, **kw)[0]) == 1  # zero margins: the mirror wins the NMS
    boxes, _ = decode_maps(maps, **kw, min_inside=INSIDE_SHARE)
    assert [tuple(np.round(b).astype(int)) for b in boxes] == [(0, 4, 20, 44)]


def _detector(pad: str, margin: int) -> FieldDetector:
    torch.manual_seed(0)
    meta = DetectorMetadata("t", 8, 0.234, 0.3, 0.4, pad=pad, margin=margin)
    return FieldDetector.from_model(CellDetector(width=8).eval(), meta, min_score=0.5)


def test_a_reflect_bundle_feeds_the_network_a_mirrored_field() -> None:
    work = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    det = _detector("reflect", 24)
    seen = []
    model = det._model
    assert model is not None
    real_forward = model.forward
    model.forward = lambda x: seen.append(x.numpy().copy()) or real_forward(x)  # type: ignore[method-assign]
    det._maps(work)
    x = seen[0][0].transpose(1, 2, 0) * 255
    np.testing.assert_allclose(x[: 70 + 48, : 90 + 48], pad_field(work, 24, "reflect"), atol=1e-3)
    np.testing.assert_allclose(x[24:48, :24], work[:24, 23::-1], atol=1e-3)  # mirrored, not black


def test_detection_reads_the_bundles_margins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The boxes come back through the bundle's margin, and a reflect bundle drops what lies
    mostly outside the field (a mirror image) while a zero-margin one keeps it."""
    field = np.full((64, 96, 3), 200, np.uint8)
    for pad, margin, expect in [("reflect", 24, 1), ("zero", 24, 2), ("zero", MARGIN, 2)]:
        det = _detector(pad, margin)
        # a cell centred at x 40 and a box centred 16 px left of the field, in input pixels
        maps = _maps(
            [((40 + margin) // STRIDE, 4, 24.0, 24.0), ((margin - 12) // STRIDE, 4, 40.0, 24.0)]
        )
        monkeypatch.setattr(det, "_maps", lambda work, maps=maps: maps)
        found = det.detect(field, um_per_px=0.234)
        assert len(found.boxes) == expect, (pad, margin)
        assert any(abs((b[0] + b[2]) / 2 - 40) < 1 for b in found.boxes)


def test_margin_settings_travel_in_the_metadata(tmp_path: Path) -> None:
    meta = DetectorMetadata("t", 8, 0.234, 0.3, 0.4, pad="reflect", margin=32)
    data = meta.to_dict()
    assert (data["format"], data["pad"], data["margin"], data["inside_share"]) == (
        2,
        "reflect",
        32,
        INSIDE_SHARE,
    )
    assert DetectorMetadata.from_dict(data, "x") == meta
    # wbc1's margins (16 px of zeros) stay format 1, readable by marrowscope before format 2;
    # any other margin is format 2, so that an older reader refuses it instead of ignoring it
    plain = DetectorMetadata("t", 8, 0.234, 0.3, 0.4).to_dict()
    assert plain["format"] == 1 and "pad" not in plain
    assert DetectorMetadata("t", 8, 0.234, 0.3, 0.4, margin=32).to_dict()["format"] == 2
    read = DetectorMetadata.from_dict(plain, "x")
    assert (read.pad, read.margin, read.min_inside) == ("zero", MARGIN, 0.0)
    assert meta.min_inside == INSIDE_SHARE
    # an inside share other than the default needs format 2 to be kept
    odd = DetectorMetadata("t", 8, 0.234, 0.3, 0.4, inside_share=0.5)
    assert DetectorMetadata.from_dict(odd.to_dict(), "x") == odd
    assert DetectorMetadata("t", 8, 0.234, 0.3, 0.4, pad="reflect", margin=0).min_inside == 0.0
    for bad, message in [
        ({"pad": "wrap"}, "unknown pad mode 'wrap'"),
        ({"margin": 32.9}, "whole number"),
        ({"margin": True}, "whole number"),
        ({"inside_share": "0.3"}, "inside_share '0.3' is not a number"),
        ({"inside_share": 1.0}, "inside_share 1.0 is not a number in"),
        ({"format": 3}, "newer than this marrowscope reads"),
        ({"format": True}, "invalid detector format"),
        ({"format": 0}, "invalid detector format"),
    ]:
        (tmp_path / "metadata.json").write_text(json.dumps(data | bad))
        with pytest.raises(BundleError, match=rf"metadata.json: .*{message}"):
            read_detector_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps(plain | {"pad": "reflect"}))
    with pytest.raises(BundleError, match="format 1 metadata cannot set pad"):
        read_detector_metadata(tmp_path)
    with pytest.raises(ValueError, match="margin"):
        DetectorMetadata("t", 8, 0.234, 0.3, 0.4, margin=-1)
    with pytest.raises(ValueError, match="extra metadata cannot set format"):
        DetectorMetadata("t", 8, 0.234, 0.3, 0.4, extra={"format": 1})

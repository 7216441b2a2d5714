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
    to_input,
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
    its mirror image, centred on the edge: clipped, it is the visible part. A box a fifth inside
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


def test_a_reflect_bundle_feeds_the_network_a_mirrored_field() -> None:
    torch.manual_seed(0)
    model = CellDetector(width=8).eval()
    work = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    outputs = {}
    for pad, margin in [("reflect", 24), ("zero", MARGIN)]:
        meta = DetectorMetadata("t", 8, 0.234, 0.3, 0.4, pad=pad, margin=margin)
        got = FieldDetector.from_model(model, meta)._maps(work)
        with torch.inference_mode():
            want = model(torch.from_numpy(to_input(work, margin, pad))).numpy()[0]
        np.testing.assert_allclose(got, want, atol=1e-6)
        outputs[pad] = got
    assert outputs["reflect"].shape != outputs["zero"].shape  # 24 px margins vs 16


def test_margin_settings_travel_in_the_metadata(tmp_path: Path) -> None:
    meta = DetectorMetadata("t", 8, 0.234, 0.3, 0.4, pad="reflect", margin=32)
    data = meta.to_dict()
    assert (data["format"], data["pad"], data["margin"]) == (2, "reflect", 32)
    assert DetectorMetadata.from_dict(data, "x") == meta
    # a zero-margin bundle stays format 1, readable by marrowscope before format 2
    assert DetectorMetadata("t", 8, 0.234, 0.3, 0.4).to_dict()["format"] == 1
    # format 1 metadata without the keys (wbc1's) means 16 px of zeros
    old = {k: v for k, v in data.items() if k not in ("pad", "margin")} | {"format": 1}
    read = DetectorMetadata.from_dict(old, "x")
    assert (read.pad, read.margin) == ("zero", MARGIN)
    (tmp_path / "metadata.json").write_text(json.dumps(data | {"pad": "wrap"}))
    with pytest.raises(BundleError, match=r"metadata.json: unknown pad mode 'wrap'"):
        read_detector_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps(data | {"format": 3}))
    with pytest.raises(BundleError, match="newer than this marrowscope reads"):
        read_detector_metadata(tmp_path)
    with pytest.raises(ValueError, match="margin"):
        DetectorMetadata("t", 8, 0.234, 0.3, 0.4, margin=-1)

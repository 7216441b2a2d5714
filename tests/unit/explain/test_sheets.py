"""Explain outputs: overlay file names, folder listing, contact sheets, explain_to_folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marrowscope.config import ModelConfig
from marrowscope.explain.gradcam import ExplainError
from marrowscope.explain.sheets import (
    CONTACT_SHEET,
    SheetItem,
    explain_to_folder,
    list_images,
    overlay_filename,
    write_contact_sheets,
)
from marrowscope.inference.predictor import Predictor
from marrowscope.models.registry import build_model


def test_overlay_filename_is_safe_and_unique() -> None:
    taken: set[str] = set()
    assert overlay_filename("BLA_00001.jpg", taken) == "BLA_00001_gradcam.png"
    assert overlay_filename("BLA_00001.png", taken) == "BLA_00001_2_gradcam.png"
    assert overlay_filename("sub/BLA_00001.tif", taken) == "BLA_00001_3_gradcam.png"
    weird = overlay_filename("<script>x y.jpg", taken)
    assert weird == "script_x_y_gradcam.png"
    assert overlay_filename("....jpg", taken) == "image_gradcam.png"


def test_list_images_recurses_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "a" / ".hidden").mkdir(parents=True)
    (tmp_path / "__MACOSX").mkdir()
    for p in ("b.jpg", "a/c.PNG", "a/.hidden/d.jpg", "__MACOSX/e.jpg", ".f.jpg", "notes.txt"):
        (tmp_path / p).write_bytes(b"x")
    images, others = list_images(tmp_path)
    # one rule for every command (utils.image.list_image_files): sorted by path
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a/c.PNG", "b.jpg"]
    assert [p.name for p in others] == ["notes.txt"]


def _item(i: int) -> SheetItem:
    rgb = np.full((40, 40, 3), 30 * (i % 8), np.uint8)
    return SheetItem(f"cell_{i}.jpg", rgb, 255 - rgb, "BLA", 0.9, "LYT", 0.05)


def test_contact_sheets_paginate(tmp_path: Path) -> None:
    paths = write_contact_sheets([_item(i) for i in range(5)], tmp_path, page=2)
    assert [p.name for p in paths] == [CONTACT_SHEET, "contact_sheet_2.png", "contact_sheet_3.png"]
    with Image.open(paths[0]) as im:
        first = im.size
    with Image.open(paths[2]) as im:
        last = im.size
    assert last[1] < first[1] or last[0] < first[0]  # the last page holds one image


@pytest.fixture
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=32)
    return Predictor.from_model(model, {"classes": ["AAA", "BBB", "CCC"]}, device="cpu")


def _write_cells(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"cell_{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_explain_to_folder_writes_overlays_sheet_and_index(
    tmp_path: Path, predictor: Predictor
) -> None:
    files = _write_cells(tmp_path / "in", 3)
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    seen: list[int] = []
    summary = explain_to_folder(
        predictor, [*files, bad], tmp_path / "out", batch_size=2, on_progress=seen.append
    )
    assert sum(seen) == 4
    assert [p for p, _ in summary.overlays] == files
    for _, png in summary.overlays:
        with Image.open(png) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert [p for p, _ in summary.failed] == [bad]
    assert "broken.jpg" in summary.failed[0][1]
    assert [s.name for s in summary.sheets] == [CONTACT_SHEET]
    rows = list(csv.DictReader(summary.index.open(encoding="utf-8")))
    assert [r["path"] for r in rows] == [str(p) for p in [*files, bad]]
    probs = predictor.predict_proba(files)
    for r, p in zip(rows, probs, strict=False):
        assert r["predicted"] == r["target"] == ["AAA", "BBB", "CCC"][int(p.argmax())]
        assert float(r["confidence"]) == pytest.approx(float(p.max()), abs=1e-5)
    assert rows[-1]["error"] and rows[-1]["overlay"] == ""


def test_explain_to_folder_with_class_and_bad_class(tmp_path: Path, predictor: Predictor) -> None:
    files = _write_cells(tmp_path / "in", 2)
    summary = explain_to_folder(predictor, files, tmp_path / "out", target_class="CCC")
    rows = list(csv.DictReader(summary.index.open(encoding="utf-8")))
    assert {r["target"] for r in rows} == {"CCC"}
    with pytest.raises(ExplainError, match="AAA, BBB, CCC"):
        explain_to_folder(predictor, files, tmp_path / "out2", target_class="HAC")
    assert not (tmp_path / "out2").exists()  # failed before writing anything

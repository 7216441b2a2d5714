"""End to end on real fields: `marrowscope detect` and `marrowscope count --fields` write boxes,
overlays and a differential count (shipped detector wbc1, shipped classifier pbc6)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from field_samples import ANNOTATED, EMPTY, FIELDS_DIR, field
from PIL import Image
from typer.testing import CliRunner

from marrowscope.cli.main import app
from marrowscope.utils.boxes import box_iou

pytestmark = pytest.mark.integration
runner = CliRunner()


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """The seven real test fields, one in a sub-folder, plus a broken file."""
    folder = tmp_path / "smear-01"
    (folder / "slide-b").mkdir(parents=True)
    for i, p in enumerate([*ANNOTATED, EMPTY]):
        shutil.copyfile(p, (folder / "slide-b" if i == 0 else folder) / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


def _truth(name: str):  # type: ignore[no-untyped-def]
    return field(FIELDS_DIR / name)[1][0]


def test_detect_writes_boxes_fields_and_overlays(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "det"
    r = _invoke("detect", "none", str(sample), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "8 white cell(s) found" in r.output and "1 field(s) with no white cell" in r.output
    fields = {Path(row["path"]).name: row for row in _rows(out / "fields.csv")}
    assert len(fields) == 8  # 7 fields + the broken file
    assert "broken.jpg" in fields and fields["broken.jpg"]["error"]
    assert fields[EMPTY.name]["cells_found"] == "0" and not fields[EMPTY.name]["error"]
    cells = _rows(out / "detections.csv")
    assert {"field", "x_min", "y_min", "x_max", "y_max", "score"} <= set(cells[0])
    for p in ANNOTATED:
        mine = [c for c in cells if Path(c["field"]).name == p.name]
        boxes = [[float(c[k]) for k in ("x_min", "y_min", "x_max", "y_max")] for c in mine]
        truth = _truth(p.name)
        assert len(boxes) == len(truth) == int(fields[p.name]["cells_found"])
        assert (box_iou(boxes, truth).max(axis=0) >= 0.5).all()
        assert fields[p.name]["scale_source"] == "ruler" and float(fields[p.name]["um_per_px"]) > 0
        overlay = out / fields[p.name]["overlay"]
        with Image.open(overlay) as im, Image.open(p) as src:
            assert im.format == "PNG" and im.size == src.size
    data = json.loads((out / "detections.json").read_text())
    assert data["totals"] == {
        "fields": 8,
        "fields_with_error": 1,
        "fields_without_cells": 1,
        "cells": 8,
    }


def test_detect_with_a_classifier_adds_class_and_confidence(tmp_path: Path) -> None:
    out = tmp_path / "det"
    pbc = next(p for p in ANNOTATED if field(p)[2] == "PBC")
    r = _invoke("detect", "pbc6", str(pbc), "--out", str(out), "--tta", "none", "--no-progress")
    assert r.exit_code == 0, r.output
    (cell,) = _rows(out / "detections.csv")
    assert cell["class"] in ("BAS", "EOS", "LYT", "MON", "NGB", "NGS")
    probs = [float(cell[f"p_{c}"]) for c in ("BAS", "EOS", "LYT", "MON", "NGB", "NGS")]
    assert float(cell["confidence"]) == pytest.approx(max(probs), abs=1e-5)
    assert abs(sum(probs) - 1) < 1e-4


def test_count_fields_writes_a_differential_with_each_cell_linked_to_its_box(
    sample: Path, tmp_path: Path
) -> None:
    out = tmp_path / "count"
    r = _invoke(
        "count",
        "pbc6",
        str(sample),
        "--fields",
        "--out",
        str(out),
        "--tta",
        "none",
        "--evidence",
        "0",
    )
    assert r.exit_code == 0, r.output
    data = json.loads((out / "count.json").read_text())
    t = data["totals"]
    assert t["fields"] == 7 and t["cells_found"] == 8 and t["fields_without_cells"] == 1
    assert t["unreadable"] == 1 and t["identified"] + t["unidentified"] == 8
    assert sum(row["count"] for row in data["differential"]) == t["identified"]
    cells = _rows(out / "cells.csv")
    assert len([c for c in cells if c["bin"] != "unreadable"]) == 8
    for c in cells:
        if c["bin"] == "unreadable":
            continue
        assert c["file"].startswith(c["field"] + "#")
        assert float(c["x_max"]) > float(c["x_min"]) and float(c["um_per_px"]) > 0
    assert (out / "detections.csv").is_file() and (out / "fields.csv").is_file()
    assert len(list((out / "overlays").glob("*.png"))) == 7
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Fields (7)" in page and "none found" in page


def test_count_without_fields_warns_that_these_are_fields(sample: Path, tmp_path: Path) -> None:
    (sample / "broken.jpg").unlink()
    r = _invoke(
        "count",
        "pbc6",
        str(sample),
        "--out",
        str(tmp_path / "c"),
        "--tta",
        "none",
        "--evidence",
        "0",
        "--workers",
        "1",
    )
    assert r.exit_code == 0, r.output
    assert "look like whole fields" in r.output and "--fields" in r.output


def test_count_fields_flags_hairy_cells_with_grad_cam_evidence_on_the_crops(
    sample: Path, tmp_path: Path
) -> None:
    from harness.bundles import favoured_bundle

    ckpt = favoured_bundle(tmp_path / "hac_model", ["BLA", "HAC", "LYT"], favour=1)
    out = tmp_path / "count"
    r = _invoke("count", str(ckpt), str(sample), "--fields", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "hairy-cell flag: flagged" in r.output
    data = json.loads((out / "count.json").read_text())
    evidence = data["flag"]["evidence"]
    assert len(evidence) == 8 and all("#" in e["file"] for e in evidence)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("gradcam") >= 8


def test_count_fields_at_the_model_scale_records_that_scale(tmp_path: Path) -> None:
    """``--um-per-px model`` cuts every field at the classifier's training scale and says so in
    ``fields.csv`` (source ``model``, as ``detect`` records it), not as a scale the user typed."""
    from marrowscope.inference import Predictor
    from marrowscope.inference.fields import crop_spec

    folder = tmp_path / "smear"
    folder.mkdir()
    for p in ANNOTATED[:2]:
        shutil.copyfile(p, folder / p.name)
    out = tmp_path / "count"
    r = _invoke(
        "count", "pbc6", str(folder), "--fields", "--um-per-px", "model", "--out", str(out),
        "--tta", "none", "--evidence", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    want = crop_spec(Predictor.from_pretrained("pbc6", device="cpu")).um_per_px
    rows = _rows(out / "fields.csv")
    assert len(rows) == 2
    for row in rows:
        assert row["scale_source"] == "model"
        assert float(row["um_per_px"]) == pytest.approx(want, rel=1e-4)

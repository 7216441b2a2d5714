"""The files of a count (count.json, cells.csv, report.html, cells/) from a hand-made result."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowscope.metrics.counting import CountError, Evidence, tally
from marrowscope.reports.count_files import CellCall, CountResult, write_count_outputs
from marrowscope.utils.io import staging_folder

CLASSES = ("BLA", "HAC", "LYT")


def _result(folder: Path, *, cam: bool = True) -> CountResult:
    """Six cells: 3 BLA, 2 HAC (one evidence cell drawn), 1 unidentified, plus one unreadable."""
    rng = np.random.default_rng(0)
    plan = [("b1.png", 0, 0.9), ("b2.png", 0, 0.8), ("s/b3.png", 0, 0.7),
            ("h1.png", 1, 0.95), ("h2.png", 1, 0.6), ("x.png", 2, 0.4)]  # fmt: skip
    cells = []
    for rel, k, p in plan:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / rel)
        probs = np.full(3, (1 - p) / 2, np.float32)
        probs[k] = p
        cells.append(CellCall(str(folder / rel), rel, CLASSES[k], p, p >= 0.5, probs))
    t = tally((c.predicted for c in cells if c.identified), CLASSES)
    rgb = np.zeros((32, 32, 3), np.uint8)
    ev = Evidence(cells[3], 0.95, rgb=rgb, overlay=rgb + 100 if cam else None)
    flag = replace(t.flag, evidence=(ev,), evidence_note=None if cam else "no Grad-CAM")
    return CountResult(
        sample=folder.name,
        sample_dir=str(folder),
        created="2025-01-01T10:00:00+00:00",
        classes=CLASSES,
        threshold=0.5,
        cells=tuple(cells),
        counts=t.counts,
        percents=t.percents,
        unreadable=((str(folder / "bad.jpg"), "bad.jpg: not a readable image file"),),
        ignored=(str(folder / "notes.txt"),),
        flag=flag,
        model={
            "arch": "paper_cnn",
            "name": None,
            "classes": list(CLASSES),
            "bundle_version": "0.1.0",
            "checkpoint": "runs/x/best",
            "backend": "torch",
            "input_size": 32,
            "denoise": False,
        },
    )


def test_json_csv_page_and_pictures(tmp_path: Path) -> None:
    res = _result(tmp_path / "S-1")
    out = tmp_path / "report"
    paths = write_count_outputs(res, out, gallery=2)
    assert set(paths) == {"report", "json", "csv", "cells"}
    data = json.loads(paths["json"].read_text())
    expected = res.to_dict()
    expected["flag"]["evidence"][0].update(
        name="h1.png",
        cell_image="cells/evidence/00001_h1_cell.jpg",
        cam_image="cells/evidence/00002_h1_gradcam.jpg",
    )  # count.json also says where the page's evidence pictures are
    assert data == {**expected, "outputs": {"report": "report.html", "cells_csv": "cells.csv"}}
    assert data["totals"] == {
        "images": 7,
        "identified": 5,
        "unidentified": 1,
        "unreadable": 1,
        "ignored": 1,
    }
    assert data["differential"] == [
        {"class": "BLA", "count": 3, "percent": 60.0},
        {"class": "HAC", "count": 2, "percent": 40.0},
        {"class": "LYT", "count": 0, "percent": 0.0},
    ]
    assert data["flag"]["status"] == "flagged" and data["settings"]["hac_class"] == "HAC"
    assert data["flag"]["evidence"][0]["path"] == str(tmp_path / "S-1" / "h1.png")
    rows = list(csv.DictReader(paths["csv"].open(encoding="utf-8")))
    assert [r["file"] for r in rows] == ["b1.png", "b2.png", "s/b3.png", "h1.png", "h2.png",
                                         "x.png", ""]  # fmt: skip
    assert [r["bin"] for r in rows].count("counted") == 5
    assert rows[5]["bin"] == "unidentified" and rows[6]["bin"] == "unreadable"
    assert rows[6]["error"] == "bad.jpg: not a readable image file"
    assert rows[3]["p_HAC"] == "0.950000" and rows[0]["confidence"] == "0.900000"
    pictures = sorted(p.relative_to(out / "cells").as_posix() for p in out.rglob("*.jpg"))
    assert pictures == [
        "00_BLA/00003_b1.jpg",  # gallery=2: the two most confident BLA cells
        "00_BLA/00004_b2.jpg",
        "01_HAC/00005_h1.jpg",
        "01_HAC/00006_h2.jpg",
        "evidence/00001_h1_cell.jpg",
        "evidence/00002_h1_gradcam.jpg",
        "unidentified/00007_x.jpg",
    ]
    html = paths["report"].read_text(encoding="utf-8")
    assert all(f'cells/{p}"' in html for p in pictures)


def test_evidence_without_gradcam_gets_a_thumbnail(tmp_path: Path) -> None:
    res = _result(tmp_path / "S-2", cam=False)
    ev = replace(res.flag.evidence[0], rgb=None)
    res = replace(res, flag=replace(res.flag, evidence=(ev,)))
    out = tmp_path / "r"
    write_count_outputs(res, out, gallery=0)
    assert sorted(p.name for p in (out / "cells").rglob("*.jpg")) == ["00001_h1.jpg"]
    assert json.loads((out / "count.json").read_text())["flag"]["evidence_note"] == "no Grad-CAM"


def test_rerun_replaces_cells_and_bad_folders_are_refused(tmp_path: Path) -> None:
    res = _result(tmp_path / "S-3")
    out = tmp_path / "r"
    write_count_outputs(res, out, gallery=5)
    before = len(list((out / "cells").rglob("*.jpg")))
    write_count_outputs(res, out, gallery=0)
    after = len(list((out / "cells").rglob("*.jpg")))
    assert (before, after) == (8, 2) and not list(out.glob(".cells*"))
    # a crashed run's staging folder is removed; a running one's (this process here) is not
    (out / ".cells.tmp-0badf00d").mkdir()
    running = staging_folder(out / "cells")
    write_count_outputs(res, out, gallery=1)
    assert list(out.glob(".cells*")) == [running]
    running.rmdir()
    (tmp_path / "other" / "cells").mkdir(parents=True)
    with pytest.raises(CountError, match="was not written by 'marrowscope count'"):
        write_count_outputs(res, tmp_path / "other")
    assert not list((tmp_path / "other").glob(".cells*"))  # nothing half-written left
    (tmp_path / "file").write_text("x")
    with pytest.raises(CountError, match="is a file; --out names a folder"):
        write_count_outputs(res, tmp_path / "file")
    with pytest.raises(CountError, match="gallery must be >= 0"):
        write_count_outputs(res, out, gallery=-1)

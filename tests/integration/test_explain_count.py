"""End to end: `marrowscope explain` and `marrowscope count` on a tiny saved bundle."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from harness.bundles import favoured_bundle
from PIL import Image
from typer.testing import CliRunner

from marrowscope.cli.main import app

pytestmark = pytest.mark.integration
runner = CliRunner()
SCRIPT_NAME = "<script>alert(1)<!--.jpg"


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """Seven cells (one nested, one with an HTML-like name), a broken file and a note."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "P-001"
    (folder / "slide2").mkdir(parents=True)
    names = ["c0.jpg", "c1.png", "c2.jpg", "c3.jpg", "c4.png", "slide2/c5.jpg", SCRIPT_NAME]
    for name in names:
        arr = rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (folder / "README.txt").write_text("not an image")
    return folder


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.imgs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        if tag == "img":
            self.imgs.append(str(dict(attrs)["src"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_count_flags_hac_and_writes_a_self_contained_report(sample: Path, tmp_path: Path) -> None:
    ckpt = favoured_bundle(tmp_path / "hac_model", ["BLA", "HAC", "LYT"], favour=1)
    out = tmp_path / "report"
    res = _invoke("count", str(ckpt), str(sample), "--out", str(out), "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "hairy-cell flag: flagged" in res.output
    assert "broken.jpg" in res.output
    data = json.loads((out / "count.json").read_text())
    assert data["totals"] == {
        "images": 8,
        "identified": 7,
        "unidentified": 0,
        "unreadable": 1,
        "ignored": 1,
    }
    assert data["differential"] == [
        {"class": "BLA", "count": 0, "percent": 0.0},
        {"class": "HAC", "count": 7, "percent": 100.0},
        {"class": "LYT", "count": 0, "percent": 0.0},
    ]
    assert data["flag"]["status"] == "flagged"
    assert data["flag"]["by_percent"] and data["flag"]["by_count"]
    assert len(data["flag"]["evidence"]) == 7
    rows = list(csv.DictReader((out / "cells.csv").open(encoding="utf-8")))
    assert {r["file"] for r in rows if r["bin"] == "counted"} >= {"slide2/c5.jpg", SCRIPT_NAME}
    html = (out / "report.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    text = " ".join(" ".join(page.text).split())
    assert page.scripts == 0 and "&lt;script&gt;" in html
    assert "Hairy-cell flag: FLAGGED for review" in text
    assert "not a clinical decision rule" in text
    assert "Research use only." in text
    # Self-contained: every picture is a relative link to a file inside the report folder.
    assert page.imgs and all(not s.startswith(("/", "http")) for s in page.imgs)
    assert all((out / s).is_file() for s in page.imgs)
    assert sum("gradcam" in s for s in page.imgs) == 7


def test_count_threshold_and_model_without_hac(sample: Path, tmp_path: Path) -> None:
    ckpt = favoured_bundle(tmp_path / "plain", ["BLA", "LYT"])
    out = tmp_path / "r"
    for decode in ("auto", "processes"):
        res = _invoke(
            "count", str(ckpt), str(sample), "-o", str(out), "--threshold", "1.0",
            "--workers", "1", "--decode", decode,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads((out / "count.json").read_text())
        assert data["totals"]["identified"] == 0 and data["totals"]["unidentified"] == 7
    assert data["flag"]["status"] == "not available"
    assert "no HAC class" in data["flag"]["message"]
    assert "hairy-cell flag: not available" in res.output


def test_count_bad_inputs_are_one_clear_line(tmp_path: Path) -> None:
    ckpt = favoured_bundle(tmp_path / "m", ["BLA", "HAC"])
    (tmp_path / "empty").mkdir()
    res = _invoke("count", str(ckpt), str(tmp_path / "empty"), "-o", str(tmp_path / "r"))
    assert res.exit_code == 2
    assert "no cell images in this sample folder" in res.output and "Traceback" not in res.output
    res = _invoke("count", str(tmp_path / "nope"), str(tmp_path / "empty"))
    assert res.exit_code == 2 and "nope" in res.output
    res = _invoke("count", str(ckpt), str(tmp_path / "empty"), "--hac-count", "0")
    assert res.exit_code == 2
    res = _invoke("count", str(ckpt), str(tmp_path / "empty"), "--fields", "--decode", "threads")
    assert res.exit_code == 2 and "--decode is for a folder of cell images" in res.output
    res = _invoke("count", str(ckpt), str(tmp_path / "empty"), "--decode", "gpu")
    assert res.exit_code == 2 and "--decode must be auto, processes or threads" in res.output


def test_explain_writes_overlays_and_contact_sheet(sample: Path, tmp_path: Path) -> None:
    ckpt = favoured_bundle(tmp_path / "m", ["BLA", "HAC", "LYT"])
    out = tmp_path / "cams"
    (sample / "slide2" / "notes.txt").write_text("not a cell")
    res = _invoke(
        "explain",
        str(ckpt),
        str(sample / "c0.jpg"),
        str(sample / "slide2"),
        str(sample / "c[12].*"),
        str(sample / "broken.jpg"),
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    assert "4 overlay(s)" in res.output and "broken.jpg" in res.output
    assert "skipped 1 file(s) that are not images by their extension (notes.txt)" in " ".join(
        res.output.split()
    )
    names = sorted(p.name for p in out.glob("*_gradcam.png"))
    assert names == ["c0_gradcam.png", "c1_gradcam.png", "c2_gradcam.png", "c5_gradcam.png"]
    with Image.open(out / "c0_gradcam.png") as im:
        assert im.size == (32, 32)
    with Image.open(out / "contact_sheet.png") as im:
        assert im.width > 300
    rows = list(csv.DictReader((out / "explain.csv").open(encoding="utf-8")))
    assert {r["target"] for r in rows if r["overlay"]} <= {"BLA", "HAC", "LYT"}
    assert {r["method"] for r in rows if r["overlay"]} == {"gradcam-elementwise"}  # the default


def test_explain_method_option(sample: Path, tmp_path: Path) -> None:
    """--method picks the activation-map method and explain.csv records it; an unknown one is
    refused with the list before any work."""
    ckpt = favoured_bundle(tmp_path / "m", ["BLA", "HAC", "LYT"])
    out = tmp_path / "a"
    res = _invoke(
        "explain", str(ckpt), str(sample / "c0.jpg"), "-o", str(out), "--method", "gradcam"
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "explain.csv").open(encoding="utf-8")))
    assert [r["method"] for r in rows] == ["gradcam"]
    res = _invoke("explain", str(ckpt), str(sample), "-o", str(tmp_path / "b"), "--method", "cam")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "unknown CAM method 'cam'; use one of: gradcam-elementwise, gradcam, layercam" in text
    assert not (tmp_path / "b").exists()


def test_explain_class_option(sample: Path, tmp_path: Path) -> None:
    ckpt = favoured_bundle(tmp_path / "m", ["BLA", "HAC", "LYT"])
    res = _invoke("explain", str(ckpt), str(sample), "-o", str(tmp_path / "a"), "--class", "hac")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "a" / "explain.csv").open(encoding="utf-8")))
    assert {r["target"] for r in rows if r["overlay"]} == {"HAC"}
    res = _invoke("explain", str(ckpt), str(sample), "-o", str(tmp_path / "b"), "--class", "XYZ")
    assert res.exit_code == 2
    assert "no class 'XYZ'" in res.output and "BLA, HAC, LYT" in res.output
    assert not (tmp_path / "b").exists()

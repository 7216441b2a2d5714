"""The count report page: table, chart, flag box, disclaimer, galleries, escaping; no torch."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from marrowscope.reports.count_report import (
    DISCLAIMER,
    count_bar_chart_svg,
    render_count_report,
    write_count_report,
)


def _data(status: str = "flagged", **over: Any) -> dict[str, Any]:
    evidence = [
        {"name": "h2.jpg", "probability": 0.99, "cell_image": "cells/evidence/00001_h2_cell.jpg",
         "cam_image": "cells/evidence/00002_h2_gradcam.jpg"},
    ]  # fmt: skip
    data: dict[str, Any] = {
        "sample": "P-017",
        "sample_dir": "/data/P-017",
        "created": "2025-03-01T10:15:00+01:00",
        "marrowscope_version": "0.1.0",
        "model": {
            "arch": "resnet50",
            "name": "paper-resnet50",
            "classes": ["BLA", "HAC", "LYT", "NIF"],
            "bundle_version": "0.1.0",
            "checkpoint": "runs/x/best",
            "backend": "torch",
            "input_size": 224,
            "denoise": True,
        },  # fmt: skip
        "settings": {
            "threshold": 0.5,
            "hac_class": "HAC",
            "hac_min_percent": 2.0,
            "hac_min_count": 5,
        },  # fmt: skip
        "totals": {
            "images": 13,
            "identified": 10,
            "unidentified": 2,
            "unreadable": 1,
            "ignored": 0,
        },  # fmt: skip
        "differential": [
            {"class": "BLA", "count": 3, "percent": 30.0},
            {"class": "HAC", "count": 6, "percent": 60.0},
            {"class": "LYT", "count": 1, "percent": 10.0},
            {"class": "NIF", "count": 0, "percent": 0.0},
        ],
        "flag": {
            "status": status,
            "message": "6 of 10 identified cells (60.0%) are called HAC: at least 2% ...",
            "hac_class": None if status == "not available" else "HAC",
            "count": 6,
            "percent": 60.0,
            "min_percent": 2.0,
            "min_count": 5,
            "evidence": [] if status == "not available" else evidence,
            "evidence_note": None,
        },  # fmt: skip
        "gallery": [
            {
                "class": "BLA",
                "count": 3,
                "shown": 1,
                "cells": [
                    {
                        "name": "<script>alert(1)</script>.jpg",
                        "confidence": 0.91,
                        "image": "cells/00_BLA/00003_script.jpg",
                    }
                ],
            },
        ],  # fmt: skip
        "unidentified": {
            "count": 2,
            "shown": 1,
            "cells": [
                {
                    "name": "u 1.jpg",
                    "predicted": "LYT",
                    "confidence": 0.4996,
                    "image": "cells/unidentified/00009_u 1.jpg",
                }
            ],
        },  # fmt: skip
        "unreadable": [{"path": "/data/P-017/bad&.jpg", "error": "not a readable image file"}],
    }
    data.update(over)
    return data


class _Page(HTMLParser):
    """Collects text, table rows, image sources and element ids; checks tags are balanced."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "path", "use", "rect", "line", "stop"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.rows: list[list[str]] = []
        self.imgs: list[str] = []
        self.ids: set[str] = set()
        self.stack: list[str] = []
        self.scripts = 0
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(str(a.get("src")))
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.imgs.append(str(dict(attrs).get("src")))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    assert page.stack == [], page.stack
    return page


def test_report_has_table_chart_flag_and_disclaimer() -> None:
    html = render_count_report(_data())
    page = _parse(html)
    text = " ".join(" ".join(page.text).split())
    assert ["BLA", "Blast", "3", "30.0%"] in page.rows
    assert ["HAC", "Hairy cell", "6", "60.0%"] in page.rows
    assert ["NIF", "Not identifiable", "0", "0.0%"] in page.rows  # zero counts listed
    assert ["Identified cells", "10", "100.0%"] in page.rows
    assert "Hairy-cell flag: FLAGGED for review" in text
    assert "6 of 10 identified cells (60.0%) are called HAC" in text
    assert "HAC cells ≥ 2.0% of identified cells or ≥ 5 HAC cells" in text
    assert " ".join(DISCLAIMER.split()[3:12]) in text
    assert "not a clinical decision rule" in text
    assert "Non-cell classes (NIF)" in text
    assert "<svg" in html and "Differential count bar chart" in html
    assert {"hairy-cell-flag", "differential", "unidentified", "gallery", "unreadable"} <= page.ids
    assert page.imgs == [
        "cells/evidence/00001_h2_cell.jpg",
        "cells/evidence/00002_h2_gradcam.jpg",
        "cells/unidentified/00009_u%201.jpg",  # URL-quoted relative link
        "cells/00_BLA/00003_script.jpg",
    ]
    # A cell just below the threshold never reads as reaching it.
    assert "LYT? 49%" in text


def test_file_names_are_escaped() -> None:
    html = render_count_report(_data())
    page = _parse(html)
    assert page.scripts == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    assert "<script>alert(1)</script>.jpg" in " ".join(page.text)  # shown as text
    assert "/data/P-017/bad&amp;.jpg" in html


def test_not_flagged_and_not_available_states() -> None:
    clear = " ".join(_parse(render_count_report(_data("not flagged"))).text)
    assert "Hairy-cell flag: not flagged" in clear and "FLAGGED" not in clear
    msg = "The model has no HAC class (its classes: BLA, LYT)."
    data = _data("not available")
    data["flag"]["message"] = msg
    na = " ".join(" ".join(_parse(render_count_report(data)).text).split())
    assert "Hairy-cell flag: not available" in na and msg in na
    assert "Flag rule" not in na and "Evidence:" not in na


def test_bar_chart_highlights_hac_and_has_no_fixed_size() -> None:
    svg = count_bar_chart_svg(_data()["differential"], highlight="HAC")
    assert svg.startswith("<svg") and "viewBox" in svg
    assert 'width="' not in svg.split(">", 1)[0]
    assert "#c0392b" in svg and "60.0% (6)" in svg


def test_missing_key_is_an_error_and_writes_are_atomic(tmp_path: Path) -> None:
    from jinja2 import UndefinedError

    data = _data()
    del data["totals"]
    with pytest.raises(UndefinedError):
        render_count_report(data)
    out = write_count_report(_data(), tmp_path / "r" / "report.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_rendering_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, json; from marrowscope.reports.count_report import write_count_report; "
        f"write_count_report(json.loads(sys.argv[1]), {str(tmp_path / 'r.html')!r}); "
        "print('LOADED:' + ','.join(m for m in ('torch', 'timm', 'matplotlib.pyplot') "
        "if m in sys.modules))"
    )
    import json

    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(_data())],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "LOADED:\n" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "r.html").stat().st_size > 0

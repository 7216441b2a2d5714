"""count_sample / write_count_outputs on a tiny real model whose probabilities are set per file."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marrowscope.config import ModelConfig
from marrowscope.engine.count import count_sample
from marrowscope.inference.predictor import PathPrediction, Predictor
from marrowscope.metrics.counting import FLAGGED, NOT_AVAILABLE, NOT_FLAGGED, CountError
from marrowscope.models.registry import build_model
from marrowscope.reports.count_files import write_count_outputs

CLASSES = ["BLA", "HAC", "LYT", "MON"]

# file stem -> (class index, top probability); the rest of the mass is spread evenly.
PLAN = {
    "b1": (0, 0.90),
    "b2": (0, 0.95),
    "b3": (0, 0.60),
    "b4": (0, 0.80),
    "h1": (1, 0.70),
    "h2": (1, 0.99),
    "l1": (2, 0.70),
    "l2": (2, 0.72),
    "l3": (2, 0.90),
    "x1": (0, 0.40),  # below the default 0.5 threshold: unidentified
}


def _probs(k: int, p: float, n: int) -> np.ndarray:
    out = np.full(n, (1.0 - p) / (n - 1), np.float32)
    out[k] = p
    return out


def _sample(folder: Path, plan: dict[str, tuple[int, float]] = PLAN) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(plan):
        sub = folder / ("slide2" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(sub / f"{stem}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def _predictor(classes: list[str] = CLASSES, plan: dict = PLAN) -> Predictor:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="paper_cnn", pretrained=False), len(classes), input_size=32
    )
    pred = Predictor.from_model(model, {"classes": classes}, device="cpu")

    def fake_predict_paths(paths, *, workers=0, progress=True, decode="auto"):  # type: ignore[no-untyped-def]
        for p in paths:
            stem = Path(p).stem
            if stem not in plan:
                yield PathPrediction(str(p), None, f"{p}: not a readable image file")
            else:
                k, top = plan[stem]
                yield PathPrediction(str(p), _probs(k, top, len(classes)))

    pred.predict_paths = fake_predict_paths  # type: ignore[method-assign]
    return pred


def test_counts_and_percentages_by_hand(tmp_path: Path) -> None:
    res = count_sample(_predictor(), _sample(tmp_path / "P01"), progress=False)
    assert res.sample == "P01"
    assert res.counts == {"BLA": 4, "HAC": 2, "LYT": 3, "MON": 0}  # every class, zeros too
    assert res.percents["BLA"] == pytest.approx(400 / 9)
    assert res.percents["HAC"] == pytest.approx(200 / 9)
    assert res.percents["MON"] == 0.0
    assert sum(res.percents.values()) == pytest.approx(100.0)
    assert [c.rel for c in res.unidentified] == ["slide2/x1.png"]
    assert res.unreadable == ((str(tmp_path / "P01" / "broken.jpg"), res.unreadable[0][1]),)
    assert res.ignored == (str(tmp_path / "P01" / "notes.txt"),)
    assert res.totals() == {
        "images": 11,
        "identified": 9,
        "unidentified": 1,
        "unreadable": 1,
        "ignored": 1,
    }
    assert {c.rel for c in res.cells} >= {"slide2/b1.png", "b2.png"}  # recursive, relative


def test_threshold_moves_cells_to_unidentified(tmp_path: Path) -> None:
    res = count_sample(_predictor(), _sample(tmp_path / "s"), threshold=0.75, progress=False)
    # 0.60, 0.70, 0.70, 0.72 and 0.40 are below 0.75
    assert res.counts == {"BLA": 3, "HAC": 1, "LYT": 1, "MON": 0}
    assert sorted(c.rel for c in res.unidentified) == [
        "b3.png", "h1.png", "l2.png", "slide2/l1.png", "slide2/x1.png",
    ]  # fmt: skip
    assert res.percents["BLA"] == pytest.approx(60.0)
    everything = count_sample(_predictor(), tmp_path / "s", threshold=0.0, progress=False)
    assert sum(everything.counts.values()) == 10


def test_hac_flag_by_percent_by_count_and_not(tmp_path: Path) -> None:
    sample = _sample(tmp_path / "s")
    pred = _predictor()
    # 2 HAC of 9 identified = 22.2 %
    by_pct = count_sample(pred, sample, hac_min_percent=20, hac_min_count=5, progress=False)
    assert by_pct.flag.status == FLAGGED and by_pct.flag.by_percent and not by_pct.flag.by_count
    assert "2 of 9 identified cells (22.2%) are called HAC" in by_pct.flag.message
    by_count = count_sample(pred, sample, hac_min_percent=50, hac_min_count=2, progress=False)
    assert by_count.flag.status == FLAGGED and by_count.flag.by_count
    assert not by_count.flag.by_percent
    neither = count_sample(pred, sample, hac_min_percent=50, hac_min_count=3, progress=False)
    assert neither.flag.status == NOT_FLAGGED and not neither.flag.flagged
    assert "below both rules" in neither.flag.message
    exact = count_sample(pred, sample, hac_min_percent=200 / 9, hac_min_count=9, progress=False)
    assert exact.flag.flagged  # "at least": the boundary fires


def test_hac_evidence_is_the_top_hac_cells_with_gradcam(tmp_path: Path) -> None:
    sample = _sample(tmp_path / "s")
    res = count_sample(_predictor(), sample, evidence=1, progress=False)
    (ev,) = res.flag.evidence
    assert ev.cell.rel == "h2.png" and ev.probability == pytest.approx(0.99)
    assert ev.rgb is not None and ev.rgb.shape == (32, 32, 3)
    assert ev.overlay is not None and ev.overlay.shape == (32, 32, 3)
    both = count_sample(_predictor(), sample, evidence=8, progress=False).flag.evidence
    assert [e.cell.rel for e in both] == ["h2.png", "h1.png"]  # only HAC calls, best first
    assert count_sample(_predictor(), sample, evidence=0, progress=False).flag.evidence == ()


def test_no_hac_class_means_not_available(tmp_path: Path) -> None:
    plan = {"a": (0, 0.9), "b": (1, 0.9), "c": (1, 0.9)}
    res = count_sample(
        _predictor(["BLA", "LYT"], plan), _sample(tmp_path / "s", plan), progress=False
    )
    assert res.flag.status == NOT_AVAILABLE
    assert res.flag.message.startswith("The model has no HAC class")
    assert res.flag.evidence == () and not res.flag.flagged


def test_bad_sample_folders_and_settings(tmp_path: Path) -> None:
    pred = _predictor()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CountError, match="empty: no cell images in this sample folder"):
        count_sample(pred, tmp_path / "empty", progress=False)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(CountError, match=r"found 1 other file"):
        count_sample(pred, tmp_path / "txt", progress=False)
    with pytest.raises(CountError, match="no such sample folder"):
        count_sample(pred, tmp_path / "missing", progress=False)
    sample = _sample(tmp_path / "s")
    with pytest.raises(CountError, match="threshold must be a probability"):
        count_sample(pred, sample, threshold=1.5, progress=False)
    with pytest.raises(CountError, match="HAC percentage rule"):
        count_sample(pred, sample, hac_min_percent=0, progress=False)
    with pytest.raises(CountError, match="HAC count rule"):
        count_sample(pred, sample, hac_min_count=0, progress=False)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"] or "")


def test_write_count_outputs(tmp_path: Path) -> None:
    res = count_sample(_predictor(), _sample(tmp_path / "s"), hac_min_count=2, progress=False)
    out = tmp_path / "report"
    paths = write_count_outputs(res, out, gallery=2)
    data = json.loads(paths["json"].read_text())
    assert data["totals"]["identified"] == 9
    assert {r["class"]: r["count"] for r in data["differential"]} == res.counts
    assert data["flag"]["status"] == FLAGGED and data["flag"]["by_count"]
    assert data["settings"] == {
        "threshold": 0.5,
        "hac_class": "HAC",
        "hac_min_percent": 2.0,
        "hac_min_count": 2,
    }
    rows = list(csv.DictReader(paths["csv"].open(encoding="utf-8")))
    assert len(rows) == 11
    assert sorted(r["bin"] for r in rows).count("counted") == 9
    assert [r["file"] for r in rows if r["bin"] == "unidentified"] == ["slide2/x1.png"]
    assert [r["error"] != "" for r in rows if r["bin"] == "unreadable"] == [True]
    assert float(next(r for r in rows if r["file"] == "h2.png")["p_HAC"]) == pytest.approx(0.99)
    # Every picture the page links exists, inside the report folder.
    page = _Collector()
    page.feed(paths["report"].read_text(encoding="utf-8"))
    assert page.imgs and all((out / src).is_file() for src in page.imgs)
    assert len([s for s in page.imgs if "/00_BLA/" in s]) == 2  # gallery limit
    assert len([s for s in page.imgs if "/evidence/" in s]) == 4  # 2 cells + 2 CAMs
    # A rerun replaces cells/ (no stale pictures); a foreign cells/ folder is refused.
    before = set((out / "cells").rglob("*.jpg"))
    write_count_outputs(res, out, gallery=1)
    after = set((out / "cells").rglob("*.jpg"))
    assert len(after) < len(before) and not list(out.glob(".cells*"))
    (tmp_path / "other" / "cells").mkdir(parents=True)
    with pytest.raises(CountError, match="was not written by 'marrowscope count'"):
        write_count_outputs(res, tmp_path / "other")


def test_engine_count_keeps_its_entry_points() -> None:
    """The CLI imports count_sample, count_fields (``count --fields``), field_like_images (the
    check that single-cell images are not whole fields) and write_count_outputs from
    engine.count; one error class."""
    import marrowscope.engine.count as engine_count

    assert engine_count.write_count_outputs is write_count_outputs
    assert engine_count.CountError is CountError
    assert set(engine_count.__all__) == {
        "CountError",
        "CountResult",
        "count_fields",
        "count_sample",
        "field_like_images",
        "write_count_outputs",
    }

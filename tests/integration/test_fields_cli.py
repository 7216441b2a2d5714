"""End to end on real fields: `marrowscope detect` and `marrowscope count --fields` write boxes,
overlays and a differential count (shipped detector wbc2, the default; shipped classifier pbc6)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from bomb_images import png_header_only
from field_samples import ANNOTATED, BCCD, EMPTY, FIELDS_DIR, field
from PIL import Image
from typer.testing import CliRunner

import marrowscope
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
    (sample / "slide-b" / "notes.txt").write_text("not a field")
    r = _invoke("detect", "none", str(sample), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "8 white cell(s) found" in r.output and "1 field(s) with no white cell" in r.output
    assert "skipped 1 file(s) that are not images by their extension (notes.txt)" in " ".join(
        r.output.split()
    )
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


def test_a_field_above_pillows_own_warning_size_is_refused_by_name_without_its_warning(
    tmp_path: Path,
) -> None:
    """A 10,000 x 10,000 field (above Pillow's ~89 M-pixel warning, below its error): one error
    row that names the file, its size and the 50 M-pixel limit; Pillow's
    DecompressionBombWarning, which would only repeat that, is not shown; the other field is
    still detected."""
    folder = tmp_path / "fields"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png_header_only(10_000, 10_000))
    shutil.copyfile(BCCD, folder / BCCD.name)
    out = tmp_path / "det"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _invoke("detect", "none", str(folder), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBombWarning" not in r.output
    fields = {Path(row["path"]).name: row for row in _rows(out / "fields.csv")}
    assert "huge.png" in fields["huge.png"]["error"]
    assert "10000x10000 = 100,000,000 pixels" in fields["huge.png"]["error"]
    assert "50,000,000-pixel limit of a field" in fields["huge.png"]["error"]
    assert fields["huge.png"]["cells_found"] == "0"
    assert fields[BCCD.name]["cells_found"] == "1" and not fields[BCCD.name]["error"]


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


def test_predict_warns_when_its_images_look_like_whole_fields_and_not_for_crops(
    sample: Path, tmp_path: Path
) -> None:
    """`predict` on whole fields (the shipped test fields) classifies them as asked and says
    they look like fields, with the detect command to use; on real single-cell crops (the
    Matek cells of `make demo`) it says nothing of the kind."""
    r = _invoke("predict", "pbc6", str(sample), "--tta", "none", "--no-progress")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "look like whole fields" in text
    assert "marrowscope detect pbc6 FIELDS... --out DIR" in text and "--fields" in text
    crops = Path(marrowscope.__file__).parent / "sample_data" / "bm"
    r = _invoke("predict", "bm8", str(crops), "--tta", "none", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "192 images, 0 error(s)" in r.output and "whole fields" not in r.output


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


def _count_fields(folder: Path | str, out: Path | None = None):  # type: ignore[no-untyped-def]
    args = ["count", "pbc6", str(folder), "--fields", "--tta", "none", "--evidence", "0"]
    return _invoke(*args, *(["--out", str(out)] if out is not None else []))


def test_count_fields_with_no_usable_field_counts_zero_and_lists_every_error(
    tmp_path: Path,
) -> None:
    """Every field unreadable: still a count of fields (zero cells), each field's error in
    count.json, cells.csv and fields.csv, exit code 1 as for detect, no traceback."""
    folder = tmp_path / "smear-bad"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "count"
    r = _count_fields(folder, out)
    assert r.exit_code == 1, r.output
    assert "0 field(s), 0 white cell(s) found" in r.output and "could be used" in r.output
    data = json.loads((out / "count.json").read_text())
    t = data["totals"]
    assert (t["fields"], t["cells_found"], t["identified"], t["unreadable"]) == (0, 0, 0, 2)
    assert data["mode"] == "fields" and data["fields"] == []
    assert {Path(u["path"]).name for u in data["unreadable"]} == {"broken.jpg", "empty.png"}
    cells = _rows(out / "cells.csv")
    assert "field" in cells[0] and {c["bin"] for c in cells} == {"unreadable"} and len(cells) == 2
    fields = {Path(row["path"]).name: row for row in _rows(out / "fields.csv")}
    assert set(fields) == {"broken.jpg", "empty.png"}
    assert all(row["error"] and row["cells_found"] == "0" for row in fields.values())


def test_count_fields_writes_an_error_row_per_unusable_field_in_fields_csv(
    sample: Path, tmp_path: Path
) -> None:
    """docs/fields.md: an unreadable field is an error row in fields.csv, as detect writes it,
    in the sample's file order."""
    out = tmp_path / "count"
    r = _count_fields(sample, out)
    assert r.exit_code == 0, r.output
    rows = _rows(out / "fields.csv")
    assert len(rows) == 8  # 7 fields + the broken file
    broken = next(row for row in rows if Path(row["path"]).name == "broken.jpg")
    assert broken["error"] and broken["cells_found"] == "0" and not broken["overlay"]
    assert [row["path"] for row in rows] == sorted((row["path"] for row in rows), key=Path)
    data = json.loads((out / "detections.json").read_text())
    assert data["totals"]["fields"] == 8 and data["totals"]["fields_with_error"] == 1


def test_reruns_with_the_output_inside_the_input_do_not_count_earlier_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``detect none nest --out nest/det`` twice, and ``cd nest2; count pbc6 . --fields`` twice
    (default --out inside): the second run sees the same fields as the first."""
    nest = tmp_path / "nest"
    nest.mkdir()
    for p in ANNOTATED[:2]:
        shutil.copyfile(p, nest / p.name)
    for _ in range(2):
        r = _invoke("detect", "none", str(nest), "--out", str(nest / "det"), "--no-progress")
        assert r.exit_code == 0, r.output
        assert "2 field(s)" in r.output
        assert len(_rows(nest / "det" / "fields.csv")) == 2
    assert "skipped 1 folder(s) of marrowscope's own output" in caplog.text
    nest2 = tmp_path / "nest2"
    nest2.mkdir()
    for p in ANNOTATED[:2]:
        shutil.copyfile(p, nest2 / p.name)
    monkeypatch.chdir(nest2)
    for _ in range(2):
        r = _count_fields(".")
        assert r.exit_code == 0, r.output
        data = json.loads((nest2 / "count-nest2" / "count.json").read_text())
        assert data["totals"]["fields"] == 2 and data["totals"]["images"] == 2


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path: Path) -> None:
    """A field named with a Latin-1 byte (b'caf\\xe9.jpg') is detected and counted; the CSV and
    JSON files stay valid UTF-8 and show the byte as \\xe9 (no UnicodeEncodeError at the end)."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
            f.write(ANNOTATED[0].read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    shutil.copyfile(ANNOTATED[1], folder / ANNOTATED[1].name)
    out = tmp_path / "det"
    r = _invoke("detect", "none", str(folder), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    names = [Path(row["path"]).name for row in _rows(out / "fields.csv")]
    assert "caf\\xe9.jpg" in names and len(names) == 2
    assert any(Path(c["field"]).name == "caf\\xe9.jpg" for c in _rows(out / "detections.csv"))
    data = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    assert {Path(f["path"]).name for f in data["fields"]} == set(names)
    cout = tmp_path / "count"
    r = _count_fields(folder, cout)
    assert r.exit_code == 0, r.output
    assert any(c["file"].startswith("caf\\xe9.jpg#") for c in _rows(cout / "cells.csv"))
    json.loads((cout / "count.json").read_text(encoding="utf-8"))
    assert "caf\\xe9.jpg" in (cout / "report.html").read_text(encoding="utf-8")


def test_an_unexpected_failure_on_one_field_is_that_fields_error(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error on one field is recorded for that field (its traceback logged once,
    visibly); the other fields and the output files are kept. A failed overlay write (a full
    disk) keeps the field's cells and says so on the field."""
    import marrowscope.engine.detect as detect_mod

    real_analyze, real_write = detect_mod.analyze_field, detect_mod.write_overlay
    one = ANNOTATED[0]

    def broken(rgb, *args, name, **kwargs):  # type: ignore[no-untyped-def]
        if Path(name).name == EMPTY.name:
            raise RuntimeError("a bug")
        return real_analyze(rgb, *args, name=name, **kwargs)

    def full(path: Path, rgb):  # type: ignore[no-untyped-def]
        if one.stem in path.name:
            raise OSError(28, "No space left on device")
        real_write(path, rgb)

    monkeypatch.setattr(detect_mod, "analyze_field", broken)
    monkeypatch.setattr(detect_mod, "write_overlay", full)
    out = tmp_path / "det"
    with caplog.at_level("ERROR", logger="marrowscope.engine.detect"):
        r = _invoke("detect", "none", str(sample), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    fields = {Path(row["path"]).name: row for row in _rows(out / "fields.csv")}
    assert len(fields) == 8
    assert "RuntimeError: a bug" in fields[EMPTY.name]["error"]
    assert EMPTY.name in fields[EMPTY.name]["error"]
    assert "unexpected error" in caplog.text and "a bug" in caplog.text
    assert fields[one.name]["error"] == "" and int(fields[one.name]["cells_found"]) >= 1
    assert fields[one.name]["overlay"] == ""
    assert "the overlay could not be written" in fields[one.name]["warnings"]
    assert sum(1 for row in fields.values() if not row["error"]) == 6


def test_a_rerun_into_the_same_folder_leaves_only_its_own_overlays(
    sample: Path, tmp_path: Path
) -> None:
    out = tmp_path / "det"
    r = _invoke("detect", "none", str(sample), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    assert len(list((out / "overlays").glob("*.png"))) == 7
    one = ANNOTATED[0]
    r = _invoke("detect", "none", str(one), "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    (row,) = _rows(out / "fields.csv")
    assert [p.name for p in (out / "overlays").glob("*.png")] == [Path(row["overlay"]).name]
    # count --fields into the same folder: its overlays replace detect's
    r = _count_fields(sample, out)
    assert r.exit_code == 0, r.output
    assert len(list((out / "overlays").glob("*.png"))) == 7
    # with --no-overlays the earlier run's overlays (in marrowscope's marked folder) go too
    r = _invoke("detect", "none", str(one), "--out", str(out), "--no-progress", "--no-overlays")
    assert r.exit_code == 0, r.output
    assert list((out / "overlays").glob("*.png")) == []
    # an overlays/ folder of the user's (no marker), even of files named as ours, is neither
    # emptied nor mixed with ours, with or without --no-overlays
    for extra in ([], ["--no-overlays"]):
        mine = tmp_path / f"mine{len(extra)}"
        (mine / "overlays").mkdir(parents=True)
        (mine / "overlays" / "notes.txt").write_text("mine")
        (mine / "overlays" / "00012_slide3.png").write_bytes(b"mine")
        r = _invoke("detect", "none", str(one), "--out", str(mine), "--no-progress", *extra)
        if not extra:
            assert r.exit_code == 2
            assert "was not written by this version of marrowscope" in " ".join(r.output.split())
        assert sorted(p.name for p in (mine / "overlays").iterdir()) == [
            "00012_slide3.png",
            "notes.txt",
        ]


def test_count_fields_on_a_folder_without_images_words_it_for_fields(tmp_path: Path) -> None:
    folder = tmp_path / "no-images"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    r = _count_fields(folder, tmp_path / "c")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "no field images" in text and "whole fields of view" in text
    assert "single-cell images" not in text


def test_count_fields_refuses_a_foreign_overlays_folder_before_counting(
    sample: Path, tmp_path: Path
) -> None:
    """A foreign overlays/ in the output folder is found before any field is counted: nothing
    of an earlier count there is replaced and no work is thrown away."""
    out = tmp_path / "c"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "mine.png").write_bytes(b"mine")
    (out / "count.json").write_text("{}")
    r = _count_fields(sample, out)
    assert r.exit_code == 2
    assert "was not written by this version of marrowscope" in " ".join(r.output.split())
    assert sorted(p.name for p in out.rglob("*")) == ["count.json", "mine.png", "overlays"]
    assert (out / "count.json").read_text() == "{}"

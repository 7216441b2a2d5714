"""scan_folder: classes, nested images, hidden/ignored files, unreadable files, sizes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import marrowscope.data.scan as scan_mod
from marrowscope.data import DataError
from marrowscope.data.scan import format_scan, scan_folder


def _img(path: Path, w: int = 12, h: int = 10, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF"}
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, format=fmt[path.suffix.lower()])
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cells"
    _img(root / "BLA" / "0001-1000" / "BLA_00001.jpg")
    _img(root / "BLA" / "0001-1000" / "BLA_00002.JPG")
    _img(root / "BLA" / "BLA_00003.png", w=20, h=20)
    _img(root / "BLA" / ".hidden" / "BLA_00004.jpg")  # hidden folder: skipped
    _img(root / "BLA" / ".BLA_00005.jpg")  # hidden file: skipped
    _img(root / "EOS" / "EOS_1.Png")
    _img(root / "EOS" / "deep" / "er" / "EOS_2.bmp")
    (root / "EOS" / "notes.txt").write_text("not an image")
    (root / "EOS" / "bad.jpg").write_text("not a jpeg")
    (root / "EOS" / "empty.png").write_bytes(b"")
    (root / "EMPTY").mkdir()
    (root / ".git").mkdir()
    _img(root / ".git" / "x.jpg")  # hidden top-level folder: not a class
    (root / "README.md").write_text("top-level file")
    _img(root / "stray.jpg")  # directly in root: ignored
    return root


def test_scan_finds_classes_nested_images_and_ignored_files(tree: Path) -> None:
    res = scan_folder(tree, workers=1, progress=False)
    assert res.classes == ["BLA", "EMPTY", "EOS"]
    assert res.counts == {"BLA": 3, "EMPTY": 0, "EOS": 2}
    assert res.total == 5
    assert res.files["BLA"] == sorted(res.files["BLA"])
    assert {p.name for p in res.files["BLA"]} == {"BLA_00001.jpg", "BLA_00002.JPG", "BLA_00003.png"}
    assert {p.name for p in res.files["EOS"]} == {"EOS_1.Png", "EOS_2.bmp"}
    assert res.empty_classes == ["EMPTY"]
    assert sorted(p.name for p in res.ignored) == ["README.md", "notes.txt", "stray.jpg"]
    assert res.sizes == {(12, 10): 4, (20, 20): 1}


def test_scan_reports_unreadable_files_with_their_names(tree: Path) -> None:
    res = scan_folder(tree, workers=1, progress=False)
    bad = {p.name: msg for p, msg in res.unreadable}
    assert set(bad) == {"bad.jpg", "empty.png"}
    assert "bad.jpg" in bad["bad.jpg"] and "empty" in bad["empty.png"]


def test_scan_without_check_keeps_undecoded_files_but_flags_empty_ones(tree: Path) -> None:
    res = scan_folder(tree, check_images=False, progress=False)
    assert res.counts["EOS"] == 3  # bad.jpg is not decoded, so it counts
    assert [p.name for p, _ in res.unreadable] == ["empty.png"]
    assert res.sizes == {}


def test_parallel_check_equals_serial(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = scan_folder(tree, workers=1, progress=False)
    monkeypatch.setattr(scan_mod, "POOL_MIN_FILES", 2)
    parallel = scan_folder(tree, workers=2, progress=False)
    assert parallel == serial


def test_missing_root_names_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        scan_folder(tmp_path / "nope", progress=False)
    msg = str(info.value)
    assert str(tmp_path / "nope") in msg and "one sub-folder per class" in msg


def test_root_without_class_folders_is_an_error(tmp_path: Path) -> None:
    _img(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_folder(tmp_path / "flat", progress=False)
    with pytest.raises(DataError, match="is a file"):
        scan_folder(tmp_path / "flat" / "a.jpg", progress=False)


def test_format_scan_lists_classes_counts_and_unreadable(tree: Path) -> None:
    res = scan_folder(tree, workers=1, progress=False)
    console = Console(record=True, width=120)
    console.print(format_scan(res))
    text = console.export_text()
    lines: dict[str, list[str]] = {}
    for row in text.splitlines():
        parts = row.replace("│", " ").split()
        if parts and parts[0] in ("BLA", "EOS", "EMPTY", "total"):
            lines[parts[0]] = parts[1:]
    assert lines["BLA"] == ["3", "0"]
    assert lines["EOS"] == ["2", "2"]
    assert lines["EMPTY"] == ["0", "0"]
    assert lines["total"] == ["5", "2"]


@pytest.mark.parametrize("check", [True, False])
def test_a_file_name_that_is_not_utf8_is_reported_not_counted(tmp_path: Path, check: bool) -> None:
    import os

    root = tmp_path / "cells"
    _img(root / "BLA" / "ok.png")
    _img(root / "BLA" / "caf.png").rename(os.fsdecode(str(root / "BLA").encode() + b"/caf\xe9.png"))
    assert scan_folder(root, check_images=check, progress=False).counts == {"BLA": 2}
    res = scan_folder(root, check_images=check, workers=1, progress=False, utf8_names=True)
    assert res.counts == {"BLA": 1}
    [(path, why)] = res.unreadable
    assert path.name.encode("utf-8", "surrogateescape") == b"caf\xe9.png"
    assert "caf\\xe9.png" in why and "not valid UTF-8" in why and "rename the file" in why

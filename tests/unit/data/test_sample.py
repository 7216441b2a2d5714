"""The bundled Matek sample and builtin: roots."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from marrowscope.data import DataError
from marrowscope.data.manifest import build_manifest
from marrowscope.data.sample import BUILTIN_PREFIX, SAMPLE_ROOT, resolve_root
from marrowscope.data.scan import scan_folder

CLASSES = ["ART", "BLA", "EOS", "LYT", "MON", "NGS", "NIF", "PMO"]


def test_builtin_name_resolves_to_the_sample() -> None:
    assert resolve_root(f"{BUILTIN_PREFIX}bm-sample") == SAMPLE_ROOT
    assert SAMPLE_ROOT.is_dir()


def test_unknown_builtin_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        resolve_root("builtin:bm-full")
    assert "builtin:bm-full" in str(info.value) and "builtin:bm-sample" in str(info.value)


def test_plain_path_is_expanded_not_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_root("~/data/cells") == tmp_path / "data" / "cells"
    assert resolve_root("relative/dir") == Path("relative/dir")


def test_sample_has_8_classes_of_24_readable_250px_images() -> None:
    res = scan_folder(SAMPLE_ROOT, check_images=True, workers=1, progress=False)
    assert res.classes == CLASSES
    assert res.counts == dict.fromkeys(CLASSES, 24)
    assert res.unreadable == [] and res.empty_classes == []
    assert res.sizes == {(250, 250): 192}
    assert sorted(p.name for p in res.ignored) == ["MANIFEST.csv", "README.md"]
    for cls, files in res.files.items():
        assert all(p.name.startswith(f"{cls}_") for p in files)
    rows = build_manifest(res, classes=None, max_per_class=None, min_per_class=10, seed=0)
    assert len(rows) == 192


def test_sample_files_match_their_manifest_hashes() -> None:
    with open(SAMPLE_ROOT / "MANIFEST.csv", newline="") as f:
        entries = list(csv.DictReader(f))
    assert len(entries) == 192
    on_disk = {p.relative_to(SAMPLE_ROOT).as_posix() for p in SAMPLE_ROOT.rglob("*.jpg")}
    assert on_disk == {e["path"] for e in entries}
    for e in entries:
        data = (SAMPLE_ROOT / e["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["path"]
        assert e["path"].split("/")[0] == e["class"]


def test_sample_readme_carries_attribution_and_license() -> None:
    text = (SAMPLE_ROOT / "README.md").read_text(encoding="utf-8")
    assert "https://doi.org/10.7937/TCIA.AXH3-T579" in text
    assert "Matek, C., Krappe, S., Münzenmayer, C., Haferlach, T., & Marr, C. (2021)" in text
    assert "CC BY 4.0" in text and "https://creativecommons.org/licenses/by/4.0/" in text
    assert "https://doi.org/10.1182/blood.2020010568" in text
    assert "random.Random(2025)" in text


def test_sample_is_under_8_mb() -> None:
    total = sum(p.stat().st_size for p in SAMPLE_ROOT.rglob("*") if p.is_file())
    assert total < 8_000_000

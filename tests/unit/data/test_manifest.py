"""build_manifest (subset rules), read/write_manifest (CSV), class_names."""

from __future__ import annotations

from pathlib import Path

import pytest

from marrowscope.data import DataError
from marrowscope.data.manifest import (
    ManifestRow,
    build_manifest,
    class_names,
    read_manifest,
    write_manifest,
)
from marrowscope.data.scan import ScanResult


def _scan(tmp_path: Path, counts: dict[str, int]) -> ScanResult:
    """A ScanResult over files that need not exist (build_manifest does not touch them)."""
    root = tmp_path / "root"
    files = {c: [root / c / f"{c}_{i:03d}.jpg" for i in range(n)] for c, n in counts.items()}
    return ScanResult(
        root=root,
        counts=dict(counts),
        files=files,
        sizes={},
        unreadable=[],
        empty_classes=[c for c, n in counts.items() if n == 0],
        ignored=[],
    )


def test_build_keeps_given_class_order_sorted_absolute_paths(tmp_path: Path) -> None:
    scan = _scan(tmp_path, {"AAA": 3, "BBB": 2, "CCC": 4})
    rows = build_manifest(scan, classes=["CCC", "AAA"], max_per_class=None, min_per_class=1, seed=0)
    assert [r.label for r in rows] == ["CCC"] * 4 + ["AAA"] * 3
    assert [r.path for r in rows[:4]] == sorted(r.path for r in rows[:4])
    assert all(Path(r.path).is_absolute() and r.split is None for r in rows)
    every = build_manifest(scan, classes=None, max_per_class=None, min_per_class=1, seed=0)
    assert class_names(every) == ["AAA", "BBB", "CCC"]


def test_relative_scan_root_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scan = ScanResult(Path("r"), {"A": 1}, {"A": [Path("r/A/x.jpg")]}, {}, [], [], [])
    (row,) = build_manifest(scan, classes=None, max_per_class=None, min_per_class=1, seed=0)
    assert row.path == str(tmp_path / "r" / "A" / "x.jpg")


def test_cap_is_a_seeded_draw(tmp_path: Path) -> None:
    scan = _scan(tmp_path, {"AAA": 50, "BBB": 5})
    a = build_manifest(scan, classes=None, max_per_class=10, min_per_class=1, seed=1)
    b = build_manifest(scan, classes=None, max_per_class=10, min_per_class=1, seed=1)
    c = build_manifest(scan, classes=None, max_per_class=10, min_per_class=1, seed=2)
    assert a == b
    assert [r.label for r in a].count("AAA") == 10 and [r.label for r in a].count("BBB") == 5
    assert [r.path for r in a if r.label == "AAA"] != [r.path for r in c if r.label == "AAA"]
    first_ten = [str(p) for p in scan.files["AAA"][:10]]
    assert [r.path for r in a if r.label == "AAA"] != first_ten  # random, not the first files
    # a class's draw does not depend on which other classes are kept
    only_a = build_manifest(scan, classes=["AAA"], max_per_class=10, min_per_class=1, seed=1)
    assert only_a == [r for r in a if r.label == "AAA"]


def test_missing_class_lists_available(tmp_path: Path) -> None:
    scan = _scan(tmp_path, {"AAA": 3, "BBB": 3})
    with pytest.raises(DataError) as info:
        build_manifest(scan, classes=["AAA", "HAC"], max_per_class=None, min_per_class=1, seed=0)
    msg = str(info.value)
    assert "HAC" in msg and "AAA, BBB" in msg


def test_empty_class_names_class_and_fix(tmp_path: Path) -> None:
    scan = _scan(tmp_path, {"AAA": 3, "NIL": 0})
    with pytest.raises(DataError) as info:
        build_manifest(scan, classes=["AAA", "NIL"], max_per_class=None, min_per_class=1, seed=0)
    assert "NIL" in str(info.value) and "--classes" in str(info.value)
    with pytest.raises(DataError, match="NIL"):
        build_manifest(scan, classes=None, max_per_class=None, min_per_class=1, seed=0)


def test_too_few_images_names_class_count_and_fix(tmp_path: Path) -> None:
    scan = _scan(tmp_path, {"AAA": 30, "NGB": 1})
    with pytest.raises(DataError) as info:
        build_manifest(scan, classes=None, max_per_class=None, min_per_class=10, seed=0)
    msg = str(info.value)
    assert "NGB" in msg and "only 1 usable" in msg and "--min-per-class 1" in msg
    assert "--set data.min_per_class=1" in msg  # the form train and cv take


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    rows = [
        ManifestRow(str(tmp_path / "a, with comma.jpg"), "AAA", "train", "p1"),
        ManifestRow(str(tmp_path / "b.jpg"), "BBB", "test", None),
        ManifestRow(str(tmp_path / "c.jpg"), "AAA", None, None),
    ]
    out = tmp_path / "sub" / "manifest.csv"
    write_manifest(rows, out)
    assert out.read_text().splitlines()[0] == "path,label,split,group"
    assert read_manifest(out) == rows
    assert list(out.parent.glob(".*tmp")) == []  # no temp file left behind


def test_read_resolves_relative_paths_and_maps_group_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "data" / "m.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "label,path,patient,split,extra\nAAA,img/a.jpg,P01,Train,x\nBBB,/abs/b.jpg,P02,,y\n\n"
    )
    rows = read_manifest(csv_path, group_column="patient")
    assert rows == [
        ManifestRow(str(tmp_path / "data" / "img" / "a.jpg"), "AAA", "train", "P01"),
        ManifestRow("/abs/b.jpg", "BBB", None, "P02"),
    ]
    assert read_manifest(csv_path)[0].group is None  # no 'group' column, none asked for


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("", ["empty", "path,label"]),
        ("path,split\nx.jpg,train\n", ["line 1", "'label'", "path,label"]),
        ("path,label\n", ["no rows"]),
        (
            "path,label,split\na.jpg,A,train\nb.jpg,B,holdout\n",
            ["line 3", "'holdout'", "train, val or test"],
        ),
        ("path,label\na.jpg,\n", ["line 2", "empty label"]),
        ("path,label\na.jpg,A\n./a.jpg,B\n", ["line 3", "line 2", "once"]),
    ],
    ids=["empty", "no-label", "header-only", "bad-split", "no-label-value", "duplicate"],
)
def test_read_errors_name_file_line_and_fix(
    tmp_path: Path, content: str, fragments: list[str]
) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError) as info:
        read_manifest(p)
    msg = str(info.value)
    assert str(p) in msg
    for frag in fragments:
        assert frag in msg


def test_read_missing_group_column_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.jpg,A\n")
    with pytest.raises(DataError, match="'patient'.*group_column"):
        read_manifest(p, group_column="patient")
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "missing.csv")


def test_class_names_in_first_appearance_order() -> None:
    rows = [
        ManifestRow("1", "B"),
        ManifestRow("2", "A"),
        ManifestRow("3", "B"),
        ManifestRow("4", "C"),
    ]
    assert class_names(rows) == ["B", "A", "C"]


def test_a_path_that_is_not_utf8_is_refused_by_name_not_written_wrong(tmp_path: Path) -> None:
    """A manifest must name the real files: a name UTF-8 text cannot hold is refused with the
    file named (its odd byte escaped) and the fix; nothing is written."""
    import os

    bad = os.fsdecode(b"/data/LYT/caf\xe9.jpg")
    rows = [ManifestRow(path="/data/LYT/ok.jpg", label="LYT"), ManifestRow(path=bad, label="LYT")]
    with pytest.raises(DataError, match=r"caf\\xe9\.jpg: the file name is not valid UTF-8.*rename"):
        write_manifest(rows, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()

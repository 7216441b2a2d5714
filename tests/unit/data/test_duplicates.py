"""Byte-identical images in labelled data: a copy under another class is an error naming both
files; a copy within a class is left out (warned, recorded as skipped) before the split; the
scan reports both kinds."""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
from pathlib import Path

import pytest
from rich.console import Console

import marrowscope.data.duplicates as dup_mod
from marrowscope.config import ExperimentConfig, from_dict
from marrowscope.data import DataError
from marrowscope.data.duplicates import find_duplicates
from marrowscope.data.recorded import ManifestRows, manifest_rows
from marrowscope.data.scan import describe_duplicates, format_scan, scan_folder
from marrowscope.engine.data import prepare_data


def _cfg(**data: object) -> ExperimentConfig:
    return from_dict(
        {
            "seed": 3,
            "preprocess": {"size": 32, "workers": 1},
            "data": {"min_per_class": 2, "split": {"val": 0.25, "test": 0.0}, **data},
        }
    )


def _sha(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def test_copy_under_another_class_is_an_error_naming_both(synthetic_tree: Path) -> None:
    src = synthetic_tree / "AAA" / "AAA_001.png"
    dst = synthetic_tree / "BBB" / "copied.png"
    shutil.copy(src, dst)
    with pytest.raises(DataError) as e:
        manifest_rows(_cfg(root=str(synthetic_tree)), progress=False)
    msg = str(e.value)
    assert f"{src} (class AAA)" in msg and f"{dst} (class BBB)" in msg
    assert "label conflict" in msg and "remove one copy or correct its label" in msg


def test_many_conflicts_name_the_first_few_and_the_count(synthetic_tree: Path) -> None:
    for i, src in enumerate(sorted((synthetic_tree / "AAA").glob("*.*"))[:5]):
        shutil.copy(src, synthetic_tree / "CCC" / f"x{i}{src.suffix}")
    with pytest.raises(DataError, match=r"^5 image\(s\) .* and 2 more;"):
        manifest_rows(_cfg(root=str(synthetic_tree)), progress=False)


def test_copy_within_a_class_is_left_out_warned_and_recorded(
    synthetic_tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = synthetic_tree / "BBB" / "BBB_002.jpg"
    copies = [synthetic_tree / "BBB" / "zz_copy1.jpg", synthetic_tree / "BBB" / "zz_copy2.jpg"]
    for c in copies:
        shutil.copy(src, c)
    cfg = _cfg(root=str(synthetic_tree))
    with caplog.at_level(logging.WARNING):
        rows = manifest_rows(cfg, progress=False)
    paths = [r.path for r in rows]
    assert str(src) in paths and not {str(c) for c in copies} & set(paths)
    assert len(rows) == 36  # 3 classes x 12; the two copies left out
    assert [p for p, _ in rows.left_out] == [str(c) for c in copies]
    assert all(f"identical bytes to {src}" in why for _, why in rows.left_out)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "leaving out 2 image(s)" in warning and str(copies[0]) in warning
    # no image is on both sides of the split
    by_split: dict[str, set[str]] = {}
    for r in rows:
        by_split.setdefault(str(r.split), set()).add(_sha(r.path))
    assert not by_split["train"] & by_split["val"]
    # the copies are recorded with the skipped images (training writes them to skipped.csv)
    data = prepare_data(cfg, progress=False)
    assert [p for p, _ in data.skipped] == [str(c) for c in copies]
    assert len(data.splits["train"]) + len(data.splits["val"]) == 36


def test_left_out_survives_pickling() -> None:
    """torchrun broadcasts rank 0's rows with pickle: the record of what was left out stays."""
    rows = ManifestRows([], [("a.jpg", "identical bytes to b.jpg")])
    back = pickle.loads(pickle.dumps(rows))
    assert isinstance(back, ManifestRows) and back.left_out == rows.left_out


def test_manifest_rows_pointing_to_identical_files(synthetic_tree: Path, tmp_path: Path) -> None:
    a = synthetic_tree / "AAA" / "AAA_001.png"
    twin = tmp_path / "elsewhere" / "twin.png"
    twin.parent.mkdir()
    shutil.copy(a, twin)
    others = (
        sorted((synthetic_tree / "AAA").glob("AAA_0*"))[1:4]
        + sorted((synthetic_tree / "BBB").glob("BBB_0*"))[:4]
    )
    lines = [f"{p},{p.parent.name}" for p in others]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "\n".join([f"{a},AAA", f"{twin},BBB", *lines]) + "\n")
    with pytest.raises(DataError, match=r"twin\.png \(class BBB\)") as e:
        manifest_rows(_cfg(manifest=str(manifest)), progress=False)
    assert f"manifest {manifest}" in str(e.value) and f"{a} (class AAA)" in str(e.value)

    # the same label, and a recorded split that puts the two copies on both sides
    lines = [
        f"{p},{p.parent.name},{'val' if i % 4 == 0 else 'train'}" for i, p in enumerate(others)
    ]
    manifest.write_text(
        "path,label,split\n" + "\n".join([f"{twin},AAA,train", f"{a},AAA,val", *lines]) + "\n"
    )
    rows = manifest_rows(_cfg(manifest=str(manifest)), progress=False)
    kept = min(str(a), str(twin))
    assert [p for p, _ in rows.left_out] == [max(str(a), str(twin))]
    assert [r.path for r in rows].count(kept) == 1 and len(rows) == 8


def test_only_files_sharing_a_size_are_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = dup_mod._digest
    monkeypatch.setattr(dup_mod, "_digest", lambda p, head: hashed.append(p) or real(p, head))
    (tmp_path / "a").write_bytes(b"xyz")
    (tmp_path / "b").write_bytes(b"xyz")
    (tmp_path / "c").write_bytes(b"xyw")  # same size, other bytes
    (tmp_path / "d").write_bytes(b"longer")
    groups = find_duplicates((str(tmp_path / n), "K") for n in "abcd")
    assert [g.paths for g in groups] == [(str(tmp_path / "a"), str(tmp_path / "b"))]
    assert str(tmp_path / "d") not in hashed
    assert find_duplicates([(str(tmp_path / "missing"), "K")]) == []


def test_large_files_differing_early_are_never_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, different first bytes: only their heads are hashed; same head, different tail:
    read whole and told apart; identical: found."""
    whole: list[str] = []
    real = dup_mod._digest
    monkeypatch.setattr(
        dup_mod, "_digest", lambda p, head: (head is None and whole.append(p)) or real(p, head)
    )
    n = dup_mod.HEAD_BYTES * 3
    body = bytes(range(256)) * (n // 256)
    files = {
        "a": body,
        "b": body,  # a's copy
        "c": b"x" + body[1:],  # differs in its first byte
        "d": body[:-1] + b"y",  # differs in its last byte only
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    groups = find_duplicates((str(tmp_path / name), "K") for name in files)
    assert [g.paths for g in groups] == [(str(tmp_path / "a"), str(tmp_path / "b"))]
    assert sorted(Path(p).name for p in whole) == ["a", "b", "d"]


def test_scan_reports_both_kinds(synthetic_tree: Path) -> None:
    shutil.copy(synthetic_tree / "AAA" / "AAA_001.png", synthetic_tree / "CCC" / "x.png")
    shutil.copy(synthetic_tree / "BBB" / "BBB_002.jpg", synthetic_tree / "BBB" / "y.jpg")
    res = scan_folder(synthetic_tree, workers=1, progress=False, find_duplicates=True)
    assert res.duplicates is not None
    assert [(g.labels, g.conflict) for g in res.duplicates] == [
        (("AAA", "CCC"), True),
        (("BBB", "BBB"), False),
    ]
    console = Console(width=200, record=True)
    console.print(format_scan(res))
    table = console.export_text()
    assert "identical copies" in table and "label conflicts" in table
    cells = [line.replace("│", " ").replace("┃", " ").split() for line in table.splitlines()]
    row = {c[0]: c[1:] for c in cells if c}
    assert row["AAA"][-2:] == ["0", "1"] and row["BBB"][-2:] == ["1", "0"]
    assert row["total"][-2:] == ["1", "2"]
    lines = "\n".join(describe_duplicates(res))
    assert "label conflicts" in lines and str(synthetic_tree / "CCC" / "x.png") in lines
    assert str(synthetic_tree / "BBB" / "y.jpg") in lines
    # not looked for: no columns, nothing to describe
    plain = scan_folder(synthetic_tree, check_images=False, progress=False)
    assert plain.duplicates is None and describe_duplicates(plain) == []


def test_a_split_left_empty_by_a_copy_says_so(synthetic_tree: Path, tmp_path: Path) -> None:
    """A manifest puts AAA's only val image beside its copy in train: the copy (the later path)
    is left out, and the error about AAA's empty val split names it and why, not 'no image of
    it is assigned to that split'."""
    a = synthetic_tree / "AAA" / "AAA_001.png"
    copy = synthetic_tree / "AAA" / "zcopy.png"
    shutil.copy(a, copy)
    lines = [f"{a},AAA,train", f"{copy},AAA,val"]
    lines += [f"{p},AAA,train" for p in sorted((synthetic_tree / "AAA").glob("AAA_0*"))[1:4]]
    for cls in ("BBB", "CCC"):
        files = sorted((synthetic_tree / cls).glob(f"{cls}_0*"))[:4]
        lines += [f"{p},{cls},{'val' if i == 0 else 'train'}" for i, p in enumerate(files)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "\n".join(lines) + "\n")
    cfg = _cfg(manifest=str(manifest), min_per_class=1)
    rows = manifest_rows(cfg, progress=False)
    assert [r.path for r in rows.left_out_rows] == [str(copy)]
    assert rows.left_out_rows[0].split == "val"
    with pytest.raises(DataError) as e:
        prepare_data(cfg, rows=rows, progress=False)
    msg = " ".join(str(e.value).split())
    assert "class AAA has no usable image in the val split" in msg
    assert f"{copy}, have the same bytes as images of it in another split" in msg
    assert "no image of it is assigned" not in msg and "assign other images of it to val" in msg


def test_the_minimum_per_class_counts_distinct_images(synthetic_tree: Path) -> None:
    """A class of 12 files, 3 of them copies, has 9 distinct images: min_per_class=10 refuses it,
    naming the copies, as it refuses a class of 9 files."""
    files = sorted(p for p in (synthetic_tree / "CCC").rglob("*") if p.is_file())
    assert len(files) == 12
    for i, src in enumerate(files[:3]):
        shutil.copy(src, src.with_name(f"zz_copy{i}{src.suffix}"))
        files[-1 - i].unlink()  # still 12 files, 9 of them distinct
    with pytest.raises(DataError) as e:
        manifest_rows(_cfg(root=str(synthetic_tree), min_per_class=10), progress=False)
    msg = str(e.value)
    assert "class CCC has only 9 distinct image(s) once 3 identical copies" in msg
    assert "min_per_class=10" in msg and "data.min_per_class=9" in msg
    rows = manifest_rows(_cfg(root=str(synthetic_tree), min_per_class=9), progress=False)
    assert sum(r.label == "CCC" for r in rows) == 9

"""The split a bundle was trained on: RUN_DIR/split.csv first, else re-derived from its config and
checked against the counts it recorded; stratified calibration draws."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from marrowscope.config import ExperimentConfig, from_dict, to_dict
from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow, write_manifest
from marrowscope.data.recorded import manifest_rows, recorded_split, stratified_subset
from marrowscope.metadata import BundleMetadata


def _meta(root: Path, *, train_counts: dict[str, int] | None = None) -> BundleMetadata:
    cfg = from_dict(
        {
            "seed": 7,
            "data": {
                "root": str(root),
                "classes": ["AAA", "BBB", "CCC"],
                "min_per_class": 2,
                "split": {"val": 0.25, "test": 0.0},
            },
        }
    )
    rows = manifest_rows(cfg, progress=False)
    counts = Counter((r.label, r.split) for r in rows)
    return BundleMetadata.from_dict(
        {
            "format": 1,
            "classes": ["AAA", "BBB", "CCC"],
            "input_size": 32,
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
            "architecture": {"name": "paper_cnn", "pretrained": False},
            "config": to_dict(cfg),
            "train_counts": train_counts
            or {c: counts[(c, "train")] for c in ["AAA", "BBB", "CCC"]},
            "metrics": {
                "val_per_class": {
                    c: {"f1": 0.5, "support": counts[(c, "val")]} for c in ["AAA", "BBB", "CCC"]
                }
            },
        }
    )


def test_rederived_from_the_config_and_checked(synthetic_tree: Path, tmp_path: Path) -> None:
    meta = _meta(synthetic_tree)
    split = recorded_split(tmp_path / "run" / "best", meta)
    assert "re-derived" in split.source and "seed 7" in split.source
    assert Counter(r.label for r in split.split("val")) == {"AAA": 3, "BBB": 3, "CCC": 3}
    assert len(split.split("train")) == 27
    assert not {r.path for r in split.split("val")} & {r.path for r in split.split("train")}


def test_changed_data_is_refused_with_the_counts(synthetic_tree: Path, tmp_path: Path) -> None:
    meta = _meta(synthetic_tree)
    import numpy as np
    from conftest import COLOURS, make_cell
    from PIL import Image

    rng = np.random.default_rng(99)  # new images (a byte-identical copy would be left out)
    for i in range(4):  # the folder grew since training: the split shifts
        cell = make_cell(rng, COLOURS["AAA"])
        Image.fromarray(cell).save(synthetic_tree / "AAA" / f"new_{i}.jpg")
    with pytest.raises(DataError, match=r"AAA 1[0-9] \(recorded 9\).*--guard-data DIR"):
        recorded_split(None, meta)


def test_a_bundle_trained_with_copies_before_they_were_left_out_says_so(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """A bundle from before 2026-11-30, trained on data holding an identical copy (its recorded
    counts include it): the re-derived split leaves the copy out, and the error says that may be
    why, not only that the data changed."""
    copy = synthetic_tree / "AAA" / "zz_copy.png"
    shutil.copy(synthetic_tree / "AAA" / "AAA_001.png", copy)
    meta = _meta(synthetic_tree)  # the counts without the copy
    old = meta.replace(train_counts={**meta.train_counts, "AAA": meta.train_counts["AAA"] + 1})
    with pytest.raises(DataError) as e:
        recorded_split(None, old)
    msg = str(e.value)
    assert "a marrowscope before 2026-11-30, which kept the 1 identical copy" in msg
    assert "--guard-data DIR" in msg


def test_missing_data_root_names_it_and_the_flags(tmp_path: Path) -> None:
    meta = _meta_without_data_check(tmp_path)
    with pytest.raises(DataError, match=r"does not exist here.*--calibrate DIR"):
        recorded_split(None, meta)
    bare = meta.replace(config=None)
    with pytest.raises(DataError, match="records no training split"):
        recorded_split(tmp_path, bare)


def _meta_without_data_check(tmp_path: Path) -> BundleMetadata:
    tree = tmp_path / "gone"
    from conftest import write_synthetic_tree

    write_synthetic_tree(tree, per_class=8)
    meta = _meta(tree)
    shutil.rmtree(tree)
    return meta


def test_split_csv_of_the_run_folder_wins(synthetic_tree: Path, tmp_path: Path) -> None:
    meta = _meta(synthetic_tree)
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    rows = [
        ManifestRow(
            path=str(p),
            label=p.parent.name if p.parent.name != "batch2" else p.parent.parent.name,
            split="val" if i % 2 else "train",
        )
        for i, p in enumerate(sorted(synthetic_tree.rglob("*.jpg")))
    ]
    write_manifest(
        rows + [ManifestRow(path="/elsewhere/x.jpg", label="ZZZ", split="val")], run / "split.csv"
    )
    split = recorded_split(run / "best", meta)
    assert split.source == str(run / "split.csv")
    assert [r.path for r in split.split("val")] == [r.path for r in rows if r.split == "val"]


def test_stratified_subset_is_proportional_seeded_and_ordered() -> None:
    rows = [
        ManifestRow(path=f"{c}/{i:03d}", label=c)
        for c, n in (("A", 60), ("B", 30), ("C", 10))
        for i in range(n)
    ]
    sub = stratified_subset(rows, 20, seed=1)
    assert Counter(r.label for r in sub) == {"A": 12, "B": 6, "C": 2}
    assert sub == sorted(sub, key=rows.index)
    assert sub == stratified_subset(rows, 20, seed=1) != stratified_subset(rows, 20, seed=2)
    tiny = stratified_subset(rows, 3, seed=0)  # every class while n allows
    assert Counter(r.label for r in tiny) == {"A": 1, "B": 1, "C": 1}
    assert stratified_subset(rows, 500) == rows


def _cfg(**data: object) -> ExperimentConfig:
    base: dict[str, object] = {"min_per_class": 1, "split": {"val": 0.25, "test": 0.25}}
    return from_dict({"seed": 3, "data": {**base, **data}})


def _listing(root: Path, path: Path, *, extra: str = "", split: bool = False) -> Path:
    """A manifest listing every image below ``root`` (path,label[,split][,extra columns])."""
    lines = ["path,label" + (",split" if split else "") + (f",{extra}" if extra else "")]
    for i, p in enumerate(sorted(root.rglob("*"))):
        if p.suffix in {".png", ".jpg"}:
            label = p.relative_to(root).parts[0]
            cells = [str(p), label] + (["val" if i % 4 == 0 else "train"] if split else [])
            lines.append(",".join(cells + ([f"p{i % 4}"] if extra else [])))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_manifest_is_capped_and_split_like_the_folder_it_lists(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    manifest = _listing(synthetic_tree, tmp_path / "m.csv")
    from_folder = manifest_rows(_cfg(root=str(synthetic_tree), max_per_class=5), progress=False)
    from_csv = manifest_rows(_cfg(manifest=str(manifest), max_per_class=5), progress=False)
    assert Counter(r.label for r in from_csv) == {"AAA": 5, "BBB": 5, "CCC": 5}
    # the same seeded draw and the same split as the folder
    assert {(r.path, r.label, r.split) for r in from_csv} == {
        (r.path, r.label, r.split) for r in from_folder
    }
    other_seed = manifest_rows(
        from_dict({"seed": 4, "data": {"manifest": str(manifest), "max_per_class": 5}}),
        progress=False,
    )
    assert {r.path for r in other_seed} != {r.path for r in from_csv}


def test_a_manifest_must_meet_min_per_class(synthetic_tree: Path, tmp_path: Path) -> None:
    manifest = _listing(synthetic_tree, tmp_path / "m.csv")
    with pytest.raises(DataError) as info:
        manifest_rows(_cfg(manifest=str(manifest), min_per_class=13), progress=False)
    msg = str(info.value)
    assert "class AAA has only 12 row(s)" in msg and str(manifest) in msg
    assert "data.min_per_class=12" in msg and "data.classes" in msg


def test_a_cap_never_thins_a_recorded_split(synthetic_tree: Path, tmp_path: Path) -> None:
    manifest = _listing(synthetic_tree, tmp_path / "split.csv", split=True)
    kept = manifest_rows(_cfg(manifest=str(manifest), max_per_class=12), progress=False)
    assert len(kept) == 36  # a cap the recorded split meets changes nothing
    with pytest.raises(DataError) as info:
        manifest_rows(_cfg(manifest=str(manifest), max_per_class=5), progress=False)
    msg = str(info.value)
    assert "records a split" in msg and "max_per_class=5" in msg and str(manifest) in msg


def test_groups_without_group_column_are_named_in_a_warning(
    synthetic_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = _listing(synthetic_tree, tmp_path / "m.csv", extra="group")
    with caplog.at_level(logging.WARNING, logger="marrowscope.data.recorded"):
        rows = manifest_rows(_cfg(manifest=str(manifest)), progress=False)
    assert {r.group for r in rows} == {"p0", "p1", "p2", "p3"}
    assert "4 groups" in caplog.text and "data.split.group_column=group" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="marrowscope.data.recorded"):
        manifest_rows(
            _cfg(
                manifest=str(manifest), split={"val": 0.25, "test": 0.25, "group_column": "group"}
            ),
            progress=False,
        )
    assert "group_column" not in caplog.text


def test_too_few_for_the_split_names_missing_and_unreadable_files(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    manifest = _listing(synthetic_tree, tmp_path / "m.csv")
    lines = manifest.read_text().splitlines()
    ccc = [ln for ln in lines if ",CCC" in ln]
    for ln in ccc[2:]:
        Path(ln.split(",")[0]).unlink()
    manifest.write_text("\n".join([ln for ln in lines if ln not in ccc[:-2]]) + "\n")
    with pytest.raises(DataError) as info:
        manifest_rows(_cfg(manifest=str(manifest)), progress=False)
    msg = str(info.value)
    assert "class CCC has only 2 image(s)" in msg and "2 of its 2 files" in msg
    assert "missing" in msg and "data.classes" in msg and "min_per_class" not in msg

    for p in sorted((synthetic_tree / "BBB").rglob("*.*"))[2:]:
        p.write_bytes(b"")  # 0-byte files: unreadable to the scan
    with pytest.raises(DataError) as info:
        manifest_rows(_cfg(root=str(synthetic_tree), classes=["AAA", "BBB"]), progress=False)
    msg = str(info.value)
    assert "class BBB has only 2 image(s)" in msg and "10 more of its files" in msg
    assert "unreadable" in msg and "min_per_class" not in msg


def test_a_file_name_that_is_not_utf8_is_refused_before_preprocessing(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    bad = os.fsdecode(str(synthetic_tree / "AAA").encode() + b"/caf\xe9.png")
    shutil.copy(synthetic_tree / "AAA" / "AAA_001.png", bad)
    with pytest.raises(DataError, match=r"caf\\xe9\.png.*not valid UTF-8.*rename"):
        manifest_rows(_cfg(root=str(synthetic_tree)), progress=False)
    # a class left out is not refused for it
    rows = manifest_rows(_cfg(root=str(synthetic_tree), classes=["BBB", "CCC"]), progress=False)
    assert len(rows) == 24


def test_an_empty_split_after_preprocessing_names_the_lost_files(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    from marrowscope.engine.data import load_split_images

    cfg = from_dict(
        {"data": {"root": str(synthetic_tree)}, "preprocess": {"size": 32, "workers": 1}}
    )
    rows = [
        ManifestRow(
            str(p), p.relative_to(synthetic_tree).parts[0], "val" if i % 4 == 0 else "train"
        )
        for i, p in enumerate(sorted(synthetic_tree.rglob("*.*")))
    ]
    ccc_val = [r for r in rows if r.label == "CCC" and r.split == "val"]
    Path(ccc_val[0].path).unlink()
    for r in ccc_val[1:]:
        Path(r.path).write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        load_split_images(rows, ["AAA", "BBB", "CCC"], cfg, progress=False)
    msg = str(info.value)
    assert "class CCC has no usable image in the val split" in msg
    assert f"its {len(ccc_val)} val image(s): 1 missing and {len(ccc_val) - 1} unreadable" in msg
    assert "data.classes" in msg and "min_per_class" not in msg

"""The split a bundle was trained on: RUN_DIR/split.csv first, else re-derived from its config and
checked against the counts it recorded; stratified calibration draws."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from marrowscope.config import from_dict, to_dict
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
    extra = next((synthetic_tree / "AAA").glob("*.jpg"))
    for i in range(4):  # the folder grew since training: the split shifts
        shutil.copy(extra, synthetic_tree / "AAA" / f"new_{i}.jpg")
    with pytest.raises(DataError, match=r"AAA 1[0-9] \(recorded 9\).*--guard-data DIR"):
        recorded_split(None, meta)


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

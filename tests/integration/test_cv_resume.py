"""Resuming a cross-validation folder: what is checked before anything is written or reused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from marrowscope.config import from_dict, to_dict
from marrowscope.data import DataError
from marrowscope.engine.cv import config_differences, cross_validate, out_of_fold_probs

from .test_train import tiny_config


def _cfg(root: Path, **train: object):
    return from_dict(tiny_config(root, epochs=1, **train))


def test_a_failed_start_leaves_no_folder_behind(synthetic_tree: Path, tmp_path: Path) -> None:
    """A start refused for its data or folds writes nothing, so the fixed command runs; a folder
    an older marrowscope left with only cv_config.json (no finished epoch) is started afresh."""
    out = tmp_path / "cv"
    with pytest.raises(DataError, match="does not exist"):
        cross_validate(_cfg(tmp_path / "nonexistent"), out, folds=2, progress=False)
    assert not out.exists()
    with pytest.raises(DataError, match="at least 2 folds"):
        cross_validate(_cfg(synthetic_tree), out, folds=1, progress=False)
    with pytest.raises(DataError, match="every class needs images in every fold"):
        cross_validate(_cfg(synthetic_tree), out, folds=13, progress=False)
    assert not out.exists()

    # what an older version left after a failed start: another identity, nothing trained
    out.mkdir()
    stale = {"folds": 13, "config": to_dict(_cfg(tmp_path / "nonexistent"))}
    (out / "cv_config.json").write_text(json.dumps(stale))
    summary = cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    assert summary["variants"]["none"]["pooled"]["n"] == 36
    saved = json.loads((out / "cv_config.json").read_text())
    assert saved["folds"] == 2 and saved["config"]["data"]["root"] == str(synthetic_tree)


def test_resume_ignores_run_time_settings_and_names_what_differs(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    stamp = os.path.getmtime(out / "fold-0" / "oof.npz")
    # fold 1 interrupted after its first epoch: resumed with the new run-time settings
    (out / "fold-1" / "oof.npz").unlink()
    raw = tiny_config(synthetic_tree, epochs=1, threads=1, num_workers=1, device="cpu")
    raw["name"] = "renamed"
    raw["preprocess"].update(workers=2, cache_dir=str(tmp_path / "cache"))
    summary = cross_validate(from_dict(raw), out, folds=2, progress=False)
    assert summary["variants"]["none"]["pooled"]["n"] == 36
    assert os.path.getmtime(out / "fold-0" / "oof.npz") == stamp  # reused, not retrained
    assert "threads: 1" in (out / "fold-1" / "config.yaml").read_text()

    # a folder written before: its cv_config.json holds the full config, without the keys added
    # since (they take their defaults)
    saved = json.loads((out / "cv_config.json").read_text())
    del saved["config"]["train"]["swa_lr"]
    (out / "cv_config.json").write_text(json.dumps(saved))
    cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    assert os.path.getmtime(out / "fold-0" / "oof.npz") == stamp

    # a result-relevant difference is refused, naming each differing key (saved -> now)
    with pytest.raises(FileExistsError, match=r"train\.epochs: 1 -> 2; folds: 2 -> 3"):
        cross_validate(
            from_dict(tiny_config(synthetic_tree, epochs=2)), out, folds=3, progress=False
        )
    with pytest.raises(FileExistsError, match=r"fold_seed: \(not set\) -> 3"):
        cross_validate(_cfg(synthetic_tree), out, folds=2, fold_seed=3, progress=False)
    # trained folds whose settings are unknown are not reused
    (out / "cv_config.json").unlink()
    with pytest.raises(FileExistsError, match="no cv_config.json"):
        cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)


def test_config_differences_skip_run_time_keys() -> None:
    a = {"folds": 2, "config": to_dict(from_dict({"train": {"threads": 1, "lr": 0.1}}))}
    b = {"folds": 2, "config": to_dict(from_dict({"train": {"threads": 8, "lr": 0.2}}))}
    b["config"]["compare"]["models"] = ["x"]
    b["config"]["preprocess"]["cache_dir"] = "/elsewhere"
    assert config_differences(a, b) == ["train.lr: 0.1 -> 0.2"]
    assert config_differences(a, a) == []


def test_resume_refuses_data_that_changed_under_finished_folds(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """Images added (or removed, relabelled) since a fold finished would change the folds: the
    finished fold would be reused on the old assignment, scoring some images twice and others
    never. Refused before anything is written; the restored data resumes."""
    out = tmp_path / "cv"
    cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    shutil.rmtree(out / "fold-1")  # interrupted before its first finished epoch
    (out / "cv_summary.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    stamp = os.path.getmtime(out / "fold-0" / "oof.npz")

    from conftest import COLOURS, make_cell
    from PIL import Image

    extra = synthetic_tree / "AAA" / "AAA_extra.png"  # new bytes: a copy would be left out
    Image.fromarray(make_cell(np.random.default_rng(99), COLOURS["AAA"])).save(extra)
    with pytest.raises(DataError, match=r"differ from .*folds\.csv \(1 added \(e\.g\. .*AAA_extra"):
        cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / "fold-1").exists()

    extra.unlink()
    moved = synthetic_tree / "BBB" / "AAA_001.png"
    (synthetic_tree / "AAA" / "AAA_001.png").rename(moved)
    with pytest.raises(DataError, match=r"1 removed .*Restore the data as it was"):
        cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    moved.rename(synthetic_tree / "AAA" / "AAA_001.png")

    summary = cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    assert os.path.getmtime(out / "fold-0" / "oof.npz") == stamp
    for v in summary["variants"].values():
        assert v["pooled"]["n"] == 36
    oof = out_of_fold_probs(out, "none")
    assert sorted(oof["paths"]) == sorted(set(oof["paths"])) and len(oof["paths"]) == 36


def test_an_out_of_fold_file_without_last_epoch_logits_is_a_clear_error(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    path = out / "fold-1" / "oof.npz"
    with np.load(path) as z:
        old = {k: z[k] for k in z.files if k != "logits_last"}
    with path.open("wb") as f:
        np.savez(f, **old)  # as a marrowscope older than the last-epoch scores wrote it
    with pytest.raises(DataError, match=r"no last-epoch logits.*delete that file"):
        out_of_fold_probs(out, "none")
    path.unlink()  # the fix the message gives
    cross_validate(_cfg(synthetic_tree), out, folds=2, progress=False)
    assert out_of_fold_probs(out, "none")["probs"].shape == (36, 3)


def test_identical_copies_are_left_out_of_every_fold_and_the_refit(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """A copy of an image in its own class is scored and trained on nowhere, and every fold's
    and the refit's skipped.csv say so."""
    first = sorted((synthetic_tree / "AAA").iterdir())[0]
    copy = synthetic_tree / "AAA" / f"zz_copy{first.suffix}"
    shutil.copyfile(first, copy)
    out = tmp_path / "cv"
    summary = cross_validate(_cfg(synthetic_tree), out, folds=2, refit=True, progress=False)
    assert summary["variants"]["none"]["pooled"]["n"] == 36  # 36 distinct images, not 37
    for run in ("fold-0", "fold-1", "refit"):
        skipped = (out / run / "skipped.csv").read_text()
        assert str(copy) in skipped and f"identical bytes to {first}" in skipped, run
        assert str(copy) not in (out / run / "split.csv").read_text(), run

"""Evaluate a bundle and compare models end to end (synthetic cells and the bundled real sample)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from marrowscope.config import from_dict
from marrowscope.data import DataError
from marrowscope.engine.compare import compare, model_config
from marrowscope.engine.evaluate import evaluate_bundle
from marrowscope.engine.train import fit

pytestmark = pytest.mark.integration


def _cfg(root: Path, **extra: object) -> dict:
    cfg = {
        "name": "t",
        "seed": 3,
        "data": {"root": str(root), "min_per_class": 4, "split": {"val": 0.25, "test": 0.25}},
        "preprocess": {"size": 32, "workers": 1},
        "model": {"name": "paper_cnn", "pretrained": False},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "precision": "fp32"},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def trained(synthetic_tree: Path, tmp_path: Path) -> Path:
    fit(from_dict(_cfg(synthetic_tree)), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_evaluate_folder_writes_reports(
    trained: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    m = evaluate_bundle(trained / "best", synthetic_tree, out_dir=out, progress=False, n_boot=200)
    assert m["n"] == 36
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "per_class"):
        assert key in m
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(m["accuracy"])
    assert set(saved["per_class"]) == {"AAA", "BBB", "CCC"}
    assert set(saved["per_class"]["AAA"]) >= {"precision", "recall", "f1", "support"}
    lo, hi = saved["ci95"]["accuracy"]
    assert lo <= saved["accuracy"] <= hi
    for name in ("report.md", "confusion_matrix.png", "confusion_matrix.csv", "predictions.csv"):
        assert (out / name).stat().st_size > 0, name
    preds = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(preds) == 36
    assert sum(p["label"] == p["predicted"] for p in preds) / 36 == pytest.approx(m["accuracy"])
    cm = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert cm[0][1:] == ["AAA", "BBB", "CCC"]
    assert sum(int(v) for row in cm[1:] for v in row[1:]) == 36


def test_evaluate_uses_the_bundles_tta_unless_overridden(trained: Path) -> None:
    m = evaluate_bundle(trained / "best", trained / "split.csv", progress=False, n_boot=20)
    assert m["tta"] == "none" and m["temperature"] > 0
    d8 = evaluate_bundle(
        trained / "best", trained / "split.csv", progress=False, n_boot=20, tta="d8"
    )
    assert d8["tta"] == "d8" and d8["n"] == m["n"]


def test_evaluate_on_split_manifest_uses_test_split(trained: Path) -> None:
    m = evaluate_bundle(trained / "best", trained / "split.csv", progress=False, n_boot=50)
    test_rows = [r for r in csv.DictReader((trained / "split.csv").open()) if r["split"] == "test"]
    assert m["n"] == len(test_rows)


def test_evaluate_refuses_unknown_classes_and_accepts_a_mapping(
    trained: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(synthetic_tree, other)
    (other / "BBB").rename(other / "ZZZ")
    with pytest.raises(DataError, match="ZZZ.*--map"):
        evaluate_bundle(trained / "best", other, progress=False)
    m = evaluate_bundle(
        trained / "best", other, class_map={"ZZZ": "BBB"}, progress=False, n_boot=50
    )
    assert m["per_class"]["BBB"]["support"] == 12
    m = evaluate_bundle(trained / "best", other, drop_unknown=True, progress=False, n_boot=50)
    assert m["n"] == 24


def test_evaluate_skips_unreadable_images(trained: Path, synthetic_tree: Path) -> None:
    (synthetic_tree / "AAA" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    m = evaluate_bundle(trained / "best", synthetic_tree, progress=False, n_boot=50)
    assert m["n"] == 36
    assert [s["path"] for s in m["skipped"]] == [str(synthetic_tree / "AAA" / "broken.jpg")]


def test_evaluate_names_identical_copies_and_scores_each(
    trained: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    """Copies in the evaluated data are scored as images of their own (the numbers stay what the
    files say), but the console, metrics.json and report.md say so, label conflicts first."""
    first = sorted((synthetic_tree / "AAA").iterdir())[0]
    conflict = synthetic_tree / "BBB" / f"zz_from_AAA{first.suffix}"
    shutil.copyfile(first, conflict)
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    m = evaluate_bundle(
        trained / "best",
        synthetic_tree,
        out_dir=tmp_path / "eval",
        progress=False,
        n_boot=50,
        console=Console(file=out, width=400),
    )
    assert m["n"] == 37
    assert m["duplicates"] == [
        {"paths": [str(first), str(conflict)], "classes": ["AAA", "BBB"], "conflict": True}
    ]
    said = " ".join(out.getvalue().split())
    assert (
        "1 image(s) have byte-identical copies" in said and "filed under different classes" in said
    )
    assert str(conflict) in said
    assert "byte-identical copies" in (tmp_path / "eval" / "report.md").read_text()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["duplicates"][0]["conflict"] is True


def test_compare_writes_the_paper_tables(synthetic_tree: Path, tmp_path: Path) -> None:
    cfg = from_dict(
        _cfg(
            synthetic_tree,
            model={"name": "paper_cnn", "pretrained": False},
            compare={
                "models": ["paper_cnn", "tf_efficientnet_lite0"],
                "focus_class": "BBB",
                "model_overrides": {
                    "tf_efficientnet_lite0": {"train.lr": 0.002, "model.pretrained": True}
                },
            },
        )
    )
    assert model_config(cfg, "tf_efficientnet_lite0").train.lr == 0.002
    out = tmp_path / "cmp"
    rows = compare(cfg, out, progress=False)
    assert [r["model"] for r in rows] == ["paper_cnn", "tf_efficientnet_lite0"]
    for name in (
        "report.md",
        "table1_accuracy.csv",
        "table2_BBB.csv",
        "table3_per_class.csv",
        "comparison.png",
        "per_class_f1.png",
        "curves/paper_cnn.png",
        "confusion/tf_efficientnet_lite0.png",
        "split.csv",
    ):
        assert (out / name).is_file(), name
    t1 = list(csv.DictReader((out / "table1_accuracy.csv").open()))
    assert len(t1) == 2
    t3 = list(csv.DictReader((out / "table3_per_class.csv").open()))
    assert len(t3) == 2 * 3
    report = (out / "report.md").read_text()
    assert "paper_cnn" in report and "tf_efficientnet_lite0" in report
    # both models saw the very same split
    splits = {
        m: (out / "runs" / m / "split.csv").read_text()
        for m in ("paper_cnn", "tf_efficientnet_lite0")
    }
    assert splits["paper_cnn"] == splits["tf_efficientnet_lite0"]
    # resume reuses finished runs without training again
    mtime = (out / "runs" / "paper_cnn" / "best" / "model.safetensors").stat().st_mtime
    compare(cfg, out, resume=True, progress=False)
    assert (out / "runs" / "paper_cnn" / "best" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.swa_lr": -1}, r"train.swa_lr: must be > 0, got -1"),
        # one preprocessed copy of the images serves every model: a per-model crop cannot apply
        ({"preprocess.crop": 0.75}, r"model_overrides.mobilenetv2_100.preprocess.crop: .* share"),
        ({"data.max_per_class": 3}, r"model_overrides.mobilenetv2_100.data.max_per_class"),
    ],
)
def test_a_bad_model_override_fails_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: dict, message: str
) -> None:
    import marrowscope.engine.compare as compare_mod
    from marrowscope.config import ConfigError

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the overrides were checked")

    monkeypatch.setattr(compare_mod, "prepare_data", no_data)
    cfg = from_dict(
        _cfg(
            tmp_path / "no-such-folder",
            compare={
                "models": ["paper_cnn", "mobilenetv2_100"],
                "model_overrides": {"mobilenetv2_100": override},
            },
        )
    )
    with pytest.raises(ConfigError, match=message):
        compare(cfg, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_transfer_learning_on_the_bundled_real_sample(tmp_path: Path) -> None:
    """Real Matek cells + offline ImageNet EfficientNet-Lite0: one short epoch must beat chance."""
    cfg = from_dict(
        {
            "name": "sample",
            "seed": 1,
            "data": {"root": "builtin:bm-sample", "split": {"val": 0.25, "test": 0.0}},
            "preprocess": {"size": 96},
            "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.002},
        }
    )
    res = fit(cfg, tmp_path / "run", progress=False)
    assert len(res.classes) == 8
    assert res.best_val_macro_f1 > 0.3  # chance is 0.125


def test_drop_unknown_is_recorded_and_macro_f1_leaves_out_absent_classes(
    tiny_bundle: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    """--drop-unknown said so only on the console (report.md: "images: 24", metrics.json
    "skipped": []); and with a model class absent from the data, macro-F1 counted it as F1 = 0
    while balanced accuracy left it out."""
    from typer.testing import CliRunner

    from marrowscope.cli.main import app

    data = tmp_path / "other"
    shutil.copytree(synthetic_tree, data)
    (data / "BBB").rename(data / "ZZZ")  # the model knows AAA BBB CCC: BBB absent, ZZZ unknown
    (data / "AAA" / "x.webp").write_bytes(b"not read")
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        app, ["evaluate", str(tiny_bundle), str(data), "--drop-unknown", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "leaving out class(es) unknown to the model: ZZZ (12 images)" in text
    assert "not reading 1 file(s) in class folders that are not images by their extension " in text
    assert "BBB (no image) left out" in text
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 24 and saved["dropped_classes"] == {"ZZZ": 12}
    assert saved["ignored_files"] == [str(data / "AAA" / "x.webp")]
    per = saved["per_class"]
    assert per["BBB"]["support"] == 0
    assert saved["macro_f1"] == pytest.approx((per["AAA"]["f1"] + per["CCC"]["f1"]) / 2)
    assert saved["macro_f1_all_classes"] == pytest.approx(
        (per["AAA"]["f1"] + per["BBB"]["f1"] + per["CCC"]["f1"]) / 3
    )
    assert saved["balanced_accuracy"] == pytest.approx(
        (per["AAA"]["recall"] + per["CCC"]["recall"]) / 2
    )
    report = (out / "report.md").read_text()
    assert "Left out (--drop-unknown): 12 images of class(es) the model does not know" in report
    assert "know: ZZZ (12 images)." in report
    assert (
        "Not read: 1 file(s) in class folders that are not images by their extension (x.webp)"
        in report
    )
    assert f"| Macro-F1 | {saved['macro_f1']:.3f} |" in report
    all_classes = saved["macro_f1_all_classes"]
    assert f"| Macro-F1, all model classes (absent ones as 0) | {all_classes:.3f}" in report
    # with every class present nothing of this appears and the two macro-F1 values agree
    m = evaluate_bundle(tiny_bundle, synthetic_tree, progress=False, n_boot=50)
    assert m["dropped_classes"] == {} and m["ignored_files"] == []
    assert m["ignored_files_count"] == m["ignored_files_at_root"] == 0
    assert m["macro_f1"] == m["macro_f1_all_classes"]


def test_files_outside_class_folders_are_told_apart_and_the_list_is_capped(
    tiny_bundle: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    """A .jpg directly in the data folder was reported as "not an image by its extension";
    and metrics.json listed every ignored file, however many."""
    from rich.console import Console

    data = tmp_path / "data"
    shutil.copytree(synthetic_tree, data)
    cell = next((data / "AAA").glob("*"))
    shutil.copy(cell, data / "stray.jpg")
    (data / "README.txt").write_text("about the data")
    for i in range(60):
        (data / "CCC" / f"note{i:02d}.txt").write_text("not an image")
    console = Console(record=True, width=200)
    out = tmp_path / "eval"
    m = evaluate_bundle(tiny_bundle, data, out_dir=out, progress=False, n_boot=20, console=console)
    text = console.export_text()
    assert "not reading 2 file(s) directly in the data folder, in no class folder" in text
    assert "(README.txt, stray.jpg); put labelled images in their class's folder" in text
    assert "not reading 60 file(s) in class folders that are not images by their extension" in text
    assert "(note00.txt, note01.txt, note02.txt and 57 more)" in text
    assert "stray.jpg" not in text.split("class folders that are not images")[1]
    assert m["n"] == 36  # the stray .jpg is of no class: not scored
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["ignored_files"]) == 50 and saved["ignored_files_count"] == 62
    assert saved["ignored_files_at_root"] == 2
    report = (out / "report.md").read_text()
    assert "Not read: 2 file(s) directly in the data folder, in no class folder" in report
    assert "Not read: 60 file(s) in class folders that are not images by their extension" in report


def test_a_file_name_that_is_not_utf8_is_named_escaped_and_the_report_written(
    tiny_bundle: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    """A stray file named with a Latin-1 byte in a class folder: said on the console and in
    report.md and metrics.json with the byte as \\xe9, and every output is written."""
    import os

    from rich.console import Console

    data = tmp_path / "data"
    shutil.copytree(synthetic_tree, data)
    try:
        with open(os.path.join(os.fsencode(data / "CCC"), b"caf\xe9.txt"), "wb") as f:
            f.write(b"not an image")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    console = Console(record=True, width=200)
    out = tmp_path / "eval"
    evaluate_bundle(tiny_bundle, data, out_dir=out, progress=False, n_boot=20, console=console)
    assert "(caf\\xe9.txt)" in console.export_text()
    assert "(caf\\xe9.txt)" in (out / "report.md").read_text(encoding="utf-8")
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert any(p.endswith("caf\\xe9.txt") for p in saved["ignored_files"])
    assert (out / "predictions.csv").is_file()


def _one_model(root: Path, **extra: object):  # type: ignore[no-untyped-def]
    """A one-model comparison (paper_cnn, one epoch): the quickest to train."""
    base = _cfg(root, compare={"models": ["paper_cnn"], "focus_class": "BBB"})
    base["train"] = {**base["train"], "epochs": 1}  # type: ignore[dict-item]
    base.update(extra)
    return from_dict(base)


def _weights(out: Path, model: str = "paper_cnn") -> bytes:
    return (out / "runs" / model / "best" / "model.safetensors").read_bytes()


def test_compare_refuses_to_retrain_over_finished_runs_and_resume_checks_config_and_split(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    from marrowscope.config import ConfigError, replace

    cfg = _one_model(synthetic_tree)
    out = tmp_path / "cmp"
    compare(cfg, out, progress=False)
    weights = _weights(out)
    # a plain re-run would delete the trained model: refused, naming the folder and the choices
    with pytest.raises(FileExistsError, match=r"cmp.*paper_cnn.*--resume.*--out"):
        compare(cfg, out, progress=False)
    assert _weights(out) == weights
    # --resume with another recipe: the reused model would not be the one the report describes
    with pytest.raises(ConfigError, match=r"runs/paper_cnn.*train\.epochs: 1 .* 3"):
        compare(replace(cfg, ["train.epochs=3"]), out, resume=True, progress=False)
    # another seed means another split too; the config differs first
    with pytest.raises(ConfigError, match=r"\bseed: 3 .* 7"):
        compare(replace(cfg, ["seed=7"]), out, resume=True, progress=False)
    # the same config but data that changed since: its test images could be training images
    import numpy as np
    from conftest import COLOURS, make_cell
    from PIL import Image

    extra = synthetic_tree / "AAA" / "new_one.png"  # new bytes: a copy would be left out
    Image.fromarray(make_cell(np.random.default_rng(99), COLOURS["AAA"])).save(extra)
    with pytest.raises(ConfigError, match=r"runs/paper_cnn.*split.*new_one\.png"):
        compare(cfg, out, resume=True, progress=False)
    extra.unlink()
    # settings that do not change the model (device, threads, workers) may differ
    compare(replace(cfg, ["train.device=cpu", "train.threads=1"]), out, resume=True, progress=False)
    assert _weights(out) == weights
    assert "epochs: 1" in (out / "report.md").read_text()


def test_compare_resume_of_an_interrupted_run_checks_its_config(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    from marrowscope.config import ConfigError, replace

    cfg = _one_model(synthetic_tree)
    out = tmp_path / "cmp"
    compare(cfg, out, progress=False)
    run = out / "runs" / "paper_cnn"
    (run / "summary.json").unlink()  # as if stopped after its last epoch, before the summary
    assert (run / "state.pt").is_file()
    with pytest.raises(ConfigError, match=r"runs/paper_cnn.*train\.lr: 0\.003 .* 0\.01"):
        compare(replace(cfg, ["train.lr=0.01"]), out, resume=True, progress=False)
    assert not (run / "summary.json").exists()
    compare(cfg, out, resume=True, progress=False)  # the same config continues it
    assert (run / "summary.json").is_file()


def test_compare_refuses_an_empty_test_split_before_reading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import marrowscope.engine.compare as compare_mod
    from marrowscope.config import ConfigError

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the split was checked")

    monkeypatch.setattr(compare_mod, "prepare_data", no_data)
    monkeypatch.setattr(compare_mod, "manifest_rows", no_data)
    cfg = _one_model(tmp_path / "no-such-folder", data={"root": "x", "split": {"test": 0}})
    with pytest.raises(ConfigError, match=r"data\.split\.test is 0.*above 0"):
        compare(cfg, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_compare_refuses_a_manifest_split_without_test_images(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import marrowscope.engine.compare as compare_mod
    from marrowscope.data.manifest import ManifestRow, write_manifest

    def no_images(*args: object, **kwargs: object) -> None:
        raise AssertionError("images were preprocessed before the split was checked")

    monkeypatch.setattr(compare_mod, "prepare_data", no_images)
    images = sorted(str(p) for p in synthetic_tree.rglob("*.*g"))
    manifest = tmp_path / "m.csv"
    write_manifest(
        [
            ManifestRow(p, Path(p).name[:3], "val" if i % 4 == 0 else "train")
            for i, p in enumerate(images)
        ],
        manifest,
    )
    cfg = _one_model(synthetic_tree, data={"manifest": str(manifest)})
    with pytest.raises(DataError, match=r"m\.csv.*no test image"):
        compare(cfg, tmp_path / "cmp", progress=False)


def test_a_misnamed_or_broken_model_override_is_named(tmp_path: Path) -> None:
    from marrowscope.config import ConfigError

    root = tmp_path / "no-such-folder"
    cfg = _one_model(
        root,
        compare={"models": ["paper_cnn", "vgg16"], "model_overrides": {"paper-cnn": {}}},
    )
    with pytest.raises(
        ConfigError, match=r"model_overrides\.paper-cnn.*paper_cnn, vgg16.*cmp\.yaml"
    ):
        compare(cfg, tmp_path / "cmp", progress=False, source=Path("cmp.yaml"))
    cfg = _one_model(
        root,
        compare={"models": ["paper_cnn"], "model_overrides": {"paper_cnn": {"train.lrr": 1}}},
    )
    with pytest.raises(
        ConfigError, match=r"^compare\.model_overrides\.paper_cnn: .*train\.lrr.*cmp\.yaml"
    ):
        compare(cfg, tmp_path / "cmp", progress=False, source=Path("cmp.yaml"))
    # an entry for a real model left out of compare.models (e.g. --set compare.models=...) is fine
    cfg = _one_model(
        root, compare={"models": ["paper_cnn"], "model_overrides": {"vgg16": {"train.lr": 1}}}
    )
    from marrowscope.engine.compare import model_configs

    assert list(model_configs(cfg)) == ["paper_cnn"]

"""The command line: every command runs, and bad input is one clear message with exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from marrowscope.cli.main import app

pytestmark = pytest.mark.integration
runner = CliRunner()


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_and_module_entry_point() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "marrowscope", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for cmd in ("data", "train", "evaluate", "compare"):
        assert cmd in res.stdout


@pytest.mark.parametrize(
    ("command", "extras"),
    [("predict", ["marrowscope[ray]", "marrowscope[int8]"]), ("serve", ["marrowscope[int8]"])],
)
def test_help_shows_the_install_extras_in_brackets(command: str, extras: list[str]) -> None:
    """Rich markup would take ``[ray]`` for a style tag and print ``pip install 'marrowscope'``."""
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    for extra in extras:
        assert extra in text


def test_help_paragraphs_are_wrapped_by_the_terminal_not_the_source() -> None:
    """Typer's Rich help kept a docstring's source line breaks: at 80 columns `count --help`
    printed "whole" / "fields of" / "view." on three lines. Every command's help is now whole
    paragraphs, so each line of a paragraph but its last is filled to the terminal's width."""
    from marrowscope.cli import serve
    from marrowscope.cli.main import data_app

    for typer_app in (app, data_app, serve.users_app):
        for info in typer_app.registered_commands:
            assert info.help, info.callback
            assert "\n" not in info.help.replace("\n\n", ""), info.help
    res = runner.invoke(app, ["count", "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = [line.strip() for line in res.output.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("A sample is a folder"))
    paragraph = lines[start : lines.index("", start)]
    assert len(paragraph) == 3 and all(len(line) >= 70 for line in paragraph[:-1]), paragraph


def test_data_scan_reports_counts_and_unreadable(synthetic_tree: Path, tmp_path: Path) -> None:
    (synthetic_tree / "CCC" / "empty.png").write_bytes(b"")
    (synthetic_tree / "notes.txt").write_text("ignored")
    out = tmp_path / "scan.json"
    res = _invoke("data", "scan", str(synthetic_tree), "--json", str(out), "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "AAA" in res.output and "unreadable" in res.output and "empty.png" in res.output
    scan = json.loads(out.read_text())
    assert scan["counts"] == {"AAA": 12, "BBB": 12, "CCC": 12}
    assert scan["sizes"] == {"48x48": 36}
    assert [u["path"] for u in scan["unreadable"]] == [str(synthetic_tree / "CCC" / "empty.png")]


def test_data_scan_reports_identical_files(synthetic_tree: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(synthetic_tree / "AAA" / "AAA_001.png", synthetic_tree / "BBB" / "x.png")
    shutil.copy(synthetic_tree / "CCC" / "CCC_002.jpg", synthetic_tree / "CCC" / "y.jpg")
    out = tmp_path / "scan.json"
    res = _invoke("data", "scan", str(synthetic_tree), "--json", str(out), "--workers", "1")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "label conflicts" in text and "identical copies" in text
    assert "1 image(s) are byte-identical copies filed under different classes" in text
    dups = json.loads(out.read_text())["duplicates"]
    assert [(d["classes"], d["conflict"]) for d in dups] == [
        (["AAA", "BBB"], True),
        (["CCC", "CCC"], False),
    ]
    assert dups[1]["paths"] == [
        str(synthetic_tree / "CCC" / "CCC_002.jpg"),
        str(synthetic_tree / "CCC" / "y.jpg"),
    ]


def test_data_scan_of_bundled_sample() -> None:
    res = _invoke("data", "scan", "builtin:bm-sample", "--workers", "1")
    assert res.exit_code == 0, res.output
    for c in ("ART", "BLA", "EOS", "LYT", "MON", "NGS", "NIF", "PMO"):
        assert c in res.output
    assert "250x250" in res.output


def test_data_manifest_subset_and_split(synthetic_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    res = _invoke(
        "data",
        "manifest",
        str(synthetic_tree),
        "--out",
        str(out),
        "--classes",
        "CCC,AAA",
        "--max-per-class",
        "8",
        "--min-per-class",
        "4",
        "--val",
        "0.25",
        "--test",
        "0.25",
        "--seed",
        "1",
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16
    assert [r["label"] for r in rows][:1] == ["CCC"]
    assert {r["label"] for r in rows} == {"AAA", "CCC"}
    for c in ("AAA", "CCC"):
        splits = [r["split"] for r in rows if r["label"] == c]
        assert splits.count("train") == 4 and splits.count("val") == 2 and splits.count("test") == 2


def test_manifest_errors_name_the_class_and_fix(synthetic_tree: Path, tmp_path: Path) -> None:
    (synthetic_tree / "DDD").mkdir()
    res = runner.invoke(
        app, ["data", "manifest", str(synthetic_tree), "--out", str(tmp_path / "m.csv")]
    )
    assert res.exit_code == 2
    assert "DDD" in res.output
    res = runner.invoke(
        app,
        [
            "data",
            "manifest",
            str(synthetic_tree),
            "--out",
            str(tmp_path / "m.csv"),
            "--classes",
            "AAA,BBB",
            "--min-per-class",
            "20",
        ],
    )
    assert res.exit_code == 2
    assert "AAA" in res.output and "min-per-class" in res.output
    assert not (tmp_path / "m.csv").exists()


def _write_cfg(tmp_path: Path, root: Path, **over: object) -> Path:
    cfg = {
        "name": "cli",
        "seed": 5,
        "data": {"root": str(root), "min_per_class": 4, "split": {"val": 0.25, "test": 0.25}},
        "preprocess": {"size": 32, "workers": 1},
        "model": {"name": "paper_cnn", "pretrained": False},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
        "compare": {"models": ["paper_cnn"], "focus_class": "AAA"},
    }
    cfg.update(over)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_evaluate_compare_commands(synthetic_tree: Path, tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, synthetic_tree)
    run = tmp_path / "run"
    res = _invoke(
        "train",
        "--config",
        str(cfg),
        "--run-dir",
        str(run),
        "--no-progress",
        "--set",
        "train.epochs=2",
    )
    assert res.exit_code == 0, res.output
    assert "Training finished" in res.output
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    res = _invoke("evaluate", str(run / "best"), str(synthetic_tree), "--out", str(tmp_path / "ev"))
    assert res.exit_code == 0, res.output
    assert "macro-F1" in res.output
    assert (tmp_path / "ev" / "metrics.json").is_file()
    res = _invoke("compare", "--config", str(cfg), "--out", str(tmp_path / "cmp"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cmp" / "table1_accuracy.csv").is_file()


def test_cv_command_fold_seed_and_train_fraction(synthetic_tree: Path, tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, synthetic_tree)
    out = tmp_path / "cv"
    args = ["cv", "--config", str(cfg), "--out", str(out), "--folds", "2", "--no-progress"]
    res = _invoke(*args, "--fold-seed", "3", "--train-fraction", "0.5", "--set", "train.epochs=1")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["fold_seed"] == 3 and summary["train_fraction"] == 0.5
    # 12 images per class, 6 per fold: each fold trains on 3 of the other fold's 6 per class
    assert summary["n_train"] == [9, 9]
    res = runner.invoke(app, [*args, "--train-fraction", "0", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2
    assert "--train-fraction" in res.output and "not in (0, 1]" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"trian": {"epochs": 1}}, "unknown config key trian"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"model": {"name": "no_such_net", "pretrained": False}}, "no_such_net"),
        ({"model": {"name": "resnet18", "pretrained": True}}, "weights_file"),
        (
            {
                "model": {
                    "name": "resnet18",
                    "pretrained": True,
                    "weights_file": "/nonexistent/w.pth",
                }
            },
            "/nonexistent/w.pth",
        ),
        ({"data": {"root": "/nonexistent/cells"}}, "/nonexistent/cells"),
    ],
)
def test_bad_config_is_one_clear_error(
    synthetic_tree: Path, tmp_path: Path, over: dict, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no network in tests: a hub download must fail fast, as it does offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _write_cfg(tmp_path, synthetic_tree, **over)
    res = runner.invoke(
        app, ["train", "--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress"]
    )
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert "Traceback" not in res.output


def test_data_manifest_refuses_to_overwrite_its_source_manifest(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    src = synthetic_tree / "cells.csv"
    lines = ["path,label,patient,stain_batch,notes"]
    for i, p in enumerate(sorted(synthetic_tree.rglob("*.png"))):
        lines.append(f"{p.relative_to(synthetic_tree)},{p.name[:3]},p{i % 3},b{i % 2},ok")
    src.write_text("\n".join(lines) + "\n")
    before = src.read_text()
    for out in (src, tmp_path / ".." / tmp_path.name / synthetic_tree.name / "cells.csv"):
        res = runner.invoke(
            app, ["data", "manifest", str(src), "--out", str(out), "--group-column", "patient"]
        )
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert "is the source manifest" in text and "cells-split.csv" in text
        assert src.read_text() == before  # the user's columns and relative paths are kept
    out = tmp_path / "m.csv"
    res = _invoke(
        "data", "manifest", str(src), "--out", str(out), "--min-per-class", "2",
        "--max-per-class", "4", "--val", "0.25", "--test", "0.25",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert {r["label"]: sum(x["label"] == r["label"] for x in rows) for r in rows} == {
        "AAA": 4,
        "BBB": 4,
        "CCC": 4,
    }  # the cap applies to a manifest as to a folder
    res = runner.invoke(
        app, ["data", "manifest", str(src), "--out", str(out), "--min-per-class", "7"]
    )
    assert res.exit_code == 2 and "fewer than min_per_class=7" in " ".join(res.output.split())


def test_a_file_name_that_is_not_utf8_is_a_scan_problem_and_refused_before_training(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    import os
    import shutil

    bad = os.fsdecode(str(synthetic_tree / "AAA").encode() + b"/caf\xe9.png")
    shutil.copy(synthetic_tree / "AAA" / "AAA_001.png", bad)
    out = tmp_path / "scan.json"
    res = _invoke("data", "scan", str(synthetic_tree), "--json", str(out), "--workers", "1")
    assert res.exit_code == 0, res.output
    assert "not valid UTF-8" in res.output and "rename" in res.output
    scan = json.loads(out.read_text())
    assert scan["counts"]["AAA"] == 12  # not counted usable
    [entry] = scan["unreadable"]
    assert "caf\\xe9.png" in entry["error"] and "not valid UTF-8" in entry["error"]
    run = tmp_path / "run"
    cfg = _write_cfg(tmp_path, synthetic_tree)
    res = runner.invoke(
        app, ["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]
    )
    assert res.exit_code == 2, res.output
    assert "not valid UTF-8" in " ".join(res.output.split())
    assert not (run / "config.yaml").exists()  # refused before writing the run's inputs
    cache = Path(os.environ["MARROWSCOPE_CACHE"])  # ... and before preprocessing any image
    assert not [p for p in cache.rglob("*") if p.is_file()]

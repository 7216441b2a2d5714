"""evaluate / benchmark / data: a wrong option or unusable input is one clear line, exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marrowscope.cli.main import app

runner = CliRunner()


def _fail(args: list[str]) -> str:
    """Run the CLI, expect exit code 2 without a traceback; the output in one line."""
    res = runner.invoke(app, args, env={"COLUMNS": "2000"})  # no wrapped usage-error box
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return " ".join(res.output.split())


@pytest.fixture
def unreadable_tree(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    for c, names in {"AAA": ["x0.png", "x1.png"], "BBB": ["y.jpg"]}.items():
        (root / c).mkdir(parents=True)
        for i, n in enumerate(names):
            (root / c / n).write_bytes(b"not an image %d" % i)
    return root


def test_evaluate_on_only_unreadable_images_says_so(
    tiny_bundle: Path, unreadable_tree: Path
) -> None:
    out = _fail(["evaluate", str(tiny_bundle), str(unreadable_tree)])
    assert "all 3 images" in out and "unreadable" in out and "x0.png" in out


def test_evaluate_split_on_a_folder_is_refused(tiny_bundle: Path, synthetic_tree: Path) -> None:
    out = _fail(["evaluate", str(tiny_bundle), str(synthetic_tree), "--split", "val"])
    assert "--split val" in out and "is a folder" in out


def test_evaluate_split_on_a_manifest_without_splits(
    tiny_bundle: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{next((synthetic_tree / 'AAA').glob('*.png'))},AAA\n")
    out = _fail(["evaluate", str(tiny_bundle), str(csv), "--split", "val"])
    assert "has no split column" in out


def test_evaluate_missing_manifest_file(tiny_bundle: Path, tmp_path: Path) -> None:
    out = _fail(["evaluate", str(tiny_bundle), str(tmp_path / "missing.csv")])
    assert "no such manifest file" in out and "missing.csv" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tta", "d4"], "'d4'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "gpu"], "unknown device 'gpu'"),
    ],
)
def test_evaluate_bad_options_are_one_line_before_any_work(
    tiny_bundle: Path, synthetic_tree: Path, args: list[str], expected: str
) -> None:
    out = _fail(["evaluate", str(tiny_bundle), str(synthetic_tree), *args])
    assert expected in out
    assert "Preprocessing" not in out  # refused before the images are read


def test_evaluate_cuda_without_a_gpu(
    tiny_bundle: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = _fail(["evaluate", str(tiny_bundle), str(synthetic_tree), "--device", "cuda"])
    assert "no CUDA GPU" in out and "--device cpu" in out


def test_evaluate_focus_not_a_class_warns(tiny_bundle: Path, synthetic_tree: Path) -> None:
    res = runner.invoke(app, ["evaluate", str(tiny_bundle), str(synthetic_tree), "--focus", "ZZZ"])
    assert res.exit_code == 0, res.output
    assert "--focus ZZZ is not a class of the model" in " ".join(res.output.split())


def test_a_training_run_folder_is_named_as_such(
    tiny_bundle: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_bundle, run / "best")
    shutil.copytree(tiny_bundle, run / "last")
    for cmd in (["evaluate", str(run), str(synthetic_tree)], ["export", str(run)]):
        out = _fail(cmd)
        assert "is a training run folder" in out and f"{run / 'best'}" in out, out
        assert "incomplete" not in out


def test_data_options_are_checked(synthetic_tree: Path, tmp_path: Path) -> None:
    assert "--workers" in _fail(["data", "scan", str(synthetic_tree), "--workers", "-1"])
    folder = tmp_path / "existing"
    folder.mkdir()
    out = _fail(["data", "manifest", str(synthetic_tree), "--out", str(folder)])
    assert "is a folder" in out and "manifest.csv" in out


def test_benchmark_path_typo_is_no_such_folder(tmp_path: Path) -> None:
    out = _fail(["benchmark", str(tmp_path / "r" / "bets")])
    assert "no such checkpoint folder" in out and "unknown model name" not in out


def test_benchmark_skips_unreadable_images(tiny_bundle: Path, cell_files: list[Path]) -> None:
    folder = cell_files[0].parent
    (folder / "broken.png").write_bytes(b"junk")
    args = ["benchmark", str(tiny_bundle), "--images", str(folder), "--backends", "torch-fp32"]
    res = runner.invoke(app, [*args, "--batch-sizes", "2", "--min-time", "0", "--warmup", "0"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "skipped 1 unreadable image(s)" in res.output and "broken.png" in res.output

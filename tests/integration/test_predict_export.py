"""`marrowscope predict`, `export` and `benchmark` end to end on a tiny bundle and real cells."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from marrowscope.cli.main import app
from marrowscope.config import ModelConfig, PreprocessConfig
from marrowscope.data.sample import SAMPLE_ROOT
from marrowscope.engine.benchmark import run_benchmark, to_markdown
from marrowscope.models.bundle import save_bundle
from marrowscope.models.registry import build_model
from marrowscope.preprocess.ops import preprocess_params

pytestmark = pytest.mark.integration
runner = CliRunner()
CLASSES = ["ART", "BLA", "EOS"]


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=48)
    pre = preprocess_params(PreprocessConfig(size=48))
    return save_bundle(tmp_path / "best", model, {"classes": CLASSES, "preprocess": pre})


@pytest.fixture
def cells(tmp_path: Path) -> Path:
    """Real cells in nested folders, plus an unreadable file and a text file."""
    root = tmp_path / "cells"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for f in sorted((SAMPLE_ROOT / c).glob("*.jpg"))[:3]:
            shutil.copy(f, root / c / f.name)
    (root / "BLA" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image; ignored in folders")
    return root


def test_predict_csv_folder_and_glob_with_an_unreadable_file(
    bundle: Path, cells: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred.csv"
    res = _invoke(
        "predict", str(bundle), str(cells / "ART"), str(cells / "B*" / "*.jpg"),
        "--out", str(out), "--topk", "2", "--batch-size", "4", "--workers", "2", "--no-progress",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7  # 3 ART + 3 BLA + broken.jpg
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert "broken.jpg" in broken["error"] and broken["predicted"] == "" and broken["p_ART"] == ""
    good = [r for r in rows if not r["error"]]
    for r in good:
        probs = [float(r[f"p_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["predicted"] == r["top1"] == CLASSES[int(np.argmax(probs))]
        assert float(r["p_top1"]) >= float(r["p_top2"])
        assert r["model"] == str(bundle) and r["arch"] == "paper_cnn"
        assert r["marrowscope_version"] and r["warning"] == ""
    assert "top3" not in rows[0]
    assert "7 images, 1 error(s)" in res.output and "images/s" in res.output


def test_predict_without_out_prints_a_table_and_a_tally(
    bundle: Path, cells: Path, tmp_path: Path
) -> None:
    res = _invoke("predict", str(bundle), str(cells / "BLA"), "--no-progress")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rows = [ln for ln in lines if ".jpg" in ln and "│" in ln]
    assert len(rows) == 4  # 3 readable BLA cells + broken.jpg, one row each
    broken = next(ln for ln in rows if "broken.jpg" in ln)
    assert "unreadable" in broken
    for ln in rows:
        if ln is broken:
            continue
        cls = ln.split("│")[1].strip()
        conf = float(ln.split("│")[2])
        assert cls in CLASSES and 1 / len(CLASSES) <= conf <= 1.0
    tally = next(ln for ln in lines if ln and ln.split()[0] in CLASSES and "│" not in ln)
    assert sum(int(n) for n in tally.replace(",", " ").split()[1::2]) == 3
    assert "unreadable:" in res.output and "4 images, 1 error(s)" in res.output
    assert "--out FILE.csv keeps every probability" in res.output
    assert not list(tmp_path.glob("*.csv"))
    res = _invoke("predict", str(bundle), str(cells / "BLA"), "--engine", "ray")
    assert res.exit_code == 2 and "--engine ray writes a Parquet folder" in res.output


def test_predict_onnx_backend_after_export_matches_torch(
    bundle: Path, cells: Path, tmp_path: Path
) -> None:
    res = _invoke("export", str(bundle), "--format", "onnx")
    assert res.exit_code == 0, res.output
    assert "random images" in res.output and "real images" in res.output
    assert (bundle / "model.onnx").is_file()
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.json"
        res = _invoke(
            "predict", str(bundle), str(cells), "--out", str(out), "--backend", backend,
            "--no-progress", "--device", "cpu",
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        outs[backend] = json.loads(out.read_text())
    assert [r["path"] for r in outs["torch"]] == [r["path"] for r in outs["onnx"]]
    for a, b in zip(outs["torch"], outs["onnx"], strict=True):
        if a["error"]:
            assert b["error"] and b["predicted"] is None
            continue
        # torch may run bf16 on this CPU ("auto"), ONNX is fp32
        assert [a[f"p_{c}"] for c in CLASSES] == pytest.approx(
            [b[f"p_{c}"] for c in CLASSES], abs=0.03
        )


def test_export_of_a_shipped_model_goes_to_the_cache_where_the_onnx_backend_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export bm8` wrote ./bm8/model.onnx (which then hid the shipped model) with no weights
    sha256, and `predict bm8 --backend onnx` could not find it; now it goes to the per-user
    cache ($MARROWSCOPE_CACHE, a fresh folder per test) and is found from any folder."""
    import os

    import onnx

    from marrowscope.inference.predictor import Predictor
    from marrowscope.models.bundle import pretrained_index

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cells = tmp_path / "cells"
    cells.mkdir()
    for c in ("ART", "EOS", "LYT"):
        for f in sorted((SAMPLE_ROOT / c).glob("*.jpg"))[:2]:
            shutil.copy(f, cells / f.name)
    res = _invoke("predict", "bm8", str(cells), "--backend", "onnx", "--no-progress")
    assert res.exit_code == 2
    assert "create it once with: marrowscope export bm8 --format onnx" in res.output
    with pytest.raises(Exception, match="marrowscope export bm8 --format onnx"):
        Predictor.from_pretrained("bm8", backend="onnx")

    res = _invoke("export", "bm8")
    assert res.exit_code == 0, res.output
    target = Path(os.environ["MARROWSCOPE_CACHE"]) / "onnx" / "bm8" / "model.onnx"
    assert target.is_file() and f"wrote {target}" in " ".join(res.output.split())
    assert list(work.iterdir()) == []  # nothing in the working directory
    props = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    embedded = json.loads(props["marrowscope"])
    want = pretrained_index()["bm8"]["files"]["model.safetensors"]
    assert embedded["onnx"]["weights_sha256"] == want

    outs = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / f"{backend}.json"
        res = _invoke(
            "predict", "bm8", str(cells), "--backend", backend, "--device", "cpu",
            "--tta", "none", "--out", str(out), "--no-progress",
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        outs[backend] = json.loads(out.read_text())
    for a, b in zip(outs["onnx"], outs["torch"], strict=True):
        assert (a["model"], a["arch"]) == ("bm8", "mobilenetv2_100")
        assert a["predicted"] == b["predicted"]
    p = Predictor.from_pretrained("bm8", backend="onnx", tta="none")
    assert p.onnx_path_ == target and p.model_name_ == "bm8"
    # a folder named like the shipped model does not change where the export is found; the
    # hint then names the model so that the command works here
    (work / "bm8").mkdir()
    res = _invoke("predict", "builtin:bm8", str(cells), "--backend", "onnx", "--no-progress")
    assert res.exit_code == 0, res.output
    res = _invoke("predict", "builtin:pbc6", str(cells), "--backend", "onnx", "--no-progress")
    assert res.exit_code == 2 and "marrowscope export pbc6 --format onnx" in res.output


def test_predict_decoding_in_threads_gives_the_same_table(
    bundle: Path, cells: Path, tmp_path: Path
) -> None:
    tables = {}
    for decode in ("auto", "processes", "threads"):
        out = tmp_path / f"{decode}.csv"
        res = _invoke(
            "predict", str(bundle), str(cells), "--out", str(out), "--decode", decode,
            "--batch-size", "4", "--workers", "2", "--device", "cpu", "--no-progress",
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        tables[decode] = list(csv.DictReader(out.open()))
    assert len(tables["threads"]) == 10  # 9 cells + broken.jpg, whose error is kept
    assert tables["threads"] == tables["processes"] == tables["auto"]
    res = _invoke(
        "predict", str(bundle), str(cells), "--out", str(tmp_path / "x.csv"), "--decode", "gpu"
    )
    assert res.exit_code == 2 and "--decode must be auto, processes or threads" in res.output
    assert not (tmp_path / "x.csv").exists()


def test_predict_parquet(bundle: Path, cells: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq  # a dev dependency: installed by make test

    out = tmp_path / "p.parquet"
    res = _invoke("predict", str(bundle), str(cells / "EOS"), "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).num_rows == 3


def test_predict_bad_inputs_are_one_clear_line(bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _invoke("predict", str(bundle), str(empty), "--out", str(tmp_path / "p.csv"))
    assert res.exit_code == 2 and "no image files" in res.output and "Traceback" not in res.output
    res = _invoke("predict", str(bundle), str(empty), "--out", str(tmp_path / "p.xlsx"))
    assert res.exit_code == 2 and ".csv, .json or .parquet" in res.output
    res = _invoke("predict", str(tmp_path / "nope"), str(empty), "--out", str(tmp_path / "p.csv"))
    assert res.exit_code == 2
    cell = sorted((SAMPLE_ROOT / "ART").glob("*.jpg"))[0]
    res = _invoke(
        "predict", str(bundle), str(cell), "--out", str(tmp_path / "p.csv"), "--backend", "onnx"
    )
    assert res.exit_code == 2 and "marrowscope export" in res.output
    assert not (tmp_path / "p.csv").exists()


def test_export_of_a_corrupt_checkpoint_fails_cleanly(bundle: Path) -> None:
    (bundle / "model.safetensors").write_bytes(b"garbage")
    res = _invoke("export", str(bundle))
    assert res.exit_code == 2 and "corrupt weights" in res.output
    assert not (bundle / "model.onnx").exists()


def test_benchmark_tiny_run(bundle: Path, cells: Path, tmp_path: Path) -> None:
    rep = run_benchmark(
        str(bundle), batch_sizes=(2,), images=cells / "ART", warmup=1, min_time=0.05, min_iters=2
    )
    assert {(r.backend, r.mode) for r in rep.rows} == {
        (b, m)
        for b in ("torch-fp32", "torch-bf16", "onnx", "int8")
        for m in ("network", "end-to-end")
    }
    for r in rep.rows:
        if r.note:  # bf16 on a CPU without native support; int8 without marrowscope[int8]
            assert r.backend in ("torch-bf16", "int8") and r.images_per_s is None
        else:
            assert r.images_per_s > 0 and r.median_ms > 0 and r.p95_ms >= r.median_ms
    assert rep.settings["n_images"] == 3 and "decode" in rep.preprocess_ms
    md = to_markdown(rep)
    assert rep.machine["cpu"] in md and f"torch {torch.__version__}" in md and "onnxruntime" in md
    assert "| onnx | network | 2 |" in md


def test_benchmark_cli_model_name_writes_markdown(tmp_path: Path, cells: Path) -> None:
    out = tmp_path / "bench.md"
    res = _invoke(
        "benchmark", "paper_cnn", "--batch-sizes", "2", "--backends", "torch-fp32",
        "--min-time", "0.05", "--warmup", "1", "--images", str(cells / "EOS"), "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "random weights" in text and "| torch-fp32 | end-to-end | 2 |" in text
    res = _invoke("benchmark", "paper_cnn", "--backends", "tensorrt")
    assert res.exit_code == 2 and "tensorrt" in res.output


def test_export_int8_then_predict_with_the_int8_backend(
    bundle: Path, cells: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    guard = tmp_path / "guard"
    shutil.copytree(cells, guard, ignore=shutil.ignore_patterns("broken.jpg", "*.txt"))
    res = _invoke(
        "export", str(bundle), "--format", "int8", "--calibrate", str(guard),
        "--guard-data", str(guard), "--guard-tta", "none", "--max-f1-drop", "-1",
    )  # fmt: skip
    # an impossible threshold (macro-F1 must rise by 1): the guard refuses, names the numbers, writes nothing
    assert res.exit_code == 3 and "int8 accuracy guard failed" in res.output
    assert "top-1 agreement" in res.output and not (bundle / "int8").exists()
    res = _invoke("export", str(bundle), "--format", "int8", "--recheck", "maybe")
    assert res.exit_code == 2 and "auto, off or a margin in [0, 1]" in res.output
    res = _invoke(
        "export", str(bundle), "--format", "int8", "--calibrate", str(guard),
        "--guard-data", str(guard), "--guard-tta", "none", "--max-f1-drop", "-1", "--force",
        "--recheck", "1",  # every cell re-checked in fp32
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        "written anyway because of --force" in res.output
        and (bundle / "int8" / "model.xml").is_file()
        and (bundle / "int8" / "model_fp32.xml").is_file()
    )
    assert "OpenVINO streams: " in res.output  # the measured choice is said
    assert "fp32 re-check of uncertain cells: margin 1 (fixed;" in res.output
    out = tmp_path / "int8.json"
    res = _invoke(
        "predict", str(bundle), str(cells), "--out", str(out), "--backend", "int8", "--no-progress"
    )
    assert res.exit_code == 0, res.output
    assert "int8 backend, 9 uncertain cell(s) (100.0%) re-checked in fp32" in res.output
    rows = json.loads(out.read_text())
    assert len(rows) == 10 and sum(1 for r in rows if r["error"]) == 1
    fp32 = tmp_path / "fp32.json"
    res = _invoke(
        "predict", str(bundle), str(cells), "--out", str(fp32), "--device", "cpu", "--no-progress"
    )
    for a, b in zip(rows, json.loads(fp32.read_text()), strict=True):  # all re-checked: fp32
        if not a["error"]:
            assert [a[f"p_{c}"] for c in CLASSES] == pytest.approx(
                [b[f"p_{c}"] for c in CLASSES],
                abs=0.02,  # (torch may run bf16 here)
            )
    rep = run_benchmark(
        str(bundle), batch_sizes=(2,), backends=("int8",), images=cells / "ART", warmup=1,
        min_time=0.05, min_iters=2,
    )  # fmt: skip
    assert all(r.images_per_s for r in rep.rows)
    assert any("accuracy guard FAILED (written with --force)" in n for n in rep.notes)
    assert any("re-checked 100.0% of them (margin 1)" in n for n in rep.notes)

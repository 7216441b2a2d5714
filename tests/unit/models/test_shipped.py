"""The trained models that ship inside marrowscope (bm8, pbc6): files, checksums, classes, fp16
storage, model cards, and that they classify real cells."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from marrowscope.cli import main as cli_main
from marrowscope.cli.main import app
from marrowscope.inference.predictor import Predictor
from marrowscope.models.bundle import (
    PRETRAINED_DIR,
    load_bundle,
    pretrained_bundle,
    pretrained_index,
    read_metadata,
)
from marrowscope.utils.io import file_sha256

SHIPPED = {
    "bm8": ["ART", "BLA", "EOS", "LYT", "MON", "NGS", "NIF", "PMO"],
    "pbc6": ["BAS", "EOS", "LYT", "MON", "NGB", "NGS"],
}
SAMPLE = Path(__file__).resolve().parents[3] / "src" / "marrowscope" / "sample_data" / "bm"


def test_the_index_lists_exactly_the_shipped_models() -> None:
    assert sorted(pretrained_index()) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_match_their_sha256_and_classes(name: str) -> None:
    folder = pretrained_bundle(name)  # checks every file's sha256 itself
    assert folder == PRETRAINED_DIR / name
    for file, expected in pretrained_index()[name]["files"].items():
        assert file_sha256(folder / file) == expected
    meta = read_metadata(name)
    assert list(meta.classes) == SHIPPED[name]
    assert meta.input_size == 250 and meta.arch == "mobilenetv2_100"
    assert meta.pretrained["name"] == name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_small_and_float16_only_where_it_changes_nothing(name: str) -> None:
    path = PRETRAINED_DIR / name / "model.safetensors"
    assert path.stat().st_size <= 30 * 2**20
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    meta = read_metadata(name)
    parity = meta.pretrained["fp16_parity"]  # measured by the packer on every cell it scored
    assert parity["images"] >= 300
    dtype = meta.weights_dtype
    assert {str(v.dtype) for v in stored.values() if v.is_floating_point()} == {f"torch.{dtype}"}
    if dtype == "float16":
        assert parity["max_abs_diff"] <= 1e-3 and parity["agreement"] >= 0.995
    else:  # float16 was tried and would have moved a probability by more than 1e-3
        assert dtype == "float32" and parity["max_abs_diff"] > 1e-3
    # loaded back, the model computes in float32 with exactly the stored values
    model, _ = load_bundle(name)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            assert torch.equal(v, stored[k].float()), k


@pytest.mark.parametrize("name", SHIPPED)
def test_model_card_has_the_measured_numbers_and_the_limits(name: str) -> None:
    card = (PRETRAINED_DIR / name / "MODEL_CARD.md").read_text(encoding="utf-8")
    meta = read_metadata(name)
    ev = meta.pretrained["evaluation"]
    assert f"| macro-F1 | {ev['macro_f1']:.3f}" in card
    for cls in SHIPPED[name]:
        assert f"| {cls} |" in card
    assert "CC BY 4.0" in card and "Known limits" in card and "not a diagnostic" in card.lower()
    if name == "bm8":
        assert "No hairy cells (HAC)" in card


def test_bm8_classifies_real_bone_marrow_cells() -> None:
    """Real bundled Matek cells (they were among bm8's training cells: this checks that the
    shipped weights load and work, not how well they generalise; the model card says that)."""
    rows = list(csv.DictReader((SAMPLE / "MANIFEST.csv").open()))
    picked = [r for i, r in enumerate(rows) if i % 6 == 0]  # 32 cells, 4 per class
    p = Predictor.from_pretrained("bm8", device="cpu", tta="none")
    assert p.classes_ == SHIPPED["bm8"]
    got = p.predict([SAMPLE / r["path"] for r in picked])
    accuracy = float(np.mean([g == r["class"] for g, r in zip(got, picked, strict=True)]))
    assert accuracy >= 0.8


def test_models_command_lists_the_shipped_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_main.console, "width", 250)  # one line per model
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name, classes in SHIPPED.items():
        assert name in result.output
        assert all(c in result.output for c in classes)
    macro_f1 = read_metadata("bm8").pretrained["evaluation"]["macro_f1"]
    assert f"{macro_f1:.3f}" in result.output
    # what each number was measured on: both were refitted on every cell, so their recipes'
    # 3-fold cross-validations
    assert "(3-fold CV, 4,350 cells)" in result.output
    assert "(3-fold CV, 2,100 cells)" in result.output
    # the shipped white-cell detectors, the default marked, with their worst-origin val scores
    assert "wbc2 (default)" in result.output and "wbc1 " in result.output
    assert "0.930 / 0.976" in result.output and "0.944 / 0.990" in result.output


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_are_readable_by_everyone(name: str) -> None:
    """A wheel keeps the files' modes: a 0600 model.safetensors (safetensors' own mode) would
    be unreadable to every user but the one who installed it."""
    for file in pretrained_index()[name]["files"]:
        mode = (PRETRAINED_DIR / name / file).stat().st_mode
        assert mode & 0o444 == 0o444, f"{name}/{file}: mode {oct(mode & 0o777)}"


def test_an_unreadable_shipped_file_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from marrowscope.models import bundle

    def denied(path: object) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle, "file_sha256", denied)
    with pytest.raises(bundle.BundleError) as err:
        pretrained_bundle("bm8")
    msg = str(err.value)
    assert "bm8" in msg and "cannot be read (Permission denied)" in msg
    assert "chmod a+r" in msg and "reinstall marrowscope" in msg
    res = CliRunner().invoke(app, ["predict", "bm8", str(SAMPLE / "ART"), "--no-progress"])
    assert res.exit_code == 2 and "Permission denied" in res.output
    assert "Traceback" not in res.output


def test_a_local_folder_that_hides_a_shipped_name_is_named_with_the_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `marrowscope export bm8` used to leave behind (./bm8/model.onnx) made `predict bm8`
    fail with "bm8/metadata.json: missing"; now the error says what happened and how out."""
    from marrowscope.models.bundle import BundleError, save_bundle, shipped_name
    from marrowscope.models.registry import build_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bm8").mkdir()
    (tmp_path / "bm8" / "model.onnx").write_bytes(b"left by an old export")
    for load in (load_bundle, read_metadata, Predictor.from_checkpoint):
        with pytest.raises(BundleError, match=r"\./bm8 hides the shipped model bm8; rename it"):
            load("bm8")
    res = CliRunner().invoke(app, ["predict", "bm8", str(SAMPLE / "ART"), "--no-progress"])
    assert res.exit_code == 2 and "pass the shipped model as builtin:bm8" in res.output
    # the escape works everywhere a checkpoint is expected, and the Python API never looks here
    assert shipped_name("builtin:bm8") == "bm8" and shipped_name("bm8") is None
    assert list(read_metadata("builtin:bm8").classes) == SHIPPED["bm8"]
    assert Predictor.from_checkpoint("builtin:bm8", device="cpu").classes_ == SHIPPED["bm8"]
    assert Predictor.from_pretrained("bm8", device="cpu").model_name_ == "bm8"
    with pytest.raises(BundleError, match="unknown shipped model 'builtin:bm9'.*builtin:pbc6"):
        read_metadata("builtin:bm9")
    # a real bundle of that name still wins (documented): the user's own model
    from marrowscope.config import ModelConfig

    (tmp_path / "bm8" / "model.onnx").unlink()
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 2, input_size=32)
    save_bundle(tmp_path / "bm8", model, {"classes": ["A", "B"]})
    assert list(read_metadata("bm8").classes) == ["A", "B"]


def test_models_command_checks_the_files_as_loading_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from marrowscope.models import bundle

    copy = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED_DIR, copy)
    meta = copy / "bm8" / "metadata.json"
    meta.write_text(meta.read_text().replace('"name": "bm8"', '"name": "bm8x"', 1))
    monkeypatch.setattr(bundle, "PRETRAINED_DIR", copy)
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 2, res.output
    assert "does not match the expected" in res.output and "reinstall marrowscope" in res.output
    assert "bm8x" not in res.output


def test_predict_names_the_model_flags_grayscale_and_lists_skipped_files(tmp_path: Path) -> None:
    """The CSV's model column tells bm8 from pbc6; a grayscale cell is classified but flagged
    (per image, and once for the run); files of other extensions are named, not dropped silently;
    an upper-case .JPG is an image."""
    from PIL import Image

    cells = tmp_path / "cells"
    cells.mkdir()
    src = sorted((SAMPLE / "EOS").glob("*.jpg"))[:2]
    (cells / "a.jpg").write_bytes(src[0].read_bytes())
    (cells / "B.JPG").write_bytes(src[1].read_bytes())
    Image.open(src[0]).convert("L").save(cells / "gray.png")
    for name in ("c.webp", "d.jfif"):
        (cells / name).write_bytes(b"not read")
    rows = {}
    for name in SHIPPED:
        out = tmp_path / f"{name}.csv"
        res = CliRunner().invoke(
            app,
            ["predict", name, str(cells), "--out", str(out), "--tta", "none", "--no-progress"],
        )
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert "3 images, 0 error(s)" in text
        assert "1 image(s) are grayscale (gray.png)" in text
        assert "predictions on them are unreliable" in text
        assert "skipped 2 file(s)" in text and "(c.webp, d.jfif)" in text
        rows[name] = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
        assert set(rows[name]) == {"a.jpg", "B.JPG", "gray.png"}
        for r in rows[name].values():
            assert (r["model"], r["arch"]) == (name, "mobilenetv2_100")
        assert rows[name]["gray.png"]["warning"].startswith("grayscale image")
        assert rows[name]["a.jpg"]["warning"] == rows[name]["B.JPG"]["warning"] == ""
    assert rows["bm8"]["a.jpg"]["predicted"] == "EOS"

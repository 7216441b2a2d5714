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
    parity = meta.pretrained["fp16_parity"]  # measured by the packer on every validation cell
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
    # what each number was measured on: bm8 its validation cells, pbc6 (refitted on every cell)
    # its recipe's 3-fold cross-validation
    assert "(validation, 653 cells)" in result.output
    assert "(3-fold CV, 2,100 cells)" in result.output

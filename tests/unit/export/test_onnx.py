"""ONNX export: dynamic batch, embedded metadata, parity with PyTorch, loud failure, no leftovers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from marrowscope.export import onnx as onnx_export
from marrowscope.export.onnx import ExportError, export_checkpoint, sample_images  # noqa: E402
from marrowscope.inference import Predictor, PredictorError  # noqa: E402
from marrowscope.models.bundle import load_bundle, save_bundle  # noqa: E402


def test_export_embeds_metadata_and_matches_pytorch(
    tiny_bundle: Path, cell_files: list[Path]
) -> None:
    target, rep = export_checkpoint(tiny_bundle)
    assert target == tiny_bundle / "model.onnx" and target.is_file()
    assert rep.passed and rep.n_real == 16 and rep.n_random == 8
    assert rep.random_max_abs_diff <= 1e-4 and rep.real_max_abs_diff <= 1e-4

    m = onnx.load(str(target))
    meta = json.loads({p.key: p.value for p in m.metadata_props}["marrowscope"])
    bundle_meta = json.loads((tiny_bundle / "metadata.json").read_text())
    assert (
        meta["classes"] == bundle_meta["classes"]
        and meta["preprocess"] == bundle_meta["preprocess"]
    )
    assert meta["onnx"]["parity"]["real_max_abs_diff"] == rep.real_max_abs_diff
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    onnx_pred = Predictor.from_checkpoint(tiny_bundle, backend="onnx", batch_size=4)
    torch_pred = Predictor.from_checkpoint(tiny_bundle, precision="fp32", batch_size=4)
    assert onnx_pred.classes_ == torch_pred.classes_ and onnx_pred.backend == "onnx"
    for bs in (1, 4):  # dynamic batch axis: 1, 4 and a last partial batch of 2
        onnx_pred.batch_size = bs
        np.testing.assert_allclose(
            onnx_pred.predict_proba(cell_files), torch_pred.predict_proba(cell_files), atol=1e-4
        )
    with pytest.raises(PredictorError, match="no torch model"):
        onnx_pred.model  # noqa: B018

    # The .onnx file alone is enough (metadata travels inside it).
    alone = tiny_bundle.parent / "alone.onnx"
    shutil.copy(target, alone)
    assert Predictor.from_checkpoint(alone, backend="onnx").classes_ == torch_pred.classes_
    with pytest.raises(PredictorError, match="--backend onnx"):
        Predictor.from_checkpoint(alone)  # the torch backend needs the bundle folder


def test_sample_images_are_the_real_cells_preprocessed(tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    imgs = sample_images(meta["preprocess"], 32)
    assert len(imgs) == 16 and all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in imgs)
    assert len({a.tobytes() for a in imgs}) == 16


def test_parity_failure_is_loud_and_leaves_no_file(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exported graph that computes something else must be refused."""
    real_export = onnx_export._torch_export

    def export_a_different_model(model, path, *, opset):  # type: ignore[no-untyped-def]
        other = onnx_export.copy.deepcopy(model)
        with torch.no_grad():
            for prm in other.parameters():
                prm.mul_(1.5)
        return real_export(other, path, opset=opset)

    monkeypatch.setattr(onnx_export, "_torch_export", export_a_different_model)
    with pytest.raises(ExportError, match=r"parity check failed .*difference \d") as err:
        export_checkpoint(tiny_bundle)
    assert "exceeds 0.0001" in str(err.value)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["metadata.json", "model.safetensors"]


def test_stale_export_is_refused_after_the_weights_change(tiny_bundle: Path) -> None:
    target, _ = export_checkpoint(tiny_bundle)
    old = tiny_bundle.parent / "old.onnx"
    shutil.copy(target, old)
    model, meta = load_bundle(tiny_bundle)
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    save_bundle(tiny_bundle, model, meta)  # retrained weights in the same folder
    shutil.copy(old, tiny_bundle / "model.onnx")  # an export of the previous weights
    with pytest.raises(PredictorError, match=r"exported from other weights.*marrowscope export"):
        Predictor.from_checkpoint(tiny_bundle, backend="onnx")


def test_export_refuses_a_folder_as_output(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is a folder"):
        export_checkpoint(tiny_bundle, out=tmp_path)


def test_export_writes_the_opset_asked_for(tiny_bundle: Path) -> None:
    target, rep = export_checkpoint(tiny_bundle, opset=13)
    opsets = {o.domain: o.version for o in onnx.load(str(target)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 13 and rep.opset == 13


def test_export_refuses_an_opset_no_exporter_writes(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "_written_opset", lambda path: 21)
    with pytest.raises(ExportError, match=r"--opset 13 was asked for.*wrote opset 21"):
        export_checkpoint(tiny_bundle, opset=13)
    assert not (tiny_bundle / "model.onnx").exists()

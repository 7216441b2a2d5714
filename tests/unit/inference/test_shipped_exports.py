"""Which shipped model a predictor stands for: a ./bm8 left by an old export, exports of a
shipped model that cannot be traced to its weights, and the ``model`` name of copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from marrowscope.inference import Predictor, PredictorError
from marrowscope.inference import predictor as predictor_module
from marrowscope.inference.openvino_runtime import INT8_XML, default_int8_dir
from marrowscope.inference.predictor import default_onnx_path
from marrowscope.metadata import BundleMetadata
from marrowscope.models.bundle import (
    METADATA_NAME,
    PRETRAINED_DIR,
    WEIGHTS_NAME,
    BundleError,
    load_bundle,
    pretrained_index,
    save_bundle,
)

SHIPPED_SHA = pretrained_index()["bm8"]["files"][WEIGHTS_NAME]
SHADOW = r"\./bm8 hides the shipped model bm8; rename it or pass the shipped model as builtin:bm8"


def _onnx(bundle: Path, target: Path, *, sha: str | None, **meta_changes: object) -> Path:
    """An ONNX export of the tiny ``bundle`` at ``target``, recording ``sha`` as its source."""
    from marrowscope.export.onnx import export_onnx

    model, meta = load_bundle(bundle)
    target.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, target, meta.replace(**meta_changes), n_random=1, weights_sha256=sha)
    return target


def _int8_folder(folder: Path, bundle: Path, *, sha: str | None) -> Path:
    """A stand-in int8 export folder (its model file is no real model: the checks come first)."""
    folder.mkdir(parents=True)
    (folder / INT8_XML).write_text("<net/>")
    meta = BundleMetadata.read(bundle / METADATA_NAME)
    info = {"streams": 1, **({"weights_sha256": sha} if sha else {})}
    meta.replace(int8=info).write(folder / METADATA_NAME)
    return folder


# ------------------------------------------------------------ ./bm8 left by an old export


def test_a_leftover_bm8_folder_with_only_an_onnx_model_is_the_shadow_error(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export bm8` used to write ./bm8/model.onnx; `predict bm8 --backend onnx` then ran that
    file silently (the sha check needs ./bm8/model.safetensors, which is not there)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _onnx(tiny_bundle, work / "bm8" / "model.onnx", sha=None)
    with pytest.raises(BundleError, match=SHADOW):
        Predictor.from_checkpoint("bm8", backend="onnx")
    # a file ./bm8 (an ONNX model without its extension) hides it just as well
    shutil.move(work / "bm8" / "model.onnx", work / "bm8.onnx")
    (work / "bm8").rmdir()
    (work / "bm8.onnx").rename(work / "bm8")
    with pytest.raises(BundleError, match=SHADOW):
        Predictor.from_checkpoint("bm8", backend="onnx")


def test_a_leftover_bm8_folder_with_only_an_int8_export_is_the_shadow_error(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _int8_folder(work / "bm8" / "int8", tiny_bundle, sha="0" * 64)
    with pytest.raises(BundleError, match=SHADOW):
        Predictor.from_checkpoint("bm8", backend="int8")
    # the escape still names the shipped model (whose int8 export is not made yet)
    with pytest.raises(PredictorError, match="export builtin:bm8 --format int8"):
        Predictor.from_checkpoint("builtin:bm8", backend="int8")


# ---------------------------------------------------- exports of a shipped model, traced


def test_a_shipped_models_onnx_export_must_record_the_shipped_weights(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = default_onnx_path("builtin:bm8")  # in this test's $MARROWSCOPE_CACHE
    _onnx(tiny_bundle, target, sha=None)
    with pytest.raises(PredictorError, match="does not record which weights") as err:
        Predictor.from_checkpoint("builtin:bm8", backend="onnx")
    assert "export it again with: marrowscope export bm8 --format onnx" in str(err.value)
    _onnx(tiny_bundle, target, sha="0" * 64)
    with pytest.raises(PredictorError, match="other weights than the shipped model bm8"):
        Predictor.from_checkpoint("builtin:bm8", backend="onnx")
    # the recorded sha256 is compared with the index: the shipped weights are not hashed again
    _onnx(tiny_bundle, target, sha=SHIPPED_SHA)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(predictor_module, "file_sha256", no_hashing)
    p = Predictor.from_checkpoint("builtin:bm8", backend="onnx")
    assert p.onnx_path_ == target and p.model_name_ == "bm8"


def test_a_shipped_models_int8_export_must_record_the_shipped_weights(tiny_bundle: Path) -> None:
    folder = _int8_folder(default_int8_dir("builtin:bm8"), tiny_bundle, sha=None)
    with pytest.raises(PredictorError, match="does not record which weights") as err:
        Predictor.from_checkpoint("builtin:bm8", backend="int8")
    assert "export it again with: marrowscope export bm8 --format int8" in str(err.value)
    shutil.rmtree(folder)
    _int8_folder(folder, tiny_bundle, sha="0" * 64)
    with pytest.raises(PredictorError, match="other weights than the shipped model bm8"):
        Predictor.from_checkpoint("builtin:bm8", backend="int8")


# --------------------------------------------------------------- the model column of copies


def test_only_the_shipped_model_and_unchanged_copies_are_named_bm8(tmp_path: Path) -> None:
    """The CSV's model column trusted metadata.pretrained.name: every copy of bm8 (re-saved,
    recalibrated, fine-tuned) was labelled bm8."""
    copy = tmp_path / "copy"
    shutil.copytree(PRETRAINED_DIR / "bm8", copy)
    assert Predictor.from_checkpoint(copy, device="cpu").model_name_ == "bm8"  # same files

    recalibrated = tmp_path / "recalibrated"
    shutil.copytree(copy, recalibrated)
    meta_file = recalibrated / METADATA_NAME
    data = json.loads(meta_file.read_text())
    data["inference"]["temperature"] = 1.7
    meta_file.write_text(json.dumps(data))
    p = Predictor.from_checkpoint(recalibrated, device="cpu")
    assert p.bundle_metadata_.pretrained["name"] == "bm8"
    assert p.model_name_ == str(recalibrated)

    model, meta = load_bundle(copy)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    tuned = save_bundle(tmp_path / "tuned", model, meta)
    assert Predictor.from_checkpoint(tuned, device="cpu").model_name_ == str(tuned)
    p = Predictor.from_model(model, meta, device="cpu")
    assert p.model_name_ == "<in-memory mobilenetv2_100>"


def test_an_export_whose_metadata_names_bm8_is_bm8_only_with_its_weights(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    _, meta = load_bundle(tiny_bundle)
    claims = {"pretrained": {"name": "bm8"}}
    other = _onnx(tiny_bundle, tmp_path / "other.onnx", sha="0" * 64, **claims)
    assert Predictor.from_checkpoint(other, backend="onnx").model_name_ == str(other)
    # the shipped weights' sha256, but not bm8's classes: still not bm8
    same_sha = _onnx(tiny_bundle, tmp_path / "same.onnx", sha=SHIPPED_SHA, **claims)
    assert Predictor.from_checkpoint(same_sha, backend="onnx").model_name_ == str(same_sha)

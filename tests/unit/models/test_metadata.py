"""The typed bundle metadata: the one reader/writer of metadata.json, old bundles, bad ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marrowscope.inference.predictor import Predictor
from marrowscope.metadata import BUNDLE_FORMAT, BundleMetadata, InferenceSettings, MetadataError
from marrowscope.models.bundle import METADATA_NAME, BundleError, load_bundle, read_metadata

# the keys marrowscope 0.1.0 wrote before the bundle learnt test-time augmentation, temperature
# and float16 storage (commit 554d2c2): no "inference", no "weights_dtype"
OLD_KEYS = (
    "classes",
    "weights_source",
    "preprocess",
    "config",
    "epoch",
    "metrics",
    "train_counts",
    "created",
    "torch_version",
    "format",
    "marrowscope_version",
    "architecture",
    "arch",
    "input_size",
    "mean",
    "std",
)


def _meta(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / METADATA_NAME).read_text())


def _write(bundle: Path, meta: dict[str, Any]) -> None:
    (bundle / METADATA_NAME).write_text(json.dumps(meta))


def test_an_old_bundle_loads_and_predicts_as_before(tiny_bundle: Path) -> None:
    cells = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(3)]
    current = Predictor.from_checkpoint(tiny_bundle, device="cpu", precision="fp32")
    expected = current.predict_proba(cells)
    meta = _meta(tiny_bundle)
    old = {k: meta.get(k) for k in OLD_KEYS}
    old.update(epoch=7, metrics={"macro_f1": 0.5}, created="2026-11-28T10:00:00+00:00")
    old.update(torch_version="2.14.1", config={"name": "old-run"}, train_counts={"AAA": 4})
    _write(tiny_bundle, old)

    typed = read_metadata(tiny_bundle)
    assert typed.inference == InferenceSettings(tta="none", temperature=1.0)
    assert typed.weights_dtype == "float32" and typed.epoch == 7
    assert typed.extra == {"created": "2026-11-28T10:00:00+00:00", "torch_version": "2.14.1"}
    p = Predictor.from_checkpoint(tiny_bundle, device="cpu", precision="fp32")
    assert p.tta_ == "none" and p.temperature_ == 1.0 and p.arch == "paper_cnn"
    np.testing.assert_allclose(p.predict_proba(cells), expected, atol=1e-6)
    assert p.metadata["created"] == "2026-11-28T10:00:00+00:00"  # the JSON view keeps every key


def test_arch_defaults_to_the_architecture_name(tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle)
    del meta["arch"]
    _write(tiny_bundle, meta)
    assert read_metadata(tiny_bundle).arch == "paper_cnn"
    assert Predictor.from_checkpoint(tiny_bundle, device="cpu").arch == "paper_cnn"


def test_round_trip_through_the_file_keeps_unknown_keys(tmp_path: Path, tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle)
    meta["future_note"] = {"kept": [1, 2]}
    typed = BundleMetadata.from_dict(meta, "x")
    assert typed.extra == {"future_note": {"kept": [1, 2]}}
    typed.write(tmp_path / METADATA_NAME)
    again = BundleMetadata.read(tmp_path / METADATA_NAME)
    assert again == typed
    assert json.loads((tmp_path / METADATA_NAME).read_text())["future_note"] == {"kept": [1, 2]}
    changed = typed.replace(inference={"tta": "d8", "temperature": 0.8})
    assert changed.inference == InferenceSettings(tta="d8", temperature=0.8)
    assert typed.inference.tta == "none"  # frozen: replace returns a copy


def _drop(key: str) -> Any:
    return lambda m: m.pop(key)


def _set(key: str, value: Any) -> Any:
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop("classes"), r"missing key\(s\) classes"),
        (_drop("architecture"), r"missing key\(s\) architecture"),
        (_drop("format"), r"no valid 'format' number \(got None\)"),
        (_set("format", "1"), r"no valid 'format' number \(got '1'\)"),
        (_set("format", BUNDLE_FORMAT + 1), r"bundle format 2 was written by .*upgrade"),
        (_set("input_size", "32"), r"'input_size' must be a positive integer, got '32'"),
        (_set("input_size", 0), r"'input_size' must be a positive integer, got 0"),
        (_set("classes", "AAA,BBB"), r"'classes' must list at least 2 class names"),
        (_set("classes", ["AAA", "AAA", "CCC"]), r"'classes' names a class twice"),
        (_set("mean", [0.5, 0.5]), r"'mean' must be 3 numbers \(R, G, B\)"),
        (_set("std", [0.5, 0.0, 0.5]), r"'std' must be 3 positive numbers"),
        (_set("architecture", "paper_cnn"), r"'architecture' must be a JSON object"),
        (_set("preprocess", [32]), r"'preprocess' must be a JSON object, got \[32\]"),
        (_set("epoch", "3"), r"'epoch' must be an integer, got '3'"),
        (_set("weights_dtype", "int8"), r"'weights_dtype' must be one of float32, float16"),
        (_set("inference", {"temperature": "hot"}), r"inference.temperature must be a positive"),
    ],
)
def test_a_bad_bundle_names_the_file_and_the_key(
    tiny_bundle: Path, change: Any, message: str
) -> None:
    meta = _meta(tiny_bundle)
    change(meta)
    _write(tiny_bundle, meta)
    path = str(tiny_bundle / METADATA_NAME)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(tiny_bundle)
    assert str(err.value).startswith(path)
    with pytest.raises(BundleError, match=message):
        Predictor.from_checkpoint(tiny_bundle, device="cpu")


def test_the_checks_are_the_same_for_any_source() -> None:
    with pytest.raises(MetadataError, match=r"^model.onnx: expected a JSON object"):
        BundleMetadata.from_dict([1, 2], "model.onnx")
    with pytest.raises(MetadataError, match=r"^x: corrupt JSON"):
        BundleMetadata.from_json("{", "x")
    with pytest.raises(MetadataError, match=r"metadata.json: missing; the bundle is incomplete"):
        BundleMetadata.read(Path("/nonexistent/metadata.json"))


def test_a_prediction_needs_the_preprocessing(tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle)
    del meta["preprocess"]
    _write(tiny_bundle, meta)
    model, typed = load_bundle(tiny_bundle)  # a bare model still loads
    assert typed.preprocess is None and model.num_classes == 3
    with pytest.raises(BundleError, match=r"metadata.json: the metadata lacks 'preprocess'"):
        Predictor.from_checkpoint(tiny_bundle, device="cpu")

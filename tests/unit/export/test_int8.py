"""int8 export (OpenVINO + NNCF): agreement with fp32 on the bundled real cells, a guard that
refuses a broken quantisation, metadata that round-trips, stale and missing-runtime errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from marrowscope.data.sample import SAMPLE_ROOT  # noqa: E402
from marrowscope.export.int8 import (  # noqa: E402
    GuardFailedError,
    Int8Export,
    export_int8_checkpoint,
)
from marrowscope.inference import Predictor, PredictorError, collect_image_paths  # noqa: E402
from marrowscope.inference.openvino_runtime import (  # noqa: E402
    OpenVINORunner,
    RuntimeMissingError,
)
from marrowscope.metadata import BundleMetadata  # noqa: E402
from marrowscope.metrics.agreement import GuardReport  # noqa: E402
from marrowscope.models.bundle import load_bundle, pretrained_bundle, save_bundle  # noqa: E402
from marrowscope.utils.io import file_sha256  # noqa: E402

# bm8 int8 against bm8 fp32 on the 192 bundled cells, one view each
MIN_AGREEMENT = 0.98
MAX_PROB_DIFF = 0.35


@pytest.fixture(scope="module")
def bm8_int8(tmp_path_factory: pytest.TempPathFactory) -> Int8Export:
    """The shipped bm8 quantised on 96 bundled cells, guarded on all 192 (one view)."""
    out = tmp_path_factory.mktemp("int8") / "bm8-int8"
    return export_int8_checkpoint(
        "bm8",
        out=out,
        calibrate=SAMPLE_ROOT,
        calibration_size=96,
        guard_data="builtin:bm-sample",
        guard_tta="none",
        min_agreement=MIN_AGREEMENT,
        workers=2,
    )


def test_int8_agrees_with_fp32_on_the_bundled_cells(bm8_int8: Int8Export) -> None:
    g = bm8_int8.guard
    assert g.passed and not bm8_int8.forced and g.n == 192
    assert g.agreement >= MIN_AGREEMENT and g.max_prob_diff < MAX_PROB_DIFF
    assert abs(g.macro_f1_drop) <= 0.02

    files = collect_image_paths([SAMPLE_ROOT])
    int8 = Predictor.from_checkpoint(bm8_int8.path, backend="int8", tta="none", batch_size=32)
    fp32 = Predictor.from_pretrained("bm8", precision="fp32", tta="none", batch_size=32)
    assert int8.backend == "int8" and int8.classes_ == fp32.classes_
    p8 = np.stack([r.probs for r in int8.predict_paths(files, workers=2, progress=False)])
    p32 = np.stack([r.probs for r in fp32.predict_paths(files, workers=2, progress=False)])
    assert np.allclose(p8.sum(1), 1, atol=1e-4)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= MIN_AGREEMENT
    assert np.abs(p8 - p32).max() < MAX_PROB_DIFF
    # the runtime's own name works too, and there is no torch model behind it
    alias = Predictor.from_checkpoint(bm8_int8.path, backend="openvino", tta="none")
    assert alias.backend == "int8"
    with pytest.raises(PredictorError, match="no torch model"):
        alias.model  # noqa: B018
    with pytest.raises(PredictorError, match="--backend int8"):
        Predictor.from_checkpoint(bm8_int8.path)


def test_exported_metadata_round_trips(bm8_int8: Int8Export) -> None:
    meta = BundleMetadata.read(bm8_int8.path / "metadata.json")
    assert BundleMetadata.from_dict(meta.to_dict(), "again") == meta
    shipped = BundleMetadata.read(pretrained_bundle("bm8") / "metadata.json")
    assert meta.classes == shipped.classes and meta.preprocess == shipped.preprocess
    assert meta.inference == shipped.inference and meta.input_size == shipped.input_size
    info = meta.int8
    assert info is not None and info["runtime"] == "openvino"
    assert info["weights_sha256"] == file_sha256(pretrained_bundle("bm8") / "model.safetensors")
    cal = info["calibration"]
    assert cal["n"] == cal["n_used"] == 96 == len(cal["files"]) and cal["of"] == 192
    assert all((Path(cal["root"]) / f).is_file() for f in cal["files"])
    guard = info["guard"]
    assert GuardReport.from_dict(guard) == bm8_int8.guard
    assert guard["passed"] is True and guard["forced"] is False and guard["tta"] == "none"
    assert "builtin:bm-sample" in guard["data"]
    assert GuardReport.from_dict(guard["single_view"]) == bm8_int8.guard_single_view
    assert {p.name for p in bm8_int8.path.iterdir()} == {"model.xml", "model.bin", "metadata.json"}
    measured = info["streams_measured"]
    assert info["streams"] == measured["streams"] in (1, 2) and measured["batch"] == 16
    if measured["images_per_s"] is not None:  # (None: one thread, nothing to choose)
        rate = measured["images_per_s"]
        assert rate["1"] > 0 and rate["2"] > 0
        assert (info["streams"] == 2) == (rate["2"] >= 1.05 * rate["1"])


def test_two_streams_give_the_logits_of_one(bm8_int8: Int8Export) -> None:
    """Splitting a batch between two streams changes nothing but the speed: the same logits
    for every batch size, odd ones and a single image included."""
    xml = bm8_int8.path / "model.xml"
    one = OpenVINORunner(xml, threads=2, streams=1)
    two = OpenVINORunner(xml, threads=2, streams=2)
    assert (one.streams, two.streams) == (1, 2)
    assert OpenVINORunner(xml, threads=1, streams=2).streams == 1  # nothing to split
    rng = np.random.default_rng(0)
    size = one.input_shape[-1]
    for n in (1, 2, 5, 16):
        batch = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        a, b = one.infer_uint8(batch), two.infer_uint8(batch)
        assert a.shape == b.shape == (n, 8)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        np.testing.assert_allclose(two(x), a, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="streams must be 1 or 2"):
        OpenVINORunner(xml, threads=2, streams=3)


def test_guard_refuses_calibration_on_blank_images(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(12):
        Image.fromarray(np.full((250, 250, 3), 255, np.uint8)).save(blank / f"white_{i}.png")
    out = tmp_path / "never"
    with pytest.raises(GuardFailedError) as err:
        export_int8_checkpoint(
            "bm8",
            out=out,
            calibrate=blank,
            guard_data="builtin:bm-sample",
            guard_tta="none",
            workers=2,
        )
    msg = str(err.value)
    assert "int8 accuracy guard failed for bm8" in msg and "top-1 agreement" in msg
    assert "< 0.99" in msg and "Nothing was written" in msg and "--calibrate DIR" in msg
    assert "--force" in msg and "192 labelled cells" in msg
    assert err.value.report.agreement < 0.9 and not err.value.report.passed
    assert not out.exists() and not list(tmp_path.glob(".never.tmp-*"))


def test_tiny_export_forced_stale_and_missing_runtime(
    tiny_bundle: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = export_int8_checkpoint(
        tiny_bundle,
        calibrate=synthetic_tree,
        guard_data=synthetic_tree,
        guard_tta="none",
        min_agreement=1.01,  # cannot pass: the export is written only because of force
        force=True,
        workers=1,
    )
    assert res.path == tiny_bundle / "int8" and res.forced and not res.passed
    meta = BundleMetadata.read(res.path / "metadata.json")
    assert meta.int8 is not None and meta.int8["guard"]["forced"] is True
    assert meta.int8["guard"]["passed"] is False and meta.int8["calibration"]["n_used"] == 36
    pred = Predictor.from_checkpoint(tiny_bundle, backend="int8", batch_size=5)
    probs = pred.predict_proba(sorted(synthetic_tree.rglob("*.png"))[:7])  # batches 5 + 2
    assert probs.shape == (7, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if marrowscope[int8] were missing
    with pytest.raises(RuntimeMissingError, match=r"pip install 'marrowscope\[int8\]'"):
        Predictor.from_checkpoint(tiny_bundle, backend="int8")
    monkeypatch.undo()

    kept = tiny_bundle.parent / "int8-copy"
    shutil.copytree(res.path, kept)
    model, meta0 = load_bundle(tiny_bundle)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_bundle(tiny_bundle, model, meta0)  # new weights (the new folder has no int8 export)
    with pytest.raises(PredictorError, match="no int8 export"):
        Predictor.from_checkpoint(tiny_bundle, backend="int8")
    shutil.copytree(kept, tiny_bundle / "int8")  # an export of the old weights put back
    with pytest.raises(PredictorError, match="exported from other weights"):
        Predictor.from_checkpoint(tiny_bundle, backend="int8")


def test_int8_backend_without_an_export_names_the_command(tiny_bundle: Path) -> None:
    with pytest.raises(PredictorError, match=r"marrowscope export .* --format int8"):
        Predictor.from_checkpoint(tiny_bundle, backend="int8")
    with pytest.raises(PredictorError, match="runs on the CPU"):
        Predictor.from_checkpoint(tiny_bundle, backend="int8", device="cuda")

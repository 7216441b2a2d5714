"""int8 export (OpenVINO + NNCF): agreement with fp32 on the bundled real cells, a guard that
refuses a broken quantisation, metadata that round-trips, stale and missing-runtime errors."""

from __future__ import annotations

import shutil
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from marrowscope.data.sample import SAMPLE_ROOT  # noqa: E402
from marrowscope.export.int8 import (  # noqa: E402
    RECHECK_MAX_SHARE,
    GuardFailedError,
    Int8Export,
    calibration_images,
    convert_openvino,
    export_int8_checkpoint,
    fit_recheck_margin,
)
from marrowscope.inference import Predictor, PredictorError, collect_image_paths  # noqa: E402
from marrowscope.inference.openvino_runtime import (  # noqa: E402
    OpenVINORunner,
    RuntimeMissingError,
)
from marrowscope.metadata import BundleMetadata  # noqa: E402
from marrowscope.metrics.agreement import GuardReport  # noqa: E402
from marrowscope.models.bundle import load_bundle, pretrained_bundle, save_bundle  # noqa: E402
from marrowscope.utils.io import current_version, file_sha256  # noqa: E402

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
    rc = info["recheck"]
    assert rc == bm8_int8.recheck and rc["setting"] == "auto" and rc["cells"] == 96
    assert 0 <= rc["margin"] <= 1 and rc["share"] <= RECHECK_MAX_SHARE
    assert rc["agreement_with_recheck"] >= rc["agreement_int8"]
    files = {"model.xml", "model.bin", "metadata.json"}
    if rc["margin"] > 0:  # the fp32 model of the re-check travels with the export
        files |= {"model_fp32.xml", "model_fp32.bin"}
    version = current_version(bm8_int8.path)  # the files, in the export's current version
    assert version.parent == bm8_int8.path and {p.name for p in version.iterdir()} == files
    shown = {p.name for p in bm8_int8.path.iterdir() if not p.name.startswith(".")}
    assert shown == files and all((bm8_int8.path / f).is_symlink() for f in files)
    assert cal["recheck_fit_cells"] == 96  # the other half of the 192 bundled cells
    measured = info["streams_measured"]
    assert info["streams"] == measured["streams"] in (1, 2) and measured["batch"] == 16
    if measured["images_per_s"] is not None:  # (None: one thread, nothing to choose)
        rate = measured["images_per_s"]
        assert rate["1"] > 0 and rate["2"] > 0
        assert (info["streams"] == 2) == (rate["2"] >= 1.05 * rate["1"])


def test_fit_recheck_margin_covers_the_int8_perturbation_of_the_top_two_gap() -> None:
    rng = np.random.default_rng(0)
    n = 400
    p32 = rng.dirichlet(np.ones(4), n).astype(np.float32)
    noise = rng.normal(0, 0.01, p32.shape).astype(np.float32)
    p8 = np.clip(p32 + noise, 0, None)
    p8 /= p8.sum(1, keepdims=True)
    order = np.argsort(p8, 1)
    rows = np.arange(n)
    gap8 = p8[rows, order[:, -1]] - p8[rows, order[:, -2]]
    change = np.abs(gap8 - (p32[rows, order[:, -1]] - p32[rows, order[:, -2]]))
    fit = fit_recheck_margin(p32, p8, coverage=0.99, max_share=1.0)
    q = np.quantile(change, 0.99)
    assert fit["perturbation_quantile"] == pytest.approx(q, abs=1e-4)
    assert q <= fit["margin"] < q + 0.01 + 1e-9 and not fit["capped"]  # rounded up to 0.01
    assert fit["share"] == pytest.approx((gap8 < fit["margin"]).mean(), abs=1e-4)
    flips = p8.argmax(1) != p32.argmax(1)
    assert flips.any() and (gap8[flips] < fit["margin"]).mean() >= 0.9  # the flips are covered
    assert fit["agreement_with_recheck"] >= fit["agreement_int8"]
    # a cap on the share re-checked wins, and says so
    capped = fit_recheck_margin(p32, p8, coverage=0.99, max_share=0.01)
    assert capped["capped"] and capped["share"] <= 0.01 and capped["margin"] < fit["margin"]
    # int8 identical to fp32: nothing to re-check
    same = fit_recheck_margin(p32, p32.copy())
    assert same["margin"] == 0.0 and same["share"] == 0.0 and same["agreement_int8"] == 1.0
    with pytest.raises(ValueError, match="same shape"):
        fit_recheck_margin(p32, p8[:3])


def test_recheck_gives_the_fp32_answer_to_uncertain_cells(
    bm8_int8: Int8Export, tmp_path: Path
) -> None:
    """The int8 backend's re-check: cells under the margin get the fp32 model's probabilities;
    margin 1 re-checks every cell, so the int8 backend then predicts as fp32 does."""
    import json

    folder = tmp_path / "bm8-int8"
    shutil.copytree(bm8_int8.path, folder)
    model, _ = load_bundle("bm8")
    import openvino as ov

    ov.save_model(convert_openvino(model), str(folder / "model_fp32.xml"), compress_to_fp16=False)
    meta_file = folder / "metadata.json"
    raw = json.loads(meta_file.read_text())

    def with_margin(margin: float) -> Predictor:
        raw["int8"]["recheck"] = {"margin": margin}
        meta_file.write_text(json.dumps(raw))
        return Predictor.from_checkpoint(folder, backend="int8", tta="flips", batch_size=32)

    files = collect_image_paths([SAMPLE_ROOT])[:64]
    fp32 = Predictor.from_pretrained("bm8", precision="fp32", tta="flips", batch_size=32)
    p32 = fp32.predict_proba(files)
    plain = with_margin(0.0)
    p8 = plain.predict_proba(files)
    assert plain.cells_rechecked_ == 0 and plain.recheck_share() is None  # nothing counted
    every = with_margin(1.0)
    p_all = every.predict_proba(files)
    assert every.cells_checked_ == every.cells_rechecked_ == 64 and every.recheck_share() == 1.0
    np.testing.assert_allclose(p_all, p32, rtol=0, atol=1e-4)  # fp32 OpenVINO = fp32 torch
    assert np.abs(p8 - p32).max() > 1e-3  # (while int8 alone differs)
    top = np.sort(p8, 1)
    uncertain = top[:, -1] - top[:, -2] < 0.3
    some = with_margin(0.3)
    p_some = some.predict_proba(files)
    assert some.cells_rechecked_ == uncertain.sum() > 0
    np.testing.assert_allclose(p_some[uncertain], p32[uncertain], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(p_some[~uncertain], p8[~uncertain])
    # the fp32 model is loaded with the predictor: its files may go (a Ray actor's copy does)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    early = Predictor.from_checkpoint(copy, backend="int8", tta="flips", batch_size=32)
    shutil.rmtree(copy)
    np.testing.assert_array_equal(early.predict_proba(files), p_some)
    assert early.cells_rechecked_ == uncertain.sum()
    (folder / "model_fp32.xml").unlink()
    with pytest.raises(PredictorError, match="model_fp32.xml is missing"):
        with_margin(0.3)
    with pytest.raises(PredictorError, match=r"'recheck.margin' is 2.0"):
        with_margin(2.0)


def test_recheck_cells_are_a_stratified_draw_without_the_calibration_cells() -> None:
    _, meta = load_bundle("bm8")
    first, _ = calibration_images(None, meta, calibrate=SAMPLE_ROOT, size=48, seed=0)
    others, rec = calibration_images(
        None, meta, calibrate=SAMPLE_ROOT, size=48, seed=1, exclude=first
    )
    assert len(others) == 48 and not set(others) & set(first) and rec["of"] == 192 - 48
    per_class = Counter(Path(f).parent.name for f in others)
    assert set(per_class) == {p.name for p in SAMPLE_ROOT.iterdir() if p.is_dir()}
    assert max(per_class.values()) - min(per_class.values()) <= 1  # every class, evenly
    rest, _ = calibration_images(None, meta, calibrate=SAMPLE_ROOT, size=500, exclude=first)
    assert len(rest) == 144  # all the others when there are fewer


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
    # fixed-shape compilations give the dynamic model's logits, and stop at STATIC_SHAPES sizes
    dynamic = OpenVINORunner(xml, threads=2, streams=2, static_shapes=False)
    sizes = range(1, OpenVINORunner.STATIC_SHAPES * 2 + 4)
    for n in sizes:
        batch = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        np.testing.assert_allclose(two.infer_uint8(batch), dynamic.infer_uint8(batch), atol=1e-5)
    assert len(two._static) == OpenVINORunner.STATIC_SHAPES and not dynamic._static


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


def _tiny_int8(bundle: Path, cells: Path, seed: int) -> Int8Export:
    """The tiny bundle's int8 export, calibrated on 12 of its 36 cells drawn with ``seed``."""
    return export_int8_checkpoint(
        bundle,
        calibrate=cells,
        calibration_size=12,
        seed=seed,
        guard_data=cells,
        guard_tta="none",
        force=True,  # (a random tiny model: the guard may fail)
        recheck="off",
        workers=1,
    )


def test_two_exports_at_once_both_succeed_and_predict_reads_one_whole_export(
    tiny_bundle: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two exports of one model at the same time (two ``export`` runs, or an export and a
    second user of the cache) and a ``predict --backend int8`` loading all the while: both
    exports succeed, and every load gets the metadata of the model it runs."""
    import marrowscope.export.int8 as int8_mod

    _tiny_int8(tiny_bundle, synthetic_tree, seed=0)
    both_inside = threading.Barrier(2)
    real_measure, real_quantize = int8_mod.measure_streams, int8_mod.quantize_openvino
    one_at_a_time = threading.Lock()

    def measure(*args: object, **kwargs: object) -> object:
        both_inside.wait(timeout=300)  # each has written model.xml into its staging folder
        return real_measure(*args, **kwargs)  # type: ignore[arg-type]

    def quantize(*args: object, **kwargs: object) -> object:
        with one_at_a_time:  # NNCF itself is not under test (nor meant for two threads)
            return real_quantize(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(int8_mod, "measure_streams", measure)
    monkeypatch.setattr(int8_mod, "quantize_openvino", quantize)
    files = sorted(synthetic_tree.rglob("*.png"))[:4]
    results: dict[int, Int8Export] = {}
    errors: list[BaseException] = []
    seeds_loaded: list[int] = []
    done = threading.Event()

    def export(seed: int) -> None:
        try:
            results[seed] = _tiny_int8(tiny_bundle, synthetic_tree, seed=seed)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)
            both_inside.abort()  # the other export stops waiting: fail now, not in 5 minutes

    def predict() -> None:
        while not done.is_set():
            try:
                pred = Predictor.from_checkpoint(tiny_bundle, backend="int8", batch_size=4)
                probs = pred.predict_proba(files)
                assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
                loaded_from = pred.int8_path_.parent
                assert BundleMetadata.read(loaded_from / "metadata.json") == pred.bundle_metadata_
                assert pred.int8_export_ == tiny_bundle / "int8"  # as the user names it
                assert pred.bundle_metadata_.int8 is not None
                seeds_loaded.append(pred.bundle_metadata_.int8["calibration"]["seed"])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    reader = threading.Thread(target=predict)
    exporters = [threading.Thread(target=export, args=(seed,)) for seed in (1, 2)]
    reader.start()
    for t in exporters:
        t.start()
    for t in exporters:
        t.join(timeout=600)
    done.set()
    reader.join(timeout=600)
    assert not errors, errors
    assert sorted(results) == [1, 2] and all(
        r.path == tiny_bundle / "int8" for r in results.values()
    )
    assert seeds_loaded and set(seeds_loaded) <= {0, 1, 2}
    meta = BundleMetadata.read(tiny_bundle / "int8" / "metadata.json")
    assert meta.int8 is not None and meta.int8["calibration"]["seed"] in (1, 2)
    probs = Predictor.from_checkpoint(tiny_bundle, backend="int8").predict_proba(files)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert len(list((tiny_bundle / "int8").glob(".v-*"))) == 3  # replaced ones kept a while
    assert not list(tiny_bundle.glob(".int8.tmp-*"))


def test_a_failed_export_keeps_the_previous_one_and_leaves_no_staging_folder(
    tiny_bundle: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import marrowscope.export.int8 as int8_mod

    good = _tiny_int8(tiny_bundle, synthetic_tree, seed=0)
    version = current_version(good.path)
    saved = {p.name: p.read_bytes() for p in version.iterdir()}
    files = sorted(synthetic_tree.rglob("*.png"))[:4]
    before = Predictor.from_checkpoint(tiny_bundle, backend="int8").predict_proba(files)
    staged: list[str] = []

    def crash(*args: object, **kwargs: object) -> None:  # the guard, after the files are written
        (staging,) = tiny_bundle.glob(".int8.tmp-*")
        staged.extend(sorted(p.name for p in staging.iterdir()))
        raise RuntimeError("injected: the guard crashed")

    monkeypatch.setattr(int8_mod, "_guards", crash)
    with pytest.raises(RuntimeError, match="injected"):
        _tiny_int8(tiny_bundle, synthetic_tree, seed=1)
    assert staged == ["metadata.json", "model.bin", "model.xml"]
    assert not list(tiny_bundle.glob(".int8.tmp-*"))
    assert current_version(good.path) == version
    assert [p.name for p in good.path.glob(".v-*")] == [version.name]
    assert {p.name: p.read_bytes() for p in version.iterdir()} == saved
    after = Predictor.from_checkpoint(tiny_bundle, backend="int8").predict_proba(files)
    np.testing.assert_array_equal(after, before)

"""Predictor: raw image -> probabilities from a bundle; every input type; bad input and bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bomb_images import png_header_only
from PIL import Image

from marrowscope.inference import PathPrediction, Predictor, PredictorError
from marrowscope.models.bundle import METADATA_NAME, WEIGHTS_NAME, BundleError, load_bundle
from marrowscope.preprocess.ops import apply_preprocess, config_from_params
from marrowscope.utils.image import ImageReadError, read_image

CLASSES = ["AAA", "BBB", "CCC"]  # as in tests/conftest.py make_bundle


def _fp32(bundle: Path, **kw) -> Predictor:  # type: ignore[no-untyped-def]
    return Predictor.from_checkpoint(bundle, device="cpu", precision="fp32", **kw)


def _reference(bundle: Path, rgb: np.ndarray) -> np.ndarray:
    """Probabilities computed by hand: bundle preprocessing, /255, model, softmax."""
    model, meta = load_bundle(bundle)
    arr = apply_preprocess(rgb, config_from_params(meta.preprocess))
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0].numpy()


# ----------------------------------------------------------------------------- loading


def test_from_checkpoint_reads_everything_from_the_bundle(tiny_bundle: Path) -> None:
    p = _fp32(tiny_bundle, batch_size=4)
    assert p.classes_ == CLASSES
    assert p.input_size == 32 and p.arch == "paper_cnn" and p.backend == "torch"
    assert p.metadata["preprocess"]["size"] == 32
    assert not p.model.training and p.model.num_classes == 3
    assert p.precision_.dtype is None and not p.precision_.channels_last
    assert "batch_size=4" in repr(p)


def test_init_only_stores_parameters() -> None:
    p = Predictor("somewhere", backend="onnx", batch_size=3)
    assert (p.checkpoint, p.backend, p.batch_size) == ("somewhere", "onnx", 3)
    with pytest.raises(RuntimeError, match="from_checkpoint"):
        p.predict_proba([np.zeros((4, 4, 3), np.uint8)])


def test_bad_parameters(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Predictor.from_checkpoint(tiny_bundle, backend="tf")
    with pytest.raises(ValueError, match="batch size"):
        Predictor.from_checkpoint(tiny_bundle, batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_checkpoint(tiny_bundle, precision="int8")


# ------------------------------------------------------------------------------ predicting


def test_probabilities_match_a_hand_computed_reference(
    tiny_bundle: Path, cell_files: list[Path]
) -> None:
    p = _fp32(tiny_bundle, batch_size=4)
    probs = p.predict_proba(cell_files)
    assert probs.shape == (6, 3) and probs.dtype == np.float32
    ref = np.stack([_reference(tiny_bundle, read_image(f)) for f in cell_files])
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert p.predict(cell_files) == [CLASSES[i] for i in ref.argmax(1)]


def test_every_input_type_gives_the_same_answer(tiny_bundle: Path, cell_files: list[Path]) -> None:
    p = _fp32(tiny_bundle)
    f = cell_files[1]  # PNG: lossless, so all forms hold the same pixels
    rgb = read_image(f)
    inputs = [f, str(f), f.read_bytes(), rgb, Image.open(f)]
    probs = p.predict_proba(inputs)
    np.testing.assert_allclose(probs, np.repeat(probs[:1], len(inputs), 0), atol=1e-6)


def test_gray_rgba_and_16_bit_images_are_converted(tiny_bundle: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    Image.fromarray(gray8).save(tmp_path / "gray.png")
    gray16 = gray8.astype(np.uint16) * 257  # the same picture at 16 bit
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    rgba = np.dstack([np.repeat(gray8[:, :, None], 3, 2), np.full((30, 30), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    p = _fp32(tiny_bundle)
    files = [tmp_path / n for n in ("gray.png", "gray16.png", "rgba.png")]
    probs = p.predict_proba([*files, gray8, gray16, rgba, Image.fromarray(gray8, "L")])
    np.testing.assert_allclose(probs, np.repeat(probs[:1], 7, 0), atol=1e-6)


def test_predict_preprocessed_equals_raw_path_and_is_batch_independent(
    tiny_bundle: Path, cell_files: list[Path]
) -> None:
    p = _fp32(tiny_bundle, batch_size=4)
    pre = [p.preprocess(p.load(f)) for f in cell_files]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in pre)
    raw = p.predict_proba(cell_files)
    np.testing.assert_allclose(p.predict_preprocessed(pre), raw, atol=1e-6)
    np.testing.assert_allclose(p.predict_preprocessed(np.stack(pre)), raw, atol=1e-6)
    p.batch_size = 1
    np.testing.assert_allclose(p.predict_preprocessed(pre), raw, atol=1e-5)
    assert p.predict_preprocessed([]).shape == (0, 3)
    with pytest.raises(ValueError, match="image 1"):
        p.predict_preprocessed([pre[0], pre[1].astype(np.float32)])


def test_predict_preprocessed_matches_the_training_validation_path(
    tiny_bundle: Path, cell_files: list[Path]
) -> None:
    """The Predictor and the training loop's validation pass agree (fp32)."""
    from torch.utils.data import DataLoader

    from marrowscope.data.dataset import CellDataset
    from marrowscope.engine.loops import predict_logits
    from marrowscope.inference.predictor import softmax
    from marrowscope.transforms.augment import eval_transform
    from marrowscope.utils.runtime import resolve_precision

    p = _fp32(tiny_bundle, batch_size=4)
    pre = [p.preprocess(p.load(f)) for f in cell_files]
    model, _ = load_bundle(tiny_bundle)
    dev = torch.device("cpu")
    loader = DataLoader(CellDataset(pre, [0] * len(pre), eval_transform(32)), batch_size=4)
    logits, _ = predict_logits(
        model, loader, device=dev, precision=resolve_precision("fp32", dev, channels_last=False)
    )
    np.testing.assert_allclose(p.predict_preprocessed(pre), softmax(logits), atol=1e-5)


def test_bf16_precision_is_close_to_fp32(tiny_bundle: Path, cell_files: list[Path]) -> None:
    p16 = Predictor.from_checkpoint(tiny_bundle, device="cpu", precision="bf16")
    assert p16.precision_.name == "bf16" and p16.precision_.channels_last
    np.testing.assert_allclose(
        p16.predict_proba(cell_files), _fp32(tiny_bundle).predict_proba(cell_files), atol=0.05
    )


def test_single_image_or_unsupported_objects_are_clear_errors(
    tiny_bundle: Path, cell_files: list[Path]
) -> None:
    p = _fp32(tiny_bundle)
    with pytest.raises(TypeError, match=r"predict_proba\(\[image\]\)"):
        p.predict_proba(cell_files[0])
    with pytest.raises(TypeError, match=r"in a list"):
        p.predict_proba(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match=r"in a list"):
        p.predict_proba(Image.open(cell_files[1]))
    assert p.predict_proba(iter(cell_files[:2])).shape == (2, 3)  # any iterable of images
    with pytest.raises(TypeError, match="cannot read an image from dict"):
        p.predict_proba([{}])
    with pytest.raises(ValueError, match="not an image"):
        p.predict_proba([np.zeros((4, 4, 7), np.uint8)])


# --------------------------------------------------------------------------- predict_paths


def test_predict_paths_yields_every_file_in_order_with_errors(
    tiny_bundle: Path, cell_files: list[Path], tmp_path: Path
) -> None:
    good = cell_files[:5]
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(cell_files[0].read_bytes()[:200])
    text = tmp_path / "text.png"
    text.write_text("hello")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    missing = tmp_path / "gone.png"
    paths = [good[0], trunc, good[1], text, good[2], bomb, good[3], missing, good[4]]
    p = _fp32(tiny_bundle, batch_size=3)
    out = list(p.predict_paths(paths, workers=2, progress=False))
    assert [r.path for r in out] == [str(x) for x in paths]
    errors = {Path(r.path).name: r.error for r in out if not r.ok}
    assert set(errors) == {"trunc.jpg", "text.png", "bomb.png", "gone.png"}
    assert "truncated" in errors["trunc.jpg"] and "decompression bomb" in errors["bomb.png"]
    assert "not a readable image" in errors["text.png"] and "not found" in errors["gone.png"]
    assert all(str(tmp_path) in e for e in errors.values())  # each message names its file
    ok = [r for r in out if r.ok]
    np.testing.assert_allclose(np.stack([r.probs for r in ok]), p.predict_proba(good), atol=1e-6)
    assert ok[0].label(p.classes_) in CLASSES and 0 < ok[0].confidence <= 1
    bad = next(r for r in out if not r.ok)
    assert bad.probs is None and bad.label(p.classes_) is None and bad.confidence is None


def test_predict_path_batches_respect_batch_size(tiny_bundle: Path, cell_files: list[Path]) -> None:
    p = _fp32(tiny_bundle, batch_size=4)
    sizes = [len(b) for b in p.predict_path_batches(cell_files, workers=1, progress=False)]
    assert sizes == [4, 2]


def test_path_prediction_helpers() -> None:
    r = PathPrediction("a.png", np.array([0.2, 0.8], np.float32))
    assert r.ok and r.label(["x", "y"]) == "y" and r.confidence == pytest.approx(0.8)


# ------------------------------------------------------------------------------ bad bundles


def test_missing_corrupt_and_newer_bundles_are_clear_errors(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="no checkpoint bundle here"):
        Predictor.from_checkpoint(tmp_path / "nope")

    meta_file = tiny_bundle / METADATA_NAME
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": 99, "marrowscope_version": "9.0"}))
    with pytest.raises(BundleError, match=r"format 99 .*upgrade"):
        Predictor.from_checkpoint(tiny_bundle)

    meta_file.write_text(json.dumps({**meta, "preprocess": {**meta["preprocess"], "version": 7}}))
    with pytest.raises(PredictorError, match=r"metadata.json: invalid preprocessing .*version"):
        Predictor.from_checkpoint(tiny_bundle)

    meta_file.write_text("{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        Predictor.from_checkpoint(tiny_bundle)

    meta_file.write_text(json.dumps(meta))
    (tiny_bundle / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError, match=r"model.safetensors: corrupt weights"):
        Predictor.from_checkpoint(tiny_bundle)


def test_onnx_backend_without_an_export_names_the_command(tiny_bundle: Path) -> None:
    with pytest.raises(PredictorError, match=r"no model.onnx .*marrowscope export"):
        Predictor.from_checkpoint(tiny_bundle, backend="onnx")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Predictor.from_checkpoint(tiny_bundle, backend="onnx", device="cuda")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_file_without_metadata_or_corrupt(tiny_bundle: Path, tmp_path: Path) -> None:
    model, _ = load_bundle(tiny_bundle)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(
        model, (torch.rand(1, 3, 32, 32),), str(plain), dynamo=False, input_names=["images"]
    )
    with pytest.raises(
        PredictorError, match=r"plain.onnx: .*no marrowscope metadata.*marrowscope export"
    ):
        Predictor.from_checkpoint(plain, backend="onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(PredictorError, match=r"broken.onnx: cannot load the ONNX model"):
        Predictor.from_checkpoint(broken, backend="onnx")
    with pytest.raises(ImageReadError):  # an image that cannot be read is raised by the API
        Predictor.from_checkpoint(tiny_bundle, precision="fp32").predict_proba([broken])


# ------------------------------------------------------------- test-time augmentation, temperature


def test_tta_views_are_the_dihedral_group_and_flips_are_a_subset() -> None:
    from marrowscope.engine.cv import TTA_VIEWS
    from marrowscope.inference.predictor import tta_views

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (2, 5, 5, 3), dtype=np.uint8)
    d8 = tta_views(batch, "d8")
    assert len(d8) == 8 and len({v.tobytes() for v in d8}) == 8
    flips = tta_views(batch, "flips")
    for i, v in zip(TTA_VIEWS["flips"], flips, strict=True):
        assert np.array_equal(d8[i], v)  # the CV summary relies on this index mapping
    assert tta_views(batch, "none")[0] is batch
    with pytest.raises(ValueError, match="unknown test-time"):
        tta_views(batch, "d4")


def _with_inference(bundle: Path, inference: dict) -> Path:  # type: ignore[type-arg]
    meta_path = bundle / METADATA_NAME
    meta = json.loads(meta_path.read_text())
    meta["inference"] = inference
    meta_path.write_text(json.dumps(meta))
    return bundle


def test_bundle_temperature_and_tta_shape_the_probabilities(tiny_bundle: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    plain = _fp32(tiny_bundle).predict_preprocessed([rgb])
    _with_inference(tiny_bundle, {"tta": "none", "temperature": 4.0})
    p = _fp32(tiny_bundle)
    logits = p.view_logits_preprocessed([rgb])[0]
    hot = p.predict_preprocessed([rgb])
    z = logits / 4.0
    np.testing.assert_allclose(hot, np.exp(z) / np.exp(z).sum(1, keepdims=True), atol=1e-6)
    assert hot.max() < plain.max()  # a temperature > 1 softens the probabilities
    _with_inference(tiny_bundle, {"tta": "d8", "temperature": 1.0})
    d8 = _fp32(tiny_bundle)
    assert d8.tta_ == "d8"
    views = d8.view_logits_preprocessed([rgb])
    e = np.exp(views - views.max(-1, keepdims=True))
    np.testing.assert_allclose(
        d8.predict_preprocessed([rgb]), (e / e.sum(-1, keepdims=True)).mean(0), atol=1e-6
    )
    assert _fp32(tiny_bundle, tta="none").tta_ == "none"  # the caller overrides the bundle


@pytest.mark.parametrize(
    ("inference", "match"),
    [
        ({"tta": "d4"}, r"metadata.json: inference.tta must be one of none, flips, d8, got 'd4'"),
        ({"temperature": 0}, r"metadata.json: inference.temperature must be a positive number"),
    ],
)
def test_bad_inference_settings_in_a_bundle_are_named(
    tiny_bundle: Path,
    inference: dict,
    match: str,  # type: ignore[type-arg]
) -> None:
    _with_inference(tiny_bundle, inference)
    with pytest.raises(BundleError, match=match):
        _fp32(tiny_bundle)
    with pytest.raises(ValueError, match="unknown test-time"):
        Predictor.from_checkpoint(tiny_bundle, tta="sideways")

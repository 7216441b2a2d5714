"""Config loading: YAML -> frozen dataclasses, overrides, clear errors; the shipped configs load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from marrowscope.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_config,
    replace,
    save_config,
    to_dict,
)
from marrowscope.models.registry import PAPER_MODELS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_frozen() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain: {epochs: 3}\n")
    cfg = load_config(
        p,
        [
            "train.epochs=5",
            "train.lr=3e-4",
            "data.classes=HAC,BAS",
            "augment.zoom=[0.5, 1]",
            "model.weights_file=null",
            "preprocess.denoise=true",
        ],
    )
    assert cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.classes == ("HAC", "BAS")
    assert cfg.augment.zoom == (0.5, 1.0)
    assert cfg.preprocess.denoise is True
    assert cfg.name == "x"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epoch": 3}}, "unknown config key train.epoch"),
        ({"train": {"epochs": "3x"}}, "train.epochs: expected an integer"),
        ({"train": {"imbalance": "oversample"}}, "train.imbalance: 'oversample' is not one of"),
        ({"preprocess": {"denoise": "yes"}}, "preprocess.denoise: expected true/false"),
        ({"augment": {"zoom": [0.5]}}, "augment.zoom: expected 2 values"),
        ({"preprocess": {"crop": 0}}, "preprocess.crop: must be in (0, 1], got 0"),
        ({"preprocess": {"crop": 1.5}}, "preprocess.crop: must be in (0, 1], got 1.5"),
        ({"data": 3}, "data: expected a mapping"),
    ],
)
def test_invalid_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_dict(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.epochs"])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = replace(ExperimentConfig(), ["data.classes=[A, B]", "compare.models=[paper_cnn]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert to_dict(again)["data"]["classes"] == ["A", "B"]


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "bm-dev.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.compare.models or cfg.model.name


def test_paper_config_is_the_paper_protocol() -> None:
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.data.classes == ("HAC", "BAS", "EOS", "LYT", "MON", "NGB", "NGS")
    assert cfg.data.max_per_class == 1000
    assert cfg.preprocess.denoise and cfg.preprocess.sharpen
    assert cfg.compare.models == PAPER_MODELS  # the registry's list, in the paper's order
    assert cfg.compare.focus_class == "HAC"
    assert load_config(CONFIGS / "paper-recipe.yaml").compare.models == PAPER_MODELS


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "bm-dev.yaml", "pbc-dev.yaml"])
def test_every_compared_model_of_a_shipped_config_gets_valid_optimizer_groups(name: str) -> None:
    # e.g. bm-dev.yaml's layer-wise lr decay must be switched off for the from-scratch paper_cnn
    from marrowscope.engine.compare import model_config
    from marrowscope.models.registry import build_model

    cfg = load_config(CONFIGS / name)
    for model_name in cfg.compare.models or (cfg.model.name,):
        mc = model_config(cfg, model_name)
        model = build_model(
            dataclasses.replace(mc.model, pretrained=False), 3, input_size=mc.preprocess.size
        )
        t = mc.train
        groups = model.param_groups(t.lr, t.backbone_lr_scale, t.weight_decay, t.layer_decay)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

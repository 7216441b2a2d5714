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


# ------------------------------------------------------------------ overrides merge, strict files

TINY = (
    "model: {name: paper_cnn, pretrained: false}\n"
    "preprocess: {size: 32}\n"
    "train: {epochs: 1, batch_size: 8, device: cpu}\n"
    "data: {min_per_class: 2, split: {val: 0.2, test: 0.25}}\n"
    "inference: {calibrate: false}\n"
    "compare: {model_overrides: {paper_cnn: {train.lr: 0.01}}}\n"
)


def test_a_mapping_override_merges_into_the_section(tmp_path: Path) -> None:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    cfg = load_config(p, ["train={lr: 0.5}", "data={split: {val: 0.3}}"])
    assert cfg.train.lr == 0.5
    # the section's other keys keep their YAML values, not the defaults
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.device) == (1, 8, "cpu")
    assert cfg.data.split.val == pytest.approx(0.3)
    assert cfg.data.split.test == pytest.approx(0.25) and cfg.data.min_per_class == 2
    # a scalar or a list still replaces; an empty mapping clears one
    assert load_config(p, ["augment.zoom=[0.5, 1]"]).augment.zoom == (0.5, 1.0)
    assert load_config(p, ["compare.model_overrides={}"]).compare.model_overrides == {}
    merged = load_config(p, ["compare.model_overrides={vgg16: {train.lr: 0.1}}"])
    assert merged.compare.model_overrides == {
        "paper_cnn": {"train.lr": 0.01},
        "vgg16": {"train.lr": 0.1},
    }


def test_a_mapping_override_of_a_built_config_merges_too(tmp_path: Path) -> None:
    # compare's per-model overrides go through replace() as key=<json value>
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    cfg = replace(load_config(p), ['train={"lr": 0.5, "epochs": 3}'])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.5, 3, 8)
    assert cfg.train.device == "cpu" and cfg.preprocess.size == 32


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train: {epochs: 1}\nname: x\ntrain: {batch_size: 8}\n", "'train'", "lines 1 and 3"),
        ("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n", "'epochs'", "lines 2 and 4"),
    ],
)
def test_a_key_written_twice_is_an_error(tmp_path: Path, text: str, key: str, lines: str) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert str(p) in message and f"key {key} appears twice" in message and lines in message


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  <<: {epochs: 2, batch_size: 4}\n  epochs: 3\n")
    cfg = load_config(p)
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 4)


def test_an_override_with_a_key_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'train=\{lr: 1, lr: 2\}': key 'lr' appears"):
        load_config(None, ["train={lr: 1, lr: 2}"])


def test_a_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train: {epochs: 2}\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == (
        f"config file {p} is not UTF-8 text: byte 0xe9 at offset 28 (line 2); save it as UTF-8"
    )
    p.write_bytes("\ufeffname: caf\xe9\n".encode())  # UTF-8 with a byte-order mark loads
    assert load_config(p).name == "caf\xe9"

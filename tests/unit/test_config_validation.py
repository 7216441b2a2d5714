"""Config validation at load time: every wrong value is one ConfigError naming the dotted key,
the value and what is allowed, raised before any data is read."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from marrowscope.config import (
    AugmentConfig,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    replace,
    validate,
)


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------ kinds of error


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
        ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
        ("train.epochs=true", "train.epochs: expected an integer, got true"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.lr=true", "train.lr: expected a number, got true"),
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("preprocess.denoise=1", "preprocess.denoise: expected true/false, got 1"),
        ("preprocess.denoise=yes_please", "preprocess.denoise: expected true/false"),
        ("model.name=[a, b]", "model.name: expected a string, got ['a', 'b']"),
        ("data.split=0.2", "data.split: expected a mapping, got 0.2"),
        ("augment.zoom=[0.5, 0.7, 0.9]", "augment.zoom: expected 2 values, got [0.5, 0.7, 0.9]"),
    ],
)
def test_wrong_type_names_the_key_the_value_and_the_type(override: str, message: str) -> None:
    assert _error([override]).startswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.swa_lr=-1", "train.swa_lr: must be > 0, got -1 (e.g. 0.05)"),
        ("train.swa_lr=0", "train.swa_lr: must be > 0, got 0"),
        ("train.lr=-0.001", "train.lr: must be >= 0, got -0.001"),
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("train.ema_decay=1", "train.ema_decay: must be in (0, 1), got 1 (e.g. 0.998)"),
        ("train.layer_decay=1.5", "train.layer_decay: must be in (0, 1], got 1.5"),
        ("augment.hflip=1.5", "augment.hflip: must be in [0, 1], got 1.5"),
        ("augment.hue=0.6", "augment.hue: must be in [0, 0.5], got 0.6"),
        ("augment.rotation=270", "augment.rotation: must be in [0, 180], got 270"),
        ("augment.mix_prob=-0.5", "augment.mix_prob: must be in [0, 1], got -0.5"),
        ("data.split.val=1.2", "data.split.val: must be in [0, 1), got 1.2"),
        ("data.max_per_class=0", "data.max_per_class: must be >= 1, got 0 (null: no cap)"),
        ("model.head_dropout=1", "model.head_dropout: must be in [0, 1), got 1"),
        ("preprocess.size=16", "preprocess.size: must be >= 32, got 16"),
        (
            "preprocess.denoise_search_window=20",
            "preprocess.denoise_search_window: must be a positive odd integer (e.g. 7 or 21), "
            "got 20",
        ),
    ],
)
def test_out_of_range_names_the_key_the_value_and_the_range(override: str, message: str) -> None:
    assert _error([override]).startswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.imbalance=foo",
            "train.imbalance: 'foo' is not one of 'none', 'weighted_loss', 'sampler'",
        ),
        ("train.device=gpu", "train.device: 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
        ("inference.tta=8", "inference.tta: 8 is not one of 'none', 'flips', 'd8'"),
    ],
)
def test_value_not_among_the_choices_lists_them(override: str, message: str) -> None:
    assert _error([override]) == f"{message} (from --set {override})"


def test_unknown_key_names_it_and_lists_the_valid_keys() -> None:
    message = _error(["train.swa_rate=0.1"])
    assert message.startswith("unknown config key train.swa_rate; valid keys here: ")
    assert "swa_lr" in message and "swa_epochs" in message
    nested = _error(["data.split.vall=0.1"])
    assert nested == (
        "unknown config key data.split.vall; valid keys here: group_column, test, val "
        "(from --set data.split.vall=0.1)"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.progressive_size=300"],
            "train.progressive_size must be between 32 and preprocess.size (224) px, got 300",
        ),
        (
            ["preprocess.size=128", "train.progressive_size=160"],
            "train.progressive_size must be between 32 and preprocess.size (128) px, got 160",
        ),
        (
            ["model.name=paper_cnn", "model.pretrained=false", "train.progressive_size=64"],
            "train.progressive_size does not work with paper_cnn",
        ),
        (
            ["train.swa_epochs=2", "train.ema_decay=0.99"],
            "train.swa_epochs and train.ema_decay both average the weights; set one of them",
        ),
        (["train.swa_lr=0.05"], "train.swa_lr=0.05 needs train.swa_epochs > 0"),
        (
            ["train.epochs=4", "train.swa_epochs=5"],
            "train.swa_epochs must be between 1 and train.epochs (4), got 5",
        ),
        (
            ["data.split.val=0.5", "data.split.test=0.5"],
            "data.split.val + data.split.test = 1 leaves nothing to train on; keep their sum "
            "below 1",
        ),
        (
            ["augment.zoom=[0.9, 0.5]"],
            "augment.zoom: must be an area scale range 0 < low <= high <= 1, got [0.9, 0.5]",
        ),
    ],
)
def test_rule_between_fields_names_the_keys_and_the_limit(
    overrides: list[str], message: str
) -> None:
    assert _error(overrides).startswith(message)


def test_a_rule_holds_on_the_edge() -> None:
    cfg = load_config(
        None,
        ["preprocess.size=160", "train.progressive_size=160", "train.epochs=3"]
        + ["train.swa_epochs=3", "train.swa_lr=0.05", "data.split.val=0.5", "data.split.test=0.4"],
    )
    assert cfg.train.progressive_size == 160 and cfg.train.swa_epochs == 3


def test_several_errors_name_the_first_and_list_the_others() -> None:
    message = _error(["train.lr=-1", "augment.hflip=2", "train.typo=1"])
    # a misspelt key comes first: it is the likely cause of the rest
    assert message.startswith("unknown config key train.typo;")
    assert "train.lr: must be >= 0, got -1" in message
    assert "augment.hflip: must be in [0, 1], got 2" in message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  swa_lr: -1\n")
    with pytest.raises(ConfigError, match=re.escape("train.swa_lr: must be > 0, got -1")):
        load_config(p)
    with pytest.raises(ConfigError, match=re.escape(str(p))):
        load_config(p)


# ------------------------------------------------------------------ what the loader still accepts


def test_yaml_quirks_still_load(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    # YAML 1.1 reads 3e-4 (no dot) as a string; 2024 as an int for a string key
    p.write_text("name: 2024\ntrain:\n  lr: 3e-4\n  swa_lr: 5e-2\n  swa_epochs: 2\n")
    cfg = load_config(p, ["data.classes=A, B", "compare.models=x,y", "augment.zoom=0.5,1"])
    assert cfg.name == "2024"
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.swa_lr == pytest.approx(0.05)
    assert cfg.data.classes == ("A", "B") and cfg.compare.models == ("x", "y")
    assert cfg.augment.zoom == (0.5, 1.0)
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # an int is a number
    assert load_config(None, ["train.grad_clip=null"]).train.grad_clip is None


def test_validated_configs_are_plain_frozen_dataclasses() -> None:
    cfg = load_config(None, ["train.epochs=3", "data.classes=[A, B]"])
    assert type(cfg) is ExperimentConfig and type(cfg.train) is TrainConfig
    assert cfg == dataclasses.replace(
        ExperimentConfig(),
        train=TrainConfig(epochs=3),
        data=dataclasses.replace(ExperimentConfig().data, classes=("A", "B")),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 4  # type: ignore[misc]
    assert hash(cfg.train) == hash(TrainConfig(epochs=3))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert replace(cfg, ["train.epochs=5"]).train.epochs == 5
    assert [f.name for f in dataclasses.fields(cfg)][:3] == ["name", "seed", "data"]


def test_shipped_defaults_are_valid() -> None:
    validate(ExperimentConfig())
    for section in (TrainConfig(), AugmentConfig(), ModelConfig()):
        validate(section)


# ------------------------------------------------- configs built in code: the same rules apply


def test_validate_checks_a_config_built_in_code_with_full_keys() -> None:
    bad = dataclasses.replace(AugmentConfig(), hflip=1.5)  # not checked on construction
    with pytest.raises(ConfigError, match=re.escape("augment.hflip: must be in [0, 1], got 1.5")):
        validate(bad)
    cfg = dataclasses.replace(ExperimentConfig(), train=TrainConfig(swa_lr=-1.0, swa_epochs=2))
    with pytest.raises(ConfigError, match=re.escape("train.swa_lr: must be > 0, got -1.0")):
        validate(cfg)
    with pytest.raises(TypeError, match="config dataclass"):
        validate({"train": {}})


def test_build_model_and_batch_mix_check_their_config() -> None:
    from marrowscope.models.registry import build_model
    from marrowscope.transforms.augment import BatchMix

    with pytest.raises(ConfigError, match=re.escape("model.head_dropout: must be in [0, 1)")):
        build_model(ModelConfig(name="paper_cnn", pretrained=False, head_dropout=1.0), 3)
    with pytest.raises(ConfigError, match=re.escape("model.head_hidden: must be >= 1, got 0")):
        build_model(ModelConfig(name="paper_cnn", pretrained=False, head_hidden=0), 3)
    with pytest.raises(ConfigError, match=re.escape("augment.mix_prob: must be in [0, 1]")):
        BatchMix(AugmentConfig(mixup_alpha=0.4, mix_prob=2.0), num_classes=3)
    with pytest.raises(ConfigError, match=re.escape("augment.cutmix_alpha: must be >= 0")):
        BatchMix(AugmentConfig(cutmix_alpha=-1.0), num_classes=3)


# --------------------------------------------------------------- before any data is read


def _no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    import marrowscope.engine.train as train_mod

    def data_was_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr(train_mod, "prepare_data", data_was_read)


def test_cli_train_fails_on_the_config_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from marrowscope.cli.main import app

    _no_data(monkeypatch)
    missing = tmp_path / "no-such-folder"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {missing}}}\nmodel: {{name: paper_cnn, pretrained: false}}\n")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        ["train", "--config", str(cfg), "--run-dir", str(run_dir), "--no-progress"]
        + ["--set", "train.swa_epochs=2", "--set", "train.swa_lr=-1"],
    )
    assert res.exit_code == 2, res.output
    output = " ".join(res.output.split())  # the console may wrap the line
    assert "train.swa_lr: must be > 0, got -1" in output
    assert str(missing) not in output and "data folder" not in output
    assert "Traceback" not in output
    assert not run_dir.exists()


def test_fit_checks_a_config_built_in_code_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marrowscope.engine.train import fit

    _no_data(monkeypatch)
    cfg = from_dict({"data": {"root": str(tmp_path / "no-such-folder")}})
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, swa_lr=-1.0, swa_epochs=2))
    with pytest.raises(ConfigError, match=re.escape("train.swa_lr: must be > 0, got -1.0")):
        fit(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ where a bad value came from


def test_a_bad_set_value_is_blamed_on_the_override_not_the_file(tmp_path: Path) -> None:
    p = tmp_path / "tiny.yaml"
    p.write_text("train: {epochs: 1, lr: fast}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, ["train.lr=0.1", "train.epochs=abc"])
    assert str(info.value) == (
        "train.epochs: expected an integer, got 'abc' (from --set train.epochs=abc)"
    )
    # a mapping override is blamed for its own keys only; the file for the rest
    with pytest.raises(ConfigError) as info:
        load_config(p, ["train={epochs: 2}"])
    assert str(info.value) == f"train.lr: expected a number, got 'fast' in {p}"
    with pytest.raises(ConfigError) as info:
        load_config(p, ["train.lr=0.1", "train={epochs: x}"])
    assert (
        str(info.value)
        == "train.epochs: expected an integer, got 'x' (from --set train={epochs: x})"
    )
    # one error from each: both named
    with pytest.raises(ConfigError) as info:
        load_config(p, ["augment.zoom=[x, 1]"])
    message = str(info.value)
    assert "augment.zoom[0]: expected a number, got 'x' (from --set augment.zoom=[x, 1])" in message
    assert "train.lr: expected a number, got 'fast'" in message and message.endswith(f" in {p}")


def test_none_for_an_optional_value_suggests_null() -> None:
    assert _error(["train.grad_clip=None"]) == (
        "train.grad_clip: expected a number, got 'None' (for no value write null, not None; "
        "null: no clipping) (from --set train.grad_clip=None)"
    )
    # a value that cannot be null gets no such advice
    assert "null" not in _error(["train.lr=None"])


@pytest.mark.parametrize("seed", ["99999999999999999999", "4294967296", "-1"])
def test_a_seed_out_of_range_names_the_range(seed: str) -> None:
    assert _error([f"seed={seed}"]) == (
        f"seed: must be in [0, 4294967295], got {seed} (from --set seed={seed})"
    )
    assert load_config(None, ["seed=4294967295"]).seed == 4294967295

"""End-to-end training on synthetic cells: run folder, repeatability, resume after a crash."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from marrowscope.config import ConfigError, from_dict
from marrowscope.engine import train as train_mod
from marrowscope.engine.train import fit

pytestmark = pytest.mark.integration


def tiny_config(root: Path, **train: object) -> dict:
    return {
        "name": "tiny",
        "seed": 7,
        "data": {"root": str(root), "min_per_class": 4, "split": {"val": 0.25, "test": 0.25}},
        "preprocess": {"size": 32, "workers": 1},
        "augment": {"zoom": [0.9, 1.0]},
        "model": {"name": "paper_cnn", "pretrained": False},
        "train": {
            "epochs": 3,
            "batch_size": 4,
            "lr": 0.003,
            "warmup_epochs": 0,
            "precision": "fp32",
            **train,
        },
    }


def test_fit_writes_complete_run_folder(synthetic_tree: Path, tmp_path: Path) -> None:
    cfg = from_dict(tiny_config(synthetic_tree, epochs=6))
    res = fit(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "split.csv",
        "metrics.csv",
        "curves.png",
        "state.pt",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    for bundle in ("best", "last"):
        assert (run / bundle / "model.safetensors").is_file()
        meta = json.loads((run / bundle / "metadata.json").read_text())
        assert meta["classes"] == ["AAA", "BBB", "CCC"]
        assert meta["input_size"] == 32
        assert meta["preprocess"]["size"] == 32
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert 1 <= res.best_epoch <= 6
    best_f1 = max(float(r["val_macro_f1"]) for r in rows)
    assert res.best_val_macro_f1 == pytest.approx(best_f1, abs=1e-5)
    # the colour classes are easy: the CNN must learn them in 6 short epochs
    assert best_f1 > 0.6
    split = list(csv.DictReader((run / "split.csv").open()))
    assert {r["split"] for r in split} == {"train", "val", "test"}
    assert len(split) == 36


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "model.safetensors"))


def test_training_is_repeatable_on_cpu(synthetic_tree: Path, tmp_path: Path) -> None:
    cfg = from_dict(tiny_config(synthetic_tree, epochs=2))
    fit(cfg, tmp_path / "a", progress=False)
    fit(cfg, tmp_path / "b", progress=False)
    wa, wb = _weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize(
    "averaging", [{}, {"ema_decay": 0.99}, {"swa_epochs": 2}], ids=["plain", "ema", "swa"]
)
def test_resume_after_interrupt_matches_uninterrupted_run(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, averaging: dict
) -> None:
    # with EMA or SWA the averaged weights (what the bundles hold) must survive the crash too
    cfg = from_dict(tiny_config(synthetic_tree, epochs=3, **averaging))
    fit(cfg, tmp_path / "full", progress=False)

    real = train_mod.train_one_epoch
    calls = {"n": 0}

    def crash_in_third_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies in the middle of epoch 3
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "crash", progress=False)
    rows = list(csv.DictReader((tmp_path / "crash" / "metrics.csv").open()))
    assert len(rows) == 2  # the finished epochs survived
    monkeypatch.setattr(train_mod, "train_one_epoch", real)

    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg, tmp_path / "crash", progress=False)
    fit(cfg, tmp_path / "crash", resume=True, progress=False)
    full, resumed = _weights(tmp_path / "full" / "last"), _weights(tmp_path / "crash" / "last")
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k
    rows = list(csv.DictReader((tmp_path / "crash" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_kill_9_mid_training_loses_at_most_one_epoch(synthetic_tree: Path, tmp_path: Path) -> None:
    import yaml

    cfg_path = tmp_path / "cfg.yaml"
    cfg = tiny_config(synthetic_tree, epochs=500)
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marrowscope",
            "train",
            "--config",
            str(cfg_path),
            "--run-dir",
            str(run),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            metrics = run / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()}")
            time.sleep(0.02)
        else:
            pytest.fail("training did not finish three epochs in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = len((run / "metrics.csv").read_text().splitlines()) - 1
    state = torch.load(run / "state.pt", weights_only=False)
    committed = state["epoch"]
    assert 3 <= written < 500
    # state.pt is the commit point, written after the epoch's other files: at most one behind
    assert committed in (written, written - 1)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "marrowscope",
            "train",
            "--resume",
            str(run),
            "--no-progress",
            "--set",
            f"train.epochs={committed + 2}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, committed + 3))


def test_class_weights_and_sampler_options(synthetic_tree: Path, tmp_path: Path) -> None:
    w = train_mod.class_weights(np.array([10, 20, 40]))
    assert float(w.mean()) == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]
    cfg = from_dict(tiny_config(synthetic_tree, epochs=1, imbalance="sampler", freeze_epochs=0))
    res = fit(cfg, tmp_path / "s", progress=False)
    assert res.history[0]["train_loss"] > 0


def test_swa_saves_the_average_of_the_last_epochs(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    real = train_mod.train_one_epoch

    def record(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(model, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(train_mod, "train_one_epoch", record)
    raw = tiny_config(synthetic_tree, epochs=4, swa_epochs=2, swa_lr=0.1)
    raw["model"] = {"name": "mobilenetv2_100", "pretrained": False}  # a network with batch norm
    fit(from_dict(raw), tmp_path / "run", progress=False)
    saved = _weights(tmp_path / "run" / "last")
    assert len(snapshots) == 4
    floats = [k for k, v in saved.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)  # batch-norm statistics are averaged too
    for k in floats:
        expect = (snapshots[2][k] + snapshots[3][k]) / 2
        assert torch.allclose(saved[k], expect, atol=1e-6), k
    assert not torch.allclose(saved[floats[0]], snapshots[3][floats[0]])
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    # classic SWA: the cosine schedule ends after epoch 2, then the rate is held at 0.1 x peak
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[2] == pytest.approx(0.1 * 0.003) and lrs[3] == pytest.approx(0.1 * 0.003)
    # before averaging starts, the saved weights are the trained ones
    assert rows[0]["val_macro_f1"] == rows[0]["val_macro_f1_raw"]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"swa_epochs": 5}, "between 1 and train.epochs"),
        ({"swa_epochs": 2, "ema_decay": 0.99}, "set one of them"),
        ({"swa_lr": 0.05}, "needs train.swa_epochs"),
        ({"swa_epochs": 2, "swa_lr": 0.0}, "must be > 0"),
    ],
)
def test_swa_settings_out_of_range_are_clear_errors(
    synthetic_tree: Path, train: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):  # at load time, before fit reads any data
        from_dict(tiny_config(synthetic_tree, epochs=4, **train))


def test_lr_schedule_warmup_then_cosine() -> None:
    f = train_mod.lr_lambda_factory(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.01)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
    held = train_mod.lr_lambda_factory(
        total_steps=50, warmup_steps=0, min_ratio=0.01, hold_ratio=0.2
    )
    assert held(49) == pytest.approx(0.01, abs=1e-3)  # the cosine part ends at step 50
    assert held(50) == held(120) == 0.2


def test_unreadable_images_are_skipped_not_fatal(synthetic_tree: Path, tmp_path: Path) -> None:
    (synthetic_tree / "AAA" / "truncated.jpg").write_bytes(
        (synthetic_tree / "AAA" / "AAA_002.jpg").read_bytes()[:200]
    )
    (synthetic_tree / "BBB" / "notes.png").write_text("not an image")
    cfg = from_dict(tiny_config(synthetic_tree, epochs=1))
    fit(cfg, tmp_path / "run", progress=False)
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "truncated.jpg" in skipped and "notes.png" in skipped
    rows = list(csv.DictReader((tmp_path / "run" / "split.csv").open()))
    assert len(rows) == 38  # the manifest keeps them; the images themselves were left out


def test_two_stage_schedule_freezes_the_backbone_first(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    cfg = from_dict(
        {
            **tiny_config(synthetic_tree, epochs=2, freeze_epochs=1),
            "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
        }
    )
    from marrowscope.models.registry import build_model

    start = build_model(cfg.model, 3, input_size=32).backbone.state_dict()
    res = fit(cfg, tmp_path / "run", progress=False)
    assert [h["stage"] for h in res.history] == ["head", "full"]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    # after the whole run the backbone has moved; check epoch 1 through a 1-epoch twin run
    cfg1 = from_dict(
        {
            **tiny_config(synthetic_tree, epochs=1, freeze_epochs=1),
            "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
        }
    )
    fit(cfg1, tmp_path / "one", progress=False)
    after_head = _weights(tmp_path / "one" / "last")
    conv = "backbone.conv_stem.weight"
    assert torch.equal(after_head[conv], start["conv_stem.weight"])
    assert not torch.equal(state["model"][conv], start["conv_stem.weight"])
    assert not torch.equal(after_head["head.4.weight"], state["model"]["head.4.weight"])


def test_early_stopping_on_validation_macro_f1(synthetic_tree: Path, tmp_path: Path) -> None:
    # lr 0: nothing changes after epoch 1, so validation macro-F1 never improves again
    cfg = from_dict(tiny_config(synthetic_tree, epochs=10, lr=0.0, early_stopping_patience=2))
    res = fit(cfg, tmp_path / "run", progress=False)
    assert res.stopped_early
    assert len(res.history) == 3
    assert res.best_epoch == 1


def test_progressive_resizing_schedule() -> None:
    cfg = from_dict(
        {
            "preprocess": {"size": 250},
            "model": {"name": "mobilenetv2_100"},
            "train": {"epochs": 10, "progressive_size": 160, "progressive_epochs": 0.5},
        }
    )
    sizes = [train_mod.train_size(cfg, e) for e in range(1, 11)]
    # five ramp epochs from 160 px towards 250 px (multiples of 8), then the full size
    assert sizes == [160, 176, 192, 216, 232, 250, 250, 250, 250, 250]
    off = from_dict({"preprocess": {"size": 250}, "train": {"epochs": 10}})
    assert {train_mod.train_size(off, e) for e in range(1, 11)} == {250}


@pytest.mark.parametrize(
    ("train", "model", "message"),
    [
        ({"progressive_size": 16}, "mobilenetv2_100", r"progressive_size must be between 32 and"),
        ({"progressive_size": 64}, "mobilenetv2_100", r"progressive_size must be between 32 and"),
        ({"progressive_size": 32, "progressive_epochs": 0.0}, "mobilenetv2_100", "fraction"),
        ({"progressive_size": 32, "progressive_epochs": 1.5}, "mobilenetv2_100", "fraction"),
        ({"progressive_size": 32}, "paper_cnn", "paper_cnn"),
    ],
)
def test_progressive_settings_fail_before_any_data_is_read(
    tmp_path: Path, train: dict, model: str, message: str
) -> None:
    # the data root does not exist: the config error must come first
    cfg_dict = tiny_config(tmp_path / "no-such-folder", **train)
    cfg_dict["model"] = {"name": model, "pretrained": False}
    with pytest.raises(ConfigError, match=message):
        fit(from_dict(cfg_dict), tmp_path / "run", progress=False)


def test_progressive_resizing_trains_on_smaller_crops(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = train_mod.train_one_epoch

    def spy(model, loader, *args, **kw):  # type: ignore[no-untyped-def]
        seen.append(int(next(iter(loader))[0].shape[-1]))
        return real(model, loader, *args, **kw)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    cfg_dict = tiny_config(synthetic_tree, epochs=4, progressive_size=32, progressive_epochs=0.5)
    cfg_dict["preprocess"]["size"] = 48
    cfg_dict["model"] = {"name": "mobilenetv2_100", "pretrained": False}
    fit(from_dict(cfg_dict), tmp_path / "run", progress=False)
    assert seen == [32, 40, 48, 48]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["train_size"]) for r in rows] == [32, 40, 48, 48]
    meta = json.loads((tmp_path / "run" / "best" / "metadata.json").read_text())
    assert meta["input_size"] == 48  # the model predicts at the full size


def _train_cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from marrowscope.cli.main import app

    return CliRunner().invoke(app, ["train", *args, "--no-progress"])


@pytest.fixture
def one_epoch_run(synthetic_tree: Path, tmp_path: Path) -> Path:
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(synthetic_tree, epochs=1)))
    run = tmp_path / "run"
    res = _train_cli("--config", str(cfg), "--run-dir", str(run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    return run


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.ema_decay=0.99", "train.ema_decay"),
        ("train.swa_epochs=1", "train.swa_epochs"),
        ("preprocess.size=48", "preprocess.size"),
        ("model.head_hidden=64", "model.head_hidden"),
        # the run trains on its split.csv: other data would be recorded but never used
        ("data.split.val=0.5", "data.split.val"),
        # other optimizer parameter groups than state.pt holds
        ("train.layer_decay=0.8", "train.layer_decay"),
    ],
)
def test_incompatible_resume_is_one_error_and_leaves_the_run_untouched(
    one_epoch_run: Path, override: str, key: str
) -> None:
    run = one_epoch_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = _train_cli("--resume", str(run), "--set", "train.epochs=2", "--set", override)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    assert f"cannot resume {run}" in res.output and key in res.output
    assert "Changed for the rest of the run" not in res.output  # nothing changed after all
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # config.yaml, split.csv, metrics.csv, state.pt: byte-identical
    # what the error advises works: a plain resume goes on from the saved state
    res = _train_cli("--resume", str(run), "--set", "train.epochs=2")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_resume_with_a_state_that_does_not_fit_the_config_is_one_error(
    one_epoch_run: Path,
) -> None:
    import yaml

    run = one_epoch_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["preprocess"]["size"] = 48  # edited by hand: no --set to compare with
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = _train_cli("--resume", str(run), "--set", "train.epochs=2")
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert f"its state.pt does not fit the config ({run / 'config.yaml'}" in res.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_takes_device_and_refuses_config_and_run_dir(
    one_epoch_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    run = one_epoch_run
    for extra in (["--config", str(tmp_path / "tiny.yaml")], ["--run-dir", str(tmp_path / "x")]):
        res = _train_cli("--resume", str(run), *extra)
        assert res.exit_code == 2, res.output
        assert "leave out --config and --run-dir" in res.output
    assert not (tmp_path / "x").exists()

    seen: list[str] = []
    real = train_mod.train_one_epoch

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["device"].type)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    # the run was recorded with train.device=cpu; --device is a run-time choice and wins
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["device"] == "cpu"
    device = "cuda" if torch.cuda.is_available() else "auto"
    res = _train_cli("--resume", str(run), "--set", "train.epochs=2", "--device", device)
    assert res.exit_code == 0, res.output
    assert seen == [torch.device("cuda" if device == "cuda" else "cpu").type]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["device"] == device


def test_resume_applies_a_new_learning_rate_and_weight_decay(
    one_epoch_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the saved optimizer state must not silently keep the old rates: --set train.lr on resume
    # applies from the next epoch, on the config's schedule, and is recorded and said
    import yaml

    run = one_epoch_run
    seen: list[list[tuple[float, float, float]]] = []
    real = train_mod.train_one_epoch

    def spy(model, loader, optimizer, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([(g["initial_lr"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups])
        return real(model, loader, optimizer, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    res = _train_cli(
        "--resume", str(run), "--set", "train.epochs=3", "--set", "train.lr=0.0005",
        "--set", "train.weight_decay=0.2",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "train.lr 0.003 -> 0.0005" in " ".join(res.output.split())
    assert len(seen) == 2  # epochs 2 and 3
    for peak, lr, decay in seen[0]:
        assert peak == pytest.approx(0.0005)
        assert decay in (0.0, pytest.approx(0.2))  # biases and norms have no decay
        # epoch 2 of 3 on a cosine schedule without warm-up starts below the peak, above 0
        assert 0 < lr < peak
    assert any(decay == pytest.approx(0.2) for _, _, decay in seen[0])
    assert seen[1][0][1] < seen[0][0][1]  # the schedule goes on decaying
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["lr"], saved["weight_decay"]) == (0.0005, 0.2)


def test_train_refuses_a_folder_that_is_not_a_run(synthetic_tree: Path, tmp_path: Path) -> None:
    import yaml

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my notes\n")
    (mine / "summary.json").write_text("{}")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(synthetic_tree, epochs=1)))
    res = _train_cli("--config", str(cfg), "--run-dir", str(mine))
    assert res.exit_code == 2, res.output
    assert f"{mine} is not empty" in res.output and "--run-dir" in res.output
    assert (mine / "config.yaml").read_text() == "# my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "summary.json"]
    # an empty folder is fine, and fit() itself (cv/compare folds) keeps writing where told
    (tmp_path / "empty").mkdir()
    res = _train_cli("--config", str(cfg), "--run-dir", str(tmp_path / "empty"))
    assert res.exit_code == 0, res.output
    fit(from_dict(tiny_config(synthetic_tree, epochs=1)), mine, progress=False)
    assert (mine / "state.pt").is_file()


def test_resume_with_another_batch_size_goes_on_at_the_right_point_of_the_schedule(
    one_epoch_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A smaller batch means more steps per epoch: the rest of the run follows the schedule of
    the new step count from the end of epoch 1, and reaches the floor at the last step (the saved
    step count alone would put it half-way back and never reach the floor)."""
    import yaml

    run = one_epoch_run
    seen: list[tuple[int, float]] = []
    real = train_mod.train_one_epoch

    def spy(model, loader, optimizer, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((len(loader), optimizer.param_groups[-1]["lr"]))
        return real(model, loader, optimizer, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    res = _train_cli("--resume", str(run), "--set", "train.epochs=3", "--set", "train.batch_size=2")
    assert res.exit_code == 0, res.output
    t = yaml.safe_load((run / "config.yaml").read_text())["train"]
    steps = seen[0][0]
    schedule = train_mod.lr_lambda_factory(steps * 3, 0, t["min_lr_ratio"])
    assert [lr for _, lr in seen] == pytest.approx(
        [t["lr"] * schedule(steps), t["lr"] * schedule(2 * steps)]
    )
    last = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open())][-1]
    assert last == pytest.approx(t["lr"] * t["min_lr_ratio"])


def test_resume_keeps_the_copies_left_out_in_skipped_csv(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """An image that fails on resume rewrites skipped.csv: the identical copy left out at the
    first start stays listed beside it."""
    import shutil

    import yaml

    copy = synthetic_tree / "BBB" / "zcopy.png"
    shutil.copy(synthetic_tree / "BBB" / "BBB_001.png", copy)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(synthetic_tree, epochs=1)))
    run = tmp_path / "run"
    res = _train_cli("--config", str(cfg), "--run-dir", str(run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    first = list(csv.DictReader((run / "skipped.csv").open()))
    assert [r["path"] for r in first] == [str(copy)]
    broken = next(r["path"] for r in csv.DictReader((run / "split.csv").open()))
    Path(broken).write_bytes(b"not an image any more")
    res = _train_cli("--resume", str(run), "--set", "train.epochs=2")
    assert res.exit_code == 0, res.output
    again = {r["path"]: r["error"] for r in csv.DictReader((run / "skipped.csv").open())}
    assert set(again) == {str(copy), broken}
    assert again[str(copy)] == first[0]["error"]

"""Data-parallel training for real: 2 processes on gloo through torch.distributed.run (CPU).

A tiny CNN on 48 synthetic cells (24 training images, 12 validation), launched with torchrun;
``ddp_probe.py`` records each rank's sample indices and a digest of the parameters after every
optimizer step. One run trains 2 epochs and is resumed to 3; a second trains 3 epochs at once;
a third has one rank killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from marrowscope.config import load_config
from marrowscope.data.manifest import read_manifest
from marrowscope.engine import train as train_mod
from marrowscope.engine.data import prepare_data
from marrowscope.models.bundle import load_bundle
from marrowscope.models.registry import build_model
from marrowscope.utils.runtime import resolve_precision

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("ddp_probe.py")
TIMEOUT = 240


def ddp_config(root: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "ddp",
        "seed": 7,
        "data": {"root": str(root), "min_per_class": 4, "split": {"val": 0.25, "test": 0.25}},
        "preprocess": {"size": 32, "workers": 1},
        "augment": {"zoom": [0.9, 1.0]},
        "model": {"name": "paper_cnn", "pretrained": False},
        "train": {
            "epochs": 2,
            "batch_size": 4,  # the global batch: 2 images per process and step
            "lr": 0.003,
            "warmup_epochs": 0,
            "min_lr_ratio": 1.0,  # a constant rate: 2 epochs + 1 resumed = 3 epochs at once
            "precision": "fp32",
            "ema_decay": 0.9,  # EMA on the unwrapped model, restored on resume
            **train,
        },
    }


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    return env


def _torchrun(args: list[str], trace: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run(
        [*cmd, str(PROBE), *args],
        env=_env(MARROWSCOPE_TEST_TRACE=str(trace), MARROWSCOPE_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _trace(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 epochs then --resume to 3, and 3 epochs at once, each with 2 processes."""
    from conftest import write_synthetic_tree

    base = tmp_path_factory.mktemp("ddp")
    cells = write_synthetic_tree(base / "cells", per_class=16)
    cfg_path = base / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(ddp_config(cells)))
    cache = base / "cache"
    runs = base / "runs"
    common = ["--config", str(cfg_path), "--no-progress"]
    _torchrun(["train", *common, "--run-dir", str(runs / "run")], base / "trace-a", cache)
    res = _torchrun(
        ["train", "--resume", str(runs / "run"), "--set", "train.epochs=3", "--no-progress"],
        base / "trace-b",
        cache,
    )
    _torchrun(
        ["train", *common, "--set", "train.epochs=3", "--run-dir", str(base / "straight")],
        base / "trace-c",
        cache,
    )
    return {
        "base": base,
        "runs": runs,
        "run": runs / "run",
        "straight": base / "straight",
        "first": _trace(base / "trace-a"),
        "resumed": _trace(base / "trace-b"),
        "at_once": _trace(base / "trace-c"),
        "resume_output": res.stdout + res.stderr,
        "cache": cache,
    }


def test_rank_0_alone_writes_one_run_folder_with_unwrapped_bundles(ddp_runs: dict) -> None:
    runs, run = ddp_runs["runs"], ddp_runs["run"]
    assert [p.name for p in runs.iterdir()] == ["run"]  # one run folder, named by rank 0
    expected = {
        "best",
        "last",
        "config.yaml",
        "split.csv",
        "metrics.csv",
        "curves.png",
        "state.pt",
        "summary.json",
    }
    assert {p.name for p in run.iterdir()} == expected  # no temporary or .old leftovers
    keys = set(build_model(load_config(run / "config.yaml").model, 3, input_size=32).state_dict())
    for bundle in ("best", "last"):
        assert sorted(p.name for p in (run / bundle).iterdir()) == [
            "metadata.json",
            "model.safetensors",
        ]
        assert set(load_file(str(run / bundle / "model.safetensors"))) == keys  # no "module."
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 3
    # one set of messages (rank 0), whatever each process printed
    assert ddp_runs["resume_output"].count("Resuming") == 1
    assert ddp_runs["resume_output"].count("Changed for the rest of the run") == 1
    assert ddp_runs["resume_output"].count("Training finished") == 1


def test_parameters_are_identical_across_ranks_after_every_step(ddp_runs: dict) -> None:
    for key in ("first", "resumed", "at_once"):
        r0, r1 = ddp_runs[key]
        assert r0["steps"] and r0["steps"] == r1["steps"], key
        for epoch in (*r0["epochs"], *r1["epochs"]):
            assert epoch["wrapper"] == "DistributedDataParallel"
            assert epoch["batch_size"] == 2  # half of the global batch of 4
    # 12 samples per rank and epoch in batches of 2
    assert len(ddp_runs["at_once"][0]["steps"]) == 3 * 6


def test_sample_indices_are_disjoint_complete_and_reshuffled(ddp_runs: dict) -> None:
    r0, r1 = ddp_runs["at_once"]
    orders = []
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        a, b = e0["indices"], e1["indices"]
        assert len(a) == len(b) == 12
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(24))
        orders.append(a)
    assert orders[0] != orders[1] != orders[2]


def test_resume_restores_every_rank_and_matches_an_uninterrupted_run(ddp_runs: dict) -> None:
    first, resumed, at_once = ddp_runs["first"], ddp_runs["resumed"], ddp_runs["at_once"]
    for rank in (0, 1):
        # epochs 1-2 then the resumed epoch 3 draw and step exactly as the run done at once:
        # weights, optimizer, scheduler, EMA and sampler epoch were all restored on each rank
        assert [e["indices"] for e in first[rank]["epochs"] + resumed[rank]["epochs"]] == [
            e["indices"] for e in at_once[rank]["epochs"]
        ]
        assert first[rank]["steps"] + resumed[rank]["steps"] == at_once[rank]["steps"], rank
    a = load_file(str(ddp_runs["run"] / "last" / "model.safetensors"))
    b = load_file(str(ddp_runs["straight"] / "last" / "model.safetensors"))
    for k in a:  # the EMA weights the bundles hold
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_validation_metrics_equal_a_single_process_evaluation(
    ddp_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = ddp_runs["run"]
    monkeypatch.setenv("MARROWSCOPE_CACHE", str(ddp_runs["cache"]))
    cfg = load_config(run / "config.yaml")
    data = prepare_data(cfg, rows=read_manifest(run / "split.csv"), progress=False)
    model, _ = load_bundle(run / "last")  # epoch 3's EMA weights, as validated
    _, val_loader = train_mod._loaders(data, cfg, 3)  # one process: every validation image
    device = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, device, cfg.train.channels_last)
    single = train_mod._evaluate_split(model, val_loader, data.classes, device, precision)
    assert single["n"] == 12
    last = torch.load(run / "state.pt", weights_only=False)["history"][-1]
    assert last["epoch"] == 3
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert last[f"val_{key}"] == single[key], key
    assert last["val_loss"] == pytest.approx(single["loss"], abs=1e-6)


def _pid_of_rank(token: str, rank: int) -> int | None:
    """The worker process of this test's job with ``RANK`` = ``rank`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MARROWSCOPE_TEST_TOKEN={token}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank through /proc")
def test_a_killed_rank_fails_the_run_with_a_clear_error(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "long.yaml"
    cfg_path.write_text(yaml.safe_dump(ddp_config(synthetic_tree, epochs=500)))
    run = tmp_path / "run"
    token = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "marrowscope", "train", "--nproc", "2"),
            *("--config", str(cfg_path), "--run-dir", str(run), "--no-progress"),
        ],
        env=_env(MARROWSCOPE_TEST_TOKEN=token),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        victim = None
        while time.time() < deadline and victim is None:
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read()[-3000:]}")
            if (run / "metrics.csv").exists():  # an epoch finished: both ranks are training
                victim = _pid_of_rank(token, 1)
            time.sleep(0.1)
        assert victim is not None, "rank 1 never started training"
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=120)
        waited = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert waited < 60, f"the run took {waited:.0f} s to fail"
    summary = [line for line in err.splitlines() if line.startswith("error:")]
    assert summary and "rank 1" in summary[-1] and "SIGKILL" in summary[-1], err[-3000:]
    assert _pid_of_rank(token, 0) is None  # rank 0 was stopped too

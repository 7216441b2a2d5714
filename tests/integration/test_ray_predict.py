"""``predict --engine ray`` on real local Ray clusters: the same rows as ``--engine local``.

One cluster is started in this process (``ray.init(num_cpus=2)``); another with ``ray start
--head`` in a subprocess, reached through ``--address auto``. Both on loopback, no dashboard,
no usage statistics.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from marrowscope.cli.main import app

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pa_parquet = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.integration

runner = CliRunner()


@pytest.fixture
def images(cell_files: list[Path], tmp_path: Path) -> list[str]:
    """Two inputs: a local folder with 4 cells, a truncated JPEG, a text file named .png and a
    .txt file, and (as a file:// URI, read through pyarrow.fs) a folder with 2 more cells and a
    .csv file."""
    a = tmp_path / "in" / "a"
    b = tmp_path / "in" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for i, p in enumerate(cell_files):
        shutil.copy(p, (a if i < 4 else b) / p.name)
    (a / "truncated.jpg").write_bytes(cell_files[0].read_bytes()[:150])
    (a / "notes.png").write_text("not an image")
    (a / "readme.txt").write_text("left out by extension, and said so")
    (b / "labels.csv").write_text("path,label\n")
    return [str(a), b.absolute().as_uri()]


def _frame(path: Path):  # type: ignore[no-untyped-def]
    return pa_parquet.read_table(path).to_pandas().sort_values("path").reset_index(drop=True)


def _local_predictions(bundle: Path, inputs: list[str], out: Path):  # type: ignore[no-untyped-def]
    local = [i.removeprefix("file://") for i in inputs]  # --engine local reads plain paths
    res = runner.invoke(
        app, ["predict", str(bundle), *local, "--out", str(out), "--workers", "1", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "skipped 2 file(s) that are not images by their extension (readme.txt, labels.csv)" in (
        " ".join(res.output.split())
    )
    frame = _frame(out)
    frame["path"] = [
        p if p.startswith(inputs[0]) else Path(p).absolute().as_uri() for p in frame["path"]
    ]
    return frame.sort_values("path").reset_index(drop=True)


def _assert_same_rows(ray_out: Path, local) -> None:  # type: ignore[no-untyped-def]
    got = _frame(ray_out)
    assert list(got.columns) == list(local.columns)
    assert list(got.dtypes) == list(local.dtypes)
    assert got["path"].tolist() == local["path"].tolist()
    probs = [c for c in got.columns if c.startswith("p_") or c == "confidence"]
    text = [c for c in got.columns if c not in probs]
    assert got[text].fillna("-").equals(local[text].fillna("-"))
    diff = np.nanmax(np.abs(got[probs].to_numpy(float) - local[probs].to_numpy(float)))
    assert diff <= 1e-5, diff
    # the unreadable files are rows with their error, no prediction
    bad = got[got["error"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["notes.png", "truncated.jpg"]
    assert bad["predicted"].isna().all() and bad["p_AAA"].isna().all()
    assert got[got["error"] == ""]["predicted"].notna().sum() == 6


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new cluster, never one another user of this machine started with `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_engine_matches_local_engine(
    local_ray, tiny_bundle: Path, images: list[str], tmp_path: Path
) -> None:
    local = _local_predictions(tiny_bundle, images, tmp_path / "local.parquet")
    out = tmp_path / "preds.parquet"
    res = runner.invoke(
        app,
        ["predict", str(tiny_bundle), *images, "--engine", "ray", "--out", str(out)]
        + ["--no-progress", "--batch-size", "4"],
    )
    assert res.exit_code == 0, res.output
    assert "8 images, 2 error(s)" in res.output and "images/s" in res.output
    # the files left out by extension are named, as --engine local names them
    assert "skipped 2 file(s) that are not images by their extension (readme.txt, labels.csv)" in (
        " ".join(res.output.split())
    )
    assert out.is_dir() and not list(out.parent.glob(".preds.parquet.tmp-*"))
    _assert_same_rows(out, local)
    # the Ray cluster this process had started is still there (predict used it, did not stop it)
    assert ray.is_initialized()
    again = runner.invoke(
        app, ["predict", str(tiny_bundle), *images, "--engine", "ray", "--out", str(out)]
    )
    assert again.exit_code == 2 and "already exists" in again.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RAY_CLI = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")


@pytest.mark.skipif(RAY_CLI is None, reason="no ray command-line tool")
def test_ray_start_head_and_address_auto(
    tiny_bundle: Path, images: list[str], tmp_path: Path
) -> None:
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # a private, short temp folder (socket paths are limited to ~107 characters): the cluster's
    # address file stays out of the shared /tmp/ray, where a plain ray.init() would find it
    temp = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))
    head = subprocess.Popen(
        [
            str(RAY_CLI),
            *("start", "--head", "--block", f"--port={port}", "--num-cpus=2"),
            *("--node-ip-address=127.0.0.1", "--include-dashboard=false"),
            *("--disable-usage-stats", f"--temp-dir={temp}"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        started = False
        assert head.stdout is not None
        while time.time() < deadline:
            line = head.stdout.readline()
            if not line and head.poll() is not None:
                break
            if "block forever" in line or "Ray runtime started" in line:
                started = True
                break
        assert started, f"ray start --head did not start (exit code {head.poll()})"
        out = tmp_path / "preds.parquet"
        # `--address auto` finds the cluster through RAY_ADDRESS (not whichever cluster another
        # user of this machine started last)
        res = subprocess.run(
            [sys.executable, "-m", "marrowscope", "predict", str(tiny_bundle), *images]
            + ["--engine", "ray", "--address", "auto", "--out", str(out), "--no-progress"],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        assert "8 images, 2 error(s)" in res.stdout
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    _assert_same_rows(out, _local_predictions(tiny_bundle, images, tmp_path / "local.parquet"))

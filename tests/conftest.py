"""Shared fixtures: an isolated preprocessing cache, few threads, synthetic cell folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network; a hub download must fail at once, as it does offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# PostgreSQL, Chromium (Playwright) and live-server fixtures: tests/harness/plugin.py.
pytest_plugins = ["harness.plugin"]

COLOURS = {"AAA": (200, 40, 40), "BBB": (40, 160, 40), "CCC": (50, 60, 200)}


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own preprocessing cache (never the user's ~/.cache)."""
    monkeypatch.setenv("MARROWSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


def ended_pid() -> int:
    """The process id of a process that has just ended (a crashed writer's, for left-over
    temporary files)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def make_cell(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 48) -> np.ndarray:
    """A synthetic 'cell': a coloured disc with a darker nucleus on a pale background, plus noise."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.4, size * 0.6, 2)
    r = rng.uniform(size * 0.25, size * 0.35)
    img = np.full((size, size, 3), 230, np.float32)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img[disc] = colour
    nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < (r / 2) ** 2
    img[nucleus] = np.asarray(colour, np.float32) * 0.5
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_tree(root: Path, per_class: int = 12, size: int = 48, seed: int = 0) -> Path:
    """A folder-per-class tree of synthetic cells (JPEG and PNG, one nested sub-folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, colour in COLOURS.items():
        for i in range(per_class):
            sub = root / c / ("batch2" if i % 3 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(make_cell(rng, colour, size)).save(sub / f"{c}_{i:03d}.{ext}")
    return root


BUNDLE_CLASSES = ["AAA", "BBB", "CCC"]


def make_bundle(directory: Path, *, seed: int = 0, size: int = 32, sharpen: bool = False) -> Path:
    """A tiny checkpoint bundle: random paper_cnn, 3 classes, ``size`` px."""
    import torch

    from marrowscope.config import ModelConfig, PreprocessConfig
    from marrowscope.models.bundle import save_bundle
    from marrowscope.models.registry import build_model
    from marrowscope.preprocess.ops import preprocess_params

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=size)
    pre = preprocess_params(PreprocessConfig(size=size, sharpen=sharpen))
    return save_bundle(directory, model, {"classes": BUNDLE_CLASSES, "preprocess": pre})


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A tiny paper_cnn bundle (32 px, classes AAA/BBB/CCC)."""
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def cell_files(tmp_path: Path) -> list[Path]:
    """Six small RGB JPEG/PNG files of different sizes and content."""
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "cell_files"
    folder.mkdir()
    out = []
    for i in range(6):
        arr = rng.integers(0, 256, (40 + 4 * i, 44, 3), dtype=np.uint8)
        arr[10:30, 10:30] = (200 - 30 * i, 40 + 20 * i, 90)
        p = folder / f"cell_{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture
def synthetic_tree(tmp_path: Path) -> Path:
    """3 classes x 12 synthetic cells, 48x48."""
    return write_synthetic_tree(tmp_path / "cells")

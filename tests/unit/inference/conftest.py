"""A tiny checkpoint bundle (paper_cnn, 32 px, 3 classes) and small image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marrowscope.config import ModelConfig, PreprocessConfig
from marrowscope.models.bundle import save_bundle
from marrowscope.models.registry import build_model
from marrowscope.preprocess.ops import preprocess_params

CLASSES = ["AAA", "BBB", "CCC"]


def make_bundle(directory: Path, *, seed: int = 0, size: int = 32, sharpen: bool = False) -> Path:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="paper_cnn", pretrained=False), 3, input_size=size)
    pre = preprocess_params(PreprocessConfig(size=size, sharpen=sharpen))
    return save_bundle(directory, model, {"classes": CLASSES, "preprocess": pre})


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def cell_files(tmp_path: Path) -> list[Path]:
    """Six small RGB JPEG/PNG files of different sizes and content."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cells"
    folder.mkdir()
    out = []
    for i in range(6):
        arr = rng.integers(0, 256, (40 + 4 * i, 44, 3), dtype=np.uint8)
        arr[10:30, 10:30] = (200 - 30 * i, 40 + 20 * i, 90)
        p = folder / f"cell_{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out

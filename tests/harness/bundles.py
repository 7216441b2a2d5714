"""Tiny real checkpoint bundles for tests that need a model whose calls are known in advance."""

from __future__ import annotations

from pathlib import Path

import torch

from marrowscope.config import ModelConfig, PreprocessConfig
from marrowscope.models.bundle import save_bundle
from marrowscope.models.registry import build_model
from marrowscope.preprocess.ops import preprocess_params


def favoured_bundle(directory: Path, classes: list[str], favour: int | None = None) -> Path:
    """A 32-px paper_cnn bundle; ``favour``: a class whose logit gets +10 (called for every cell)."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="paper_cnn", pretrained=False), len(classes), input_size=32
    )
    if favour is not None:
        with torch.no_grad():
            model.head.fc2.bias[favour] = 10.0
    pre = preprocess_params(PreprocessConfig(size=32))
    return save_bundle(directory, model, {"classes": classes, "preprocess": pre})

"""Synthetic comparison rows for the report tests (two models, three classes, one is HAC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from marrowscope.metrics import classification_metrics

CLASSES = ["HAC", "LYT", "NGS"]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def _make_rows(classes: list[str] = CLASSES) -> list[dict[str, Any]]:
    """Two models scored on the same 10 test labels."""
    preds = {
        "resnet50": [0, 0, 0, 1, 1, 1, 2, 2, 2, 1],  # HAC: P 1.0, R 0.75
        "vit_small": [0, 0, 1, 1, 1, 1, 1, 2, 2, 2],  # HAC: P 1.0, R 0.5
    }
    rows = []
    for i, (name, pred) in enumerate(preds.items()):
        m = classification_metrics(Y_TRUE, pred, classes)
        rows.append(
            {
                "model": name,
                "train_accuracy": 0.95 - 0.05 * i,
                "val_accuracy": 0.85 - 0.05 * i,
                "test_accuracy": m["accuracy"],
                "test_macro_f1": m["macro_f1"],
                "epochs": 10 + i,
                "train_seconds": 120.0 + i,
                "params": 25_557_032 if i == 0 else 22_050_664,
                "metrics": m,
            }
        )
    return rows


@pytest.fixture
def make_rows() -> Callable[..., list[dict[str, Any]]]:
    """``make_rows(classes)``: the two synthetic rows for another class list."""
    return _make_rows


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return _make_rows()

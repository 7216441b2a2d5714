"""PNG figures: valid files of the expected size; curve and matrix content checked on the figure."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from marrowscope.reports.plots import (
    DPI,
    confusion_matrix_figure,
    model_comparison_figure,
    per_class_f1_figure,
    plot_confusion_matrix,
    plot_model_comparison,
    plot_per_class_f1,
    plot_training_curves,
    training_curves_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.55,
     "val_macro_f1": 0.5},
    {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.7, "val_loss": 0.9, "val_accuracy": 0.7,
     "val_macro_f1": 0.68},
    {"epoch": 3, "train_loss": 0.6, "train_accuracy": 0.8, "val_loss": None, "val_accuracy": 0.69,
     "val_macro_f1": 0.66},
    {"epoch": 4, "train_loss": 0.5, "train_accuracy": 0.85},
]  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_png(path: Path, width: float, height: float) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    w, h = png_size(path)
    assert abs(w - width) <= 2 and abs(h - height) <= 2, (w, h)
    assert not list(path.parent.glob(".*.tmp-*")), "temporary file left behind"


def test_training_curves_png(tmp_path: Path) -> None:
    out = plot_training_curves(HISTORY, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert_png(out, 8.0 * DPI, 3.2 * DPI)


def test_training_curves_content_marks_best_epoch() -> None:
    fig = training_curves_figure(HISTORY)
    ax_acc, ax_loss = fig.axes
    labels = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert "best epoch 2 (macro-F1 0.680)" in labels
    f1_line = next(ln for ln in ax_acc.get_lines() if ln.get_label() == "validation macro-F1")
    assert f1_line.get_linestyle() == "--"
    np.testing.assert_allclose(f1_line.get_xdata(), [1, 2, 3])  # epoch 4 has no validation
    val_loss = next(ln for ln in ax_loss.get_lines() if ln.get_label() == "validation loss")
    np.testing.assert_allclose(val_loss.get_xdata(), [1, 2])  # None left out
    # the best epoch is marked by a vertical line on both panels
    for ax in (ax_acc, ax_loss):
        assert any(list(ln.get_xdata()) == [2, 2] for ln in ax.get_lines())


def test_training_curves_without_validation_has_no_best_marker() -> None:
    fig = training_curves_figure([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    assert fig.axes[0].get_legend() is None
    assert [ln.get_label() for ln in fig.axes[1].get_lines()] == ["training loss"]


def test_training_curves_empty_history_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no epoch"):
        plot_training_curves([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_confusion_matrix_png_and_annotations(tmp_path: Path) -> None:
    cm = [[3, 1, 0], [0, 2, 1], [0, 1, 2]]
    out = plot_confusion_matrix(cm, ["A", "B", "C"], tmp_path / "cm.png", title="demo")
    side = 4.5
    assert_png(out, (side + 1) * DPI, side * DPI)
    texts = {t.get_text() for t in confusion_matrix_figure(cm, ["A", "B", "C"]).axes[0].texts}
    assert {"3\n75%", "1\n25%", "2\n67%", "1\n33%"} <= texts
    assert len(texts & {"0\n0%"}) == 0  # empty cells stay blank


def test_confusion_matrix_grows_with_21_classes(tmp_path: Path) -> None:
    k = 21
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 30, (k, k)) + np.eye(k, dtype=int) * 200
    out = plot_confusion_matrix(cm, [f"C{i:02d}" for i in range(k)], tmp_path / "cm21.png")
    side = 0.6 * k + 2.5
    assert_png(out, (side + 1) * DPI, side * DPI)


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 classes"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["A", "B", "C"], tmp_path / "x.png")


def test_model_comparison_png(tmp_path: Path, rows) -> None:
    rows[1]["val_accuracy"] = None  # a missing value leaves its bar out, no crash
    out = plot_model_comparison(rows, tmp_path / "comparison.png")
    assert_png(out, 6.0 * DPI, 4.0 * DPI)


def test_model_comparison_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model"):
        plot_model_comparison([], tmp_path / "c.png")


def test_per_class_f1_png(tmp_path: Path, rows) -> None:
    per_model = {
        r["model"]: {c: v["f1"] for c, v in r["metrics"]["per_class"].items()} for r in rows
    }
    out = plot_per_class_f1(per_model, tmp_path / "per_class_f1.png")
    assert_png(out, 6.0 * DPI, 4.0 * DPI)


def _bars(ax) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Bar heights per legend label, in x order."""
    out: dict[str, list[float]] = {}
    for container in ax.containers:
        out[container.get_label()] = [b.get_height() for b in container]
    return out


def test_model_comparison_content(rows) -> None:  # type: ignore[no-untyped-def]
    rows[1]["val_accuracy"] = None
    ax = model_comparison_figure(rows).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["resnet50", "vit_small"]
    bars = _bars(ax)
    assert list(bars) == ["Validation accuracy", "Test accuracy", "Test macro-F1"]
    np.testing.assert_allclose(bars["Validation accuracy"], [0.85, 0.0])  # missing: no bar
    np.testing.assert_allclose(bars["Test accuracy"], [r["test_accuracy"] for r in rows])
    np.testing.assert_allclose(bars["Test macro-F1"], [r["test_macro_f1"] for r in rows])
    labels = {t.get_text() for t in ax.texts}
    assert "0.850" in labels and f"{rows[0]['test_macro_f1']:.3f}" in labels
    assert ax.get_ylim() == (0.0, 1.1)


def test_per_class_f1_content_keeps_first_seen_class_order() -> None:
    per_model = {"a": {"HAC": 0.9, "LYT": 0.5}, "b": {"LYT": 0.7, "NGS": 0.2}}
    ax = per_class_f1_figure(per_model).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["HAC", "LYT", "NGS"]
    bars = _bars(ax)
    np.testing.assert_allclose(bars["a"], [0.9, 0.5, 0.0])  # NGS missing for a: no bar
    np.testing.assert_allclose(bars["b"], [0.0, 0.7, 0.2])
    with pytest.raises(ValueError, match="no model"):
        per_class_f1_figure({})

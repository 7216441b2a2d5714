"""PNG figures: training curves, confusion matrix, model comparison, per-class F1.

Figures are built as :class:`matplotlib.figure.Figure` objects on their own Agg canvas, never
through ``pyplot``: no global figure state, no GUI backend, nothing leaks between calls, and the
process-wide backend is left alone. Every file is written atomically and each function returns
the path it wrote. Sizes are fixed (no ``bbox_inches="tight"``), so a figure's pixel size is
``figsize * dpi``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from marrowscope.utils.io import atomic_write

__all__ = [
    "DPI",
    "confusion_matrix_figure",
    "model_comparison_figure",
    "per_class_f1_figure",
    "training_curves_figure",
    "plot_confusion_matrix",
    "plot_model_comparison",
    "plot_per_class_f1",
    "plot_training_curves",
]

DPI = 120

_METRIC_LABELS = {
    "train_accuracy": "Training accuracy",
    "val_accuracy": "Validation accuracy",
    "test_accuracy": "Test accuracy",
    "test_macro_f1": "Test macro-F1",
    "val_macro_f1": "Validation macro-F1",
}
_CURVE_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI))
    finally:
        fig.clear()
    return path


def _value(row: Mapping[str, Any], key: str) -> float:
    """``row[key]`` as float; NaN when missing, ``None`` or empty (matplotlib leaves NaN out)."""
    v = row.get(key)
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={v!r} is not a number; cannot plot it") from None


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, **kw: Any) -> None:
    """Plot ``y`` against ``x`` where ``y`` is known; nothing when it is never known."""
    ok = ~np.isnan(y)
    if ok.any():
        ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, markersize=3, **kw)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy and loss per epoch, training vs validation (the paper's Figure 5).

    Left panel: training and validation accuracy, validation macro-F1 dashed. Right panel:
    training and validation loss. The best epoch (highest validation macro-F1, the first one on
    ties) is marked on both panels. Missing or ``None`` values are left out.

    Args:
        history: one dict per epoch with ``epoch`` and some of ``train_loss``, ``train_accuracy``,
            ``val_loss``, ``val_accuracy``, ``val_macro_f1``.
        path: PNG file to write (960 x 384 px).

    Returns:
        ``path``.

    Raises:
        ValueError: ``history`` is empty.
    """
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The figure of :func:`plot_training_curves`, not saved (for tests and notebooks)."""
    if not history:
        raise ValueError("no epoch in the training history, nothing to plot")
    epochs = np.array(
        [_value(r, "epoch") if r.get("epoch") is not None else i + 1 for i, r in enumerate(history)]
    )
    col = {k: np.array([_value(r, k) for r in history]) for k in _CURVE_KEYS}

    fig = _new_figure(8.0, 3.2)
    ax_acc, ax_loss = fig.subplots(1, 2)
    _curve(ax_acc, epochs, col["train_accuracy"], label="training accuracy", color="C0")
    _curve(ax_acc, epochs, col["val_accuracy"], label="validation accuracy", color="C1")
    _curve(
        ax_acc, epochs, col["val_macro_f1"], label="validation macro-F1", color="C2", linestyle="--"
    )
    _curve(ax_loss, epochs, col["train_loss"], label="training loss", color="C0")
    _curve(ax_loss, epochs, col["val_loss"], label="validation loss", color="C1")

    f1 = col["val_macro_f1"]
    if (~np.isnan(f1)).any():
        best = int(np.nanargmax(f1))
        for ax in (ax_acc, ax_loss):
            ax.axvline(epochs[best], color="0.4", linestyle=":", linewidth=1)
        ax_acc.plot(
            [epochs[best]],
            [f1[best]],
            marker="*",
            markersize=11,
            color="C2",
            linestyle="none",
            label=f"best epoch {epochs[best]:g} (macro-F1 {f1[best]:.3f})",
        )

    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy / macro-F1")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    return fig


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Confusion-matrix heatmap annotated with counts and row percentages.

    Rows are true classes, columns predicted classes. Each non-zero cell shows its count and its
    share of the row (the recall of that true class going to that prediction); empty cells stay
    blank so 21 classes remain readable. The figure grows with the number of classes.

    Args:
        cm: square count matrix in ``classes`` order.
        classes: class names.
        path: PNG file to write.
        normalize: colour by row percentage (default) rather than by raw count.
        title: figure title.

    Returns:
        ``path``.
    """
    return _save(confusion_matrix_figure(cm, classes, normalize=normalize, title=title), path)


def confusion_matrix_figure(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """The figure of :func:`plot_confusion_matrix`, not saved (for tests and notebooks)."""
    m = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {m.shape} but there are {k} classes")
    row_sum = m.sum(axis=1, keepdims=True)
    pct = np.divide(m, row_sum, out=np.zeros(m.shape, dtype=np.float64), where=row_sum > 0)
    shown = pct if normalize else m.astype(np.float64)
    vmax = 1.0 if normalize else max(1.0, float(m.max()) if m.size else 1.0)

    side = max(4.5, 0.6 * k + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.6)
    cbar.set_label("share of true class" if normalize else "count")
    font = 9 if k <= 8 else (7.5 if k <= 14 else 6.5)
    for i in range(k):
        for j in range(k):
            if m[i, j] == 0:
                continue
            dark = shown[i, j] > 0.55 * vmax
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{100 * pct[i, j]:.0f}%",
                ha="center",
                va="center",
                fontsize=font,
                color="white" if dark else "black",
            )
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=list(classes), rotation=90, fontsize=max(font, 7))
    ax.set_yticks(ticks, labels=list(classes), fontsize=max(font, 7))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n = int(m.sum())
    acc = float(np.trace(m) / n) if n else 0.0
    ax.set_title(f"{title + chr(10) if title else ''}n = {n}, accuracy {acc:.3f}", fontsize=10)
    return fig


def _grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    annotate: bool,
) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for s, (label, values) in enumerate(series):
        vals = np.asarray(values, dtype=np.float64)
        bars = ax.bar(x - 0.4 + width * (s + 0.5), np.nan_to_num(vals), width, label=label)
        if annotate:
            ax.bar_label(
                bars,
                labels=["" if np.isnan(v) else f"{v:.3f}" for v in vals],
                fontsize=7,
                padding=1,
            )
    ax.set_xticks(x, labels=list(groups))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_model_comparison(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    metrics: Sequence[str] = ("val_accuracy", "test_accuracy", "test_macro_f1"),
) -> Path:
    """Grouped bar chart: one group per model, one bar per metric, values written on the bars.

    Args:
        rows: one dict per model with ``model`` and the ``metrics`` keys (a missing value leaves
            its bar out).
        path: PNG file to write.
        metrics: row keys to draw, in order.

    Returns:
        ``path``.
    """
    if not rows:
        raise ValueError(f"no model to compare, nothing to plot into {path}")
    return _save(model_comparison_figure(rows, metrics=metrics), path)


def model_comparison_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = ("val_accuracy", "test_accuracy", "test_macro_f1"),
) -> Figure:
    """The figure of :func:`plot_model_comparison` (for tests and notebooks)."""
    if not rows:
        raise ValueError("no model to compare")
    if not metrics:
        raise ValueError("metrics is empty: name at least one row key to draw")
    models = [str(r["model"]) for r in rows]
    series = [(_METRIC_LABELS.get(m, m), [_value(r, m) for r in rows]) for m in metrics]
    fig = _new_figure(max(6.0, 1.2 + len(models) * (0.45 * len(metrics) + 0.5)), 4.0)
    ax = fig.subplots()
    _grouped_bars(ax, models, series, annotate=True)
    top = np.nanmax([v for _, vs in series for v in vs] + [0.0])
    ax.set_ylim(0.0, 1.1 if top <= 1.0 else None)
    ax.set_ylabel("score")
    ax.set_title("Model comparison")
    ax.legend(
        fontsize=8,
        ncols=len(series),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        frameon=False,
    )
    if len(models) > 4:
        ax.tick_params(axis="x", labelrotation=30)
    return fig


def plot_per_class_f1(per_model: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Grouped bars of F1 per class (groups) and model (bars).

    Args:
        per_model: ``{model: {class: f1}}``; classes appear in first-seen order, a class missing
            for one model leaves its bar out.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    if not per_model:
        raise ValueError(f"no model given, nothing to plot into {path}")
    return _save(per_class_f1_figure(per_model), path)


def per_class_f1_figure(per_model: Mapping[str, Mapping[str, float]]) -> Figure:
    """The figure of :func:`plot_per_class_f1` (for tests and notebooks)."""
    if not per_model:
        raise ValueError("no model given")
    classes: list[str] = []
    for scores in per_model.values():
        classes.extend(c for c in scores if c not in classes)
    series = [
        (str(name), [_value(scores, c) for c in classes]) for name, scores in per_model.items()
    ]
    width = max(6.0, 1.5 + len(classes) * (0.18 * len(series) + 0.25))
    fig = _new_figure(width, 4.0)
    ax = fig.subplots()
    _grouped_bars(ax, classes, series, annotate=False)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("F1 (test split)")
    ax.set_title("Per-class F1")
    ax.tick_params(axis="x", labelrotation=90 if len(classes) > 8 else 0)
    ax.legend(fontsize=8, ncols=min(len(series), 4), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return fig

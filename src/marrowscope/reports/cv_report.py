"""The cross-validation report (``cv_report.md``) from :func:`marrowscope.engine.cv.summarize`'s
summary: plain text, written by the caller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marrowscope.reports.markdown import confusion_table
from marrowscope.reports.tables import to_markdown

__all__ = ["cv_report", "mean_std"]


def mean_std(ms: Mapping[str, float], digits: int = 3) -> str:
    """``{"mean": m, "std": s}`` -> ``"m ± s"``."""
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def cv_report(summary: Mapping[str, Any]) -> str:
    """The cross-validation summary as Markdown: the TTA variants, per-class F1, the pooled
    confusion matrix, the last epoch's weights and the training time."""
    classes = summary["classes"]
    variants = summary["variants"]
    overview = [
        {
            "TTA": tta,
            "accuracy": mean_std(v["mean_std"]["accuracy"]),
            "balanced acc.": mean_std(v["mean_std"]["balanced_accuracy"]),
            "macro-F1": mean_std(v["mean_std"]["macro_f1"]),
            "pooled macro-F1": v["pooled"]["macro_f1"],
            "ECE (T=1)": mean_std(v["mean_std"]["ece"]),
            "ECE (calibrated)": mean_std(v["mean_std"]["ece_calibrated"]),
        }
        for tta, v in variants.items()
    ]
    best = max(variants, key=lambda t: variants[t]["pooled"]["macro_f1"])
    v = variants[best]
    per_class = [
        {
            "class": c,
            "F1 (mean ± std)": mean_std(v["mean_std"]["per_class_f1"][c]),
            "precision (pooled)": v["pooled"]["per_class"][c]["precision"],
            "recall (pooled)": v["pooled"]["per_class"][c]["recall"],
            "support": v["pooled"]["per_class"][c]["support"],
        }
        for c in classes
    ]
    parts = [
        f"# Cross-validation: {summary.get('name', '')} ({summary.get('model', '')})",
        "",
        f"{summary['n_folds']} folds, stratified by class; each image scored once by the model that "
        "did not train on it. Mean ± standard deviation over folds; 'pooled' = all out-of-fold "
        "predictions together. ECE with a temperature cross-fitted on the other folds.",
        "",
        to_markdown(overview),
        f"Per-class F1 (TTA {best}):",
        "",
        to_markdown(per_class),
        f"Pooled confusion matrix (TTA {best}; rows = true, columns = predicted):",
        "",
        confusion_table(classes, v["pooled"]["confusion_matrix"]),
    ]
    last = summary.get("last_checkpoint")
    if last:
        parts += [
            "Last epoch's weights (no epoch chosen on the scored fold; the best-epoch numbers "
            "above are slightly flattered by that choice):",
            "",
            to_markdown(
                [
                    {
                        "TTA": tta,
                        "accuracy": mean_std(lv["mean_std"]["accuracy"]),
                        "macro-F1": mean_std(lv["mean_std"]["macro_f1"]),
                        "pooled macro-F1": lv["pooled"]["macro_f1"],
                    }
                    for tta, lv in last.items()
                ]
            ),
        ]
    le = summary["last_epoch"]
    parts += [
        f"Last epoch validation macro-F1: saved weights {mean_std(le['val_macro_f1'])}, raw "
        f"weights {mean_std(le['val_macro_f1_raw_weights'])} (these differ only with "
        f"train.ema_decay). Best epochs: {summary['best_epochs']}. Training time per fold: "
        f"{mean_std(summary['train_seconds'], 0)} s.",
        "",
    ]
    return "\n".join(parts)

"""marrowscope.metrics: scores from labels and probabilities (numpy / scikit-learn, no torch)."""

from __future__ import annotations

from marrowscope.metrics.classification import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    focus_class_block,
    negative_log_likelihood,
    top_k_accuracy,
)

__all__ = [
    "bootstrap_ci",
    "classification_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "focus_class_block",
    "negative_log_likelihood",
    "top_k_accuracy",
]

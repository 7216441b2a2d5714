"""marrowscope.metrics: scores from labels and probabilities (numpy / scikit-learn, no torch).

The classification scores below are loaded on first use, so importing a light submodule such as
:mod:`marrowscope.metrics.counting` (whose defaults the command line reads at start-up) does not
load scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """Load a name of :mod:`marrowscope.metrics.classification` on first use (PEP 562)."""
    if name in __all__:
        from marrowscope.metrics import classification

        value = getattr(classification, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""The one path from a raw image to class probabilities (:class:`Predictor`), and batch I/O."""

from __future__ import annotations

from marrowscope.inference.batching import InputError, collect_image_paths
from marrowscope.inference.predictor import PathPrediction, Predictor, PredictorError

__all__ = ["InputError", "PathPrediction", "Predictor", "PredictorError", "collect_image_paths"]

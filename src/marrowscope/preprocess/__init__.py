"""Pure numpy/OpenCV preprocessing (the paper's resize -> denoise -> sharpen, after an optional
centre crop) and its disk cache.

No torch here (import-linter contract). :mod:`~marrowscope.preprocess.ops` holds the pure image
operations; :mod:`~marrowscope.preprocess.cache` computes them once per image and parameter set.
"""

from __future__ import annotations

from marrowscope.preprocess.ops import (
    PAPER_SHARPEN_KERNEL,
    PREPROCESS_VERSION,
    apply_preprocess,
    center_crop,
    denoise,
    params_key,
    preprocess_params,
    resize,
    sharpen,
)

__all__ = [
    "PAPER_SHARPEN_KERNEL",
    "PREPROCESS_VERSION",
    "apply_preprocess",
    "center_crop",
    "denoise",
    "params_key",
    "preprocess_params",
    "resize",
    "sharpen",
]

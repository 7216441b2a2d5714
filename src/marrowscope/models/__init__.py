"""marrowscope.models: model registry (the paper's 8 networks + any timm model), offline
pretrained weights, and the checkpoint bundle."""

from __future__ import annotations

from marrowscope.models.bundle import (
    BUNDLE_FORMAT,
    BundleError,
    BundleMetadata,
    load_bundle,
    read_metadata,
    save_bundle,
)
from marrowscope.models.registry import (
    ALIASES,
    PAPER_MODELS,
    Classifier,
    ModelError,
    build_model,
    resolve_timm_name,
)
from marrowscope.models.weights import OFFLINE_WEIGHTS, PretrainedWeightsError

__all__ = [
    "ALIASES",
    "BUNDLE_FORMAT",
    "OFFLINE_WEIGHTS",
    "PAPER_MODELS",
    "BundleError",
    "BundleMetadata",
    "Classifier",
    "ModelError",
    "PretrainedWeightsError",
    "build_model",
    "load_bundle",
    "read_metadata",
    "resolve_timm_name",
    "save_bundle",
]

"""marrowscope: deep-learning classification of single-cell bone-marrow cytology images."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]

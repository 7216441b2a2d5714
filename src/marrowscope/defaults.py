"""The shipped model used where none is named, in one place.

Import-free on purpose: the command line reads it when it starts (``--help`` stays instant), the
review app's settings and the Python API read it too, so the default cannot differ between them.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DETECTOR"]

DEFAULT_DETECTOR = "wbc2"
"""The white-cell detector of ``detect``, ``count --fields``, ``serve`` and
:meth:`marrowscope.inference.fields.FieldDetector.load`: ``wbc2``, trained with pasted touching
neighbours, which keeps overlapping cells apart far more often than ``wbc1`` and scores the same on
real blood fields (docs/fields.md)."""

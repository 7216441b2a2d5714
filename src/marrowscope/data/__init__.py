"""Data layer: scan folder-per-class trees, build/read/write manifests, split, bundled sample.

Submodules are imported explicitly (``marrowscope.data.scan`` ...); this package only defines
:class:`DataError`, so importing it stays cheap (the CLI imports it to recognise user errors).
"""

from __future__ import annotations


class DataError(ValueError):
    """The data cannot be used as given; the message names the file/class/value and the fix."""


__all__ = ["DataError"]

"""The real bone-marrow sample shipped inside the package, and ``builtin:`` data roots.

``builtin:bm-sample`` names :data:`SAMPLE_ROOT`: 8 classes x 24 unmodified Matek et al. (2021)
single-cell images (CC BY 4.0; attribution in ``sample_data/bm/README.md``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from marrowscope.data import DataError

BUILTIN_PREFIX = "builtin:"

SAMPLE_ROOT: Path = Path(str(files("marrowscope").joinpath("sample_data", "bm")))
"""Folder-per-class root of the bundled sample (ART BLA EOS LYT MON NGS NIF PMO)."""

BUILTIN_ROOTS: dict[str, Path] = {"bm-sample": SAMPLE_ROOT}
"""Names usable as ``builtin:<name>``."""


def resolve_root(root: str | Path) -> Path:
    """Turn a data root argument into a folder path.

    Args:
        root: ``builtin:bm-sample`` or a folder path (``~`` is expanded; existence is checked
            later by :func:`~marrowscope.data.scan.scan_folder`).

    Raises:
        DataError: an unknown ``builtin:`` name, or a builtin whose files are missing from this
            installation.
    """
    text = str(root)
    if not text.startswith(BUILTIN_PREFIX):
        return Path(text).expanduser()
    name = text[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_ROOTS:
        valid = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in BUILTIN_ROOTS)
        raise DataError(f"unknown built-in data set {text!r}; valid: {valid}")
    path = BUILTIN_ROOTS[name]
    if not path.is_dir():
        raise DataError(
            f"the built-in data set {text} is missing from this installation ({path}); "
            "reinstall marrowscope"
        )
    return path

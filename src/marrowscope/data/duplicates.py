"""Byte-identical image files in labelled data: label conflicts and repeated copies.

The same image file copied twice is a common accident in a user's own data. Filed under two
different classes it is a label conflict (the model is taught both answers): an error. Twice in
one class it can land in both the training and the validation split, and the validation score
then counts an image the model was trained on: training keeps the first copy (sorted path
order) and leaves the others out, with a warning.

Cheap, as duplicate finders such as fdupes and rmlint do it: files are grouped by size first (one
``stat`` each), files that share a size are grouped by a hash of their first
:data:`HEAD_BYTES`, and only files that still share a group are read whole and hashed (SHA-1 of
the bytes; nothing is decoded).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from marrowscope.data import DataError

if TYPE_CHECKING:
    from marrowscope.data.manifest import ManifestRow

__all__ = [
    "DuplicateGroup",
    "conflict_message",
    "drop_duplicates",
    "duplicates_warning",
    "find_duplicates",
]

SHOWN = 3
"""How many duplicate groups a message names before it gives only the count."""

HEAD_BYTES = 16384
"""How much of each same-size file is hashed first; two images of the same size nearly always
differ there already, so most files are never read whole."""


@dataclass(frozen=True)
class DuplicateGroup:
    """Two or more files with identical bytes.

    Attributes:
        paths: the files, sorted (the first is the copy that is kept).
        labels: the class of each file, in the order of :attr:`paths`.
    """

    paths: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def conflict(self) -> bool:
        """The copies are filed under different classes."""
        return len(set(self.labels)) > 1

    @property
    def extra(self) -> tuple[str, ...]:
        """The copies after the first (those left out of a class)."""
        return self.paths[1:]

    def describe(self) -> str:
        """``path (class A) = path (class B) ...`` in words."""
        return " = ".join(f"{p} (class {c})" for p, c in zip(self.paths, self.labels, strict=True))


def _digest(path: str, head: int | None = None) -> str | None:
    """SHA-1 of the file's bytes (of its first ``head`` bytes if given); ``None`` if unreadable."""
    try:
        with open(path, "rb") as f:
            if head is not None:
                return hashlib.sha1(f.read(head)).hexdigest()
            return hashlib.file_digest(f, "sha1").hexdigest()
    except OSError:  # missing or unreadable: reported where the image is loaded
        return None


def _same(paths: list[str], head: int | None) -> list[list[str]]:
    """``paths`` grouped by :func:`_digest`; only groups of two or more."""
    by_digest: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        digest = _digest(path, head)
        if digest is not None:
            by_digest[digest].append(path)
    return [group for group in by_digest.values() if len(group) > 1]


def find_duplicates(items: Iterable[tuple[str, str]]) -> list[DuplicateGroup]:
    """Groups of byte-identical files among ``(path, label)`` pairs.

    Files that cannot be read (missing, no permission) are left alone: whoever loads the images
    reports them. A path listed more than once counts once (its first label).

    Returns:
        The groups, each sorted by path, ordered by their first path.
    """
    labels: dict[str, str] = {}
    for path, label in items:
        labels.setdefault(str(path), label)
    by_size: dict[int, list[str]] = defaultdict(list)
    for path in labels:
        try:
            by_size[os.stat(path).st_size].append(path)
        except OSError:
            continue
    groups = []
    for size, paths in by_size.items():
        if len(paths) < 2 or size == 0:  # empty files are reported as unreadable elsewhere
            continue
        # a file no longer than the head is hashed whole in the first pass already
        candidates = _same(paths, HEAD_BYTES) if size > HEAD_BYTES else [paths]
        for candidate in candidates:
            for same in _same(candidate, None):
                ordered = tuple(sorted(same))
                groups.append(DuplicateGroup(ordered, tuple(labels[p] for p in ordered)))
    return sorted(groups, key=lambda g: g.paths)


def _first_few(groups: Sequence[DuplicateGroup]) -> str:
    shown = "; ".join(g.describe() for g in groups[:SHOWN])
    more = f"; and {len(groups) - SHOWN} more" if len(groups) > SHOWN else ""
    return shown + more


def conflict_message(groups: Sequence[DuplicateGroup], source: str) -> str:
    """The error for byte-identical files filed under different classes (``groups`` all
    conflicts), naming the first few and the count, and the fix."""
    return (
        f"{len(groups)} image(s) in {source} are filed under two different classes as "
        f"byte-identical copies (a label conflict): {_first_few(groups)}; remove one copy or "
        "correct its label (move the file to its right class folder, or fix its manifest row)"
    )


def drop_duplicates(
    rows: Sequence[ManifestRow], *, source: str
) -> tuple[list[ManifestRow], list[tuple[str, str]]]:
    """Refuse label conflicts; keep one copy of an image repeated within a class.

    Args:
        rows: the labelled images of a run (before or after the split).
        source: the data folder or manifest, for messages.

    Returns:
        The rows without the extra copies (input order kept), and ``(path, why)`` for each copy
        left out: it has the same bytes as the first copy (sorted path order) of its class.

    Raises:
        DataError: byte-identical files under different classes, naming the first few, the count
            and the fix.
    """
    groups = find_duplicates((r.path, r.label) for r in rows)
    conflicts = [g for g in groups if g.conflict]
    if conflicts:
        raise DataError(conflict_message(conflicts, source))
    left_out: dict[str, str] = {}
    for g in groups:
        for p in g.extra:
            left_out[p] = (
                f"identical bytes to {g.paths[0]} (class {g.labels[0]}); left out so the same "
                "image cannot be in both the training and the validation split"
            )
    if not left_out:
        return list(rows), []
    kept = [r for r in rows if r.path not in left_out]
    return kept, list(left_out.items())


def duplicates_warning(left_out: Sequence[tuple[str, str]], source: str) -> str:
    """The warning for copies left out of their class (names the first few and the count)."""
    names = ", ".join(p for p, _ in left_out[:SHOWN])
    more = f" and {len(left_out) - SHOWN} more" if len(left_out) > SHOWN else ""
    return (
        f"leaving out {len(left_out)} image(s) of {source} whose bytes are identical to another "
        f"image of the same class: {names}{more}; the first copy "
        "(sorted path order) is kept, so the same image cannot be in both the training and the "
        "validation split (delete the extra copies to silence this)"
    )

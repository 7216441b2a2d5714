"""Train/val/test splits: stratified per class, optionally grouped (patient/slide never split).

Image-level split (``grouped=False``): each class's images are sorted, shuffled with a generator
seeded by the seed and the class name, and cut by the fractions. The number of validation and
test images is ``round(n * fraction)`` (halves up) but at least 1 when the fraction is > 0, and
at least one image always trains.

Grouped split (``grouped=True``): every row needs a ``group``; a group goes entirely to one split.
Allocation is greedy and deterministic: groups are shuffled with the seed, then taken largest
first; each goes to the split that (1) still lacks the most of the group's classes (so every class
reaches every split as early as possible), then (2) has the largest remaining per-class deficit
relative to its target (``fraction * class size``), weighted by the group's class composition.
The result is checked: a class missing from a split with a non-zero fraction is an error.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from marrowscope.data import DataError
from marrowscope.data.manifest import SPLIT_NAMES, ManifestRow, class_rng

_FIX = (
    "drop the class (train, cv: --set data.classes=[...] without it; data manifest: --classes) "
    "or lower data.split.val/test (data manifest: --val/--test)"
)
"""The fix for a class too small for the split. Raising data.min_per_class is none: it only makes
the same class fail the minimum."""


def _check_fractions(val: float, test: float) -> None:
    for name, f in (("val", val), ("test", test)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"data.split.{name} must be in [0, 1), got {f}")
    if val + test >= 1.0:
        raise DataError(
            f"data.split.val + data.split.test = {val + test:g} leaves nothing to train on; "
            "keep their sum below 1"
        )


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_sizes(n: int, val: float, test: float) -> tuple[int, int, int]:
    """``(train, val, test)`` counts for ``n`` items (see the module docstring for the rule)."""
    n_val = max(1, _round_half_up(n * val)) if val > 0 else 0
    n_test = max(1, _round_half_up(n * test)) if test > 0 else 0
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    rows: Sequence[ManifestRow],
    *,
    val: float,
    test: float,
    seed: int,
    grouped: bool = False,
    lost: Callable[[str], str] | None = None,
) -> list[ManifestRow]:
    """Give every row a split (train/val/test), stratified by class.

    Rows that all have a split already are returned unchanged (a saved manifest is reused).

    Args:
        rows: manifest rows (no splits yet, or all with splits).
        val: fraction of each class (or of its groups' images) for validation.
        test: fraction for test.
        seed: makes the split reproducible.
        grouped: keep each ``group`` on one side (every row must have a group).
        lost: ``class name -> words`` on that class's images that are not among ``rows``
            (unreadable, missing), e.g. ``"3 more of its files are missing"``, or ``""``; added
            to the message when the class is too small for the split.

    Returns:
        The rows in input order with ``split`` set.

    Raises:
        DataError: some but not all rows have a split, fractions out of range, rows without a
            group when ``grouped``, or a class too small to reach every non-empty split.
    """
    rows = list(rows)
    if not rows:
        raise DataError("there are no images to split; check data.root / data.manifest")
    have = [r for r in rows if r.split is not None]
    if have:
        if len(have) < len(rows):
            first = next(r for r in rows if r.split is None)
            raise DataError(
                f"{len(have)} of {len(rows)} manifest rows have a split but {first.path} has none; "
                "fill in the split column for every row, or clear it everywhere to split anew"
            )
        bad = next((r for r in rows if r.split not in SPLIT_NAMES), None)
        if bad is not None:
            raise DataError(
                f"manifest row {bad.path} has split {bad.split!r}; use train, val or test"
            )
        return rows
    _check_fractions(val, test)
    why = lost or (lambda _label: "")
    if grouped:
        return _grouped(rows, val, test, seed, why)
    return _stratified(rows, val, test, seed, why)


def _lost(why: Callable[[str], str], label: str) -> str:
    words = why(label)
    return f" ({words})" if words else ""


def _by_class(rows: list[ManifestRow]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        out[r.label].append(i)
    return out


def _needed(val: float, test: float) -> int:
    return 1 + (val > 0) + (test > 0)


def _stratified(
    rows: list[ManifestRow], val: float, test: float, seed: int, why: Callable[[str], str]
) -> list[ManifestRow]:
    splits: list[str | None] = [None] * len(rows)
    for label, idx in _by_class(rows).items():
        n = len(idx)
        n_train, n_val, n_test = split_sizes(n, val, test)
        if n_train < 1:
            raise DataError(
                f"class {label} has only {n} image(s){_lost(why, label)}: too few for a "
                f"train/val/test split (needs at least {_needed(val, test)}); {_FIX}"
            )
        order = sorted(idx, key=lambda i: rows[i].path)
        perm = class_rng(seed, label).permutation(n)
        shuffled = [order[j] for j in perm]
        for k, i in enumerate(shuffled):
            splits[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return [replace(r, split=s) for r, s in zip(rows, splits, strict=True)]


def _grouped(
    rows: list[ManifestRow], val: float, test: float, seed: int, why: Callable[[str], str]
) -> list[ManifestRow]:
    missing = next((r for r in rows if r.group is None), None)
    if missing is not None:
        raise DataError(
            f"manifest row {missing.path} has no group; a grouped split needs a group (patient or "
            "slide id) on every row: fill in the column, or unset data.split.group_column"
        )
    labels = sorted({r.label for r in rows})
    li = {c: k for k, c in enumerate(labels)}
    groups = sorted({r.group for r in rows if r.group is not None})
    gi = {g: k for k, g in enumerate(groups)}
    comp = np.zeros((len(groups), len(labels)), dtype=np.int64)  # images per group and class
    for r in rows:
        comp[gi[r.group], li[r.label]] += 1  # type: ignore[index]
    class_total = comp.sum(axis=0)
    groups_per_class = (comp > 0).sum(axis=0)

    fractions = np.array([1.0 - val - test, val, test])
    active = fractions > 0
    need = int(active.sum())
    for c, label in enumerate(labels):
        if groups_per_class[c] < need:
            raise DataError(
                f"class {label} has images from only {groups_per_class[c]} group(s) "
                f"({class_total[c]} image(s)){_lost(why, label)}: too few for a grouped "
                f"train/val/test split (needs at least {need} groups); {_FIX}"
            )

    target = fractions[:, None] * class_total[None, :].astype(np.float64)  # split x class
    current = np.zeros_like(target)
    rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(b"grouped-split")])
    order = rng.permutation(len(groups))
    sizes = comp.sum(axis=1)
    order = sorted(order.tolist(), key=lambda g: -sizes[g])  # stable: ties keep the shuffle
    assignment = np.empty(len(groups), dtype=np.int64)
    norm = np.maximum(class_total, 1).astype(np.float64)
    for g in order:
        present = comp[g] > 0
        best, best_score = -1, (-math.inf, -math.inf)
        for s in range(3):
            if not active[s]:
                continue
            uncovered = int(np.sum(present & (current[s] == 0)))
            deficit = float(np.sum(comp[g] * (target[s] - current[s]) / norm))
            score = (uncovered, deficit)
            if score > best_score:
                best, best_score = s, score
        assignment[g] = best
        current[best] += comp[g]

    for c, label in enumerate(labels):
        for s in range(3):
            if active[s] and current[s, c] == 0:
                raise DataError(
                    f"class {label} ({groups_per_class[c]} groups, {class_total[c]} images) ended "
                    f"up with no image in the {SPLIT_NAMES[s]} split: its groups are too few or "
                    f"too unequal for a grouped split; {_FIX}, or change the seed"
                )
    return [replace(r, split=SPLIT_NAMES[assignment[gi[r.group]]]) for r in rows]  # type: ignore[index]


def assign_folds(
    rows: Sequence[ManifestRow], *, folds: int, seed: int, grouped: bool = False
) -> list[int]:
    """A cross-validation fold (0..folds-1) for every row, stratified by class.

    Image-level: each class's images are sorted by path, shuffled with the class's seeded
    generator (as :func:`assign_splits`) and dealt to the folds in turn, so every fold holds
    ``n // folds`` or ``n // folds + 1`` images of every class. Grouped: every row needs a
    ``group``; groups (shuffled with the seed, then largest first) go to the fold with the
    fewest images so far, so no group is in two folds.

    Raises:
        DataError: fewer than 2 folds, a class with fewer images (or groups) than folds, or a
            row without a group when ``grouped``.
    """
    rows = list(rows)
    if folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {folds}")
    out = [-1] * len(rows)
    if grouped:
        missing = next((r for r in rows if r.group is None), None)
        if missing is not None:
            raise DataError(
                f"manifest row {missing.path} has no group; grouped cross-validation needs a group "
                "on every row: fill in the column, or unset data.split.group_column"
            )
        members: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            members[str(r.group)].append(i)
        names = sorted(members)
        rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(b"grouped-folds")])
        order = [names[j] for j in rng.permutation(len(names))]
        order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the shuffle
        sizes = [0] * folds
        for g in order:
            f = int(np.argmin(sizes))
            sizes[f] += len(members[g])
            for i in members[g]:
                out[i] = f
    else:
        for _label, idx in _by_class(rows).items():
            order_ = sorted(idx, key=lambda i: rows[i].path)
            perm = class_rng(seed, _label).permutation(len(order_))
            for k, j in enumerate(perm):
                out[order_[j]] = k % folds
    for label, idx in _by_class(rows).items():
        present = {out[i] for i in idx}
        if len(present) < folds:
            raise DataError(
                f"class {label} has {len(idx)} image(s) in {len(present)} of {folds} folds: every "
                f"class needs images in every fold; use fewer folds or drop the class"
            )
    return out

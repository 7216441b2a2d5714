"""A config's split manifest, and the training/validation split a checkpoint bundle was made from.

:func:`manifest_rows` turns an experiment config into its split manifest (read from
``data.manifest`` or built by scanning ``data.root``; deterministic given the seed), as training
does. :func:`recorded_split` finds the split of a trained bundle, for the int8 export's
calibration (training images) and accuracy guard (validation images):

1. ``RUN_DIR/split.csv``, which training writes next to ``RUN_DIR/best`` and ``RUN_DIR/last``;
2. else the split re-derived from the resolved config stored in the bundle (``config.data``:
   root or manifest, classes, caps, split fractions, seed), checked against the per-class counts
   the bundle recorded at training time (``train_counts``, ``metrics.val_per_class``), so a data
   folder that changed since training is refused instead of silently mixing training images
   into the validation set. The shipped models take this path (they record no ``split.csv``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marrowscope.config import ConfigError, ExperimentConfig, from_dict
from marrowscope.data import DataError
from marrowscope.data.duplicates import drop_duplicates, duplicates_warning
from marrowscope.data.manifest import (
    ManifestRow,
    build_manifest,
    class_rng,
    limit_rows,
    read_manifest,
    require_utf8_paths,
)
from marrowscope.data.sample import resolve_root
from marrowscope.data.scan import ScanResult, scan_folder
from marrowscope.data.split import assign_splits
from marrowscope.metadata import BundleMetadata

__all__ = [
    "SPLIT_FILE",
    "ManifestRows",
    "RecordedSplit",
    "manifest_rows",
    "recorded_split",
    "stratified_subset",
]

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
"""The split manifest training writes into the run folder (the bundle's parent folder)."""

_FIX = "pass labelled cells explicitly (--calibrate DIR for calibration, --guard-data DIR for the guard)"


class ManifestRows(list[ManifestRow]):
    """A run's split manifest rows, plus the images left out of it before the split.

    Attributes:
        left_out: ``(path, why)`` of each image left out (a byte-identical copy of another image
            of its class); loading the images adds them to the skipped images that training
            records in the run folder (``skipped.csv``).
        left_out_rows: the manifest rows of those images where known (with the split a manifest
            gave them), so an error about a split left empty can say it was the copies.
    """

    def __init__(
        self,
        rows: Iterable[ManifestRow] = (),
        left_out: Iterable[tuple[str, str]] = (),
        left_out_rows: Iterable[ManifestRow] = (),
    ) -> None:
        super().__init__(rows)
        self.left_out: list[tuple[str, str]] = list(left_out)
        self.left_out_rows: list[ManifestRow] = list(left_out_rows)


def manifest_rows(cfg: ExperimentConfig, *, progress: bool = True) -> ManifestRows:
    """The split manifest for ``cfg``: read from ``data.manifest`` or built by scanning ``data.root``.

    A manifest gets the same subset rules as a folder: ``data.classes``, and ``data.max_per_class``
    / ``data.min_per_class`` (:func:`~marrowscope.data.manifest.limit_rows`: the same seeded
    per-class cap draw as a folder's; a manifest that records a split is never thinned, a cap
    that would drop its rows is refused). File names that are not valid UTF-8 are refused here,
    before any image is preprocessed. A manifest whose rows carry groups (a ``group`` column)
    while ``data.split.group_column`` is unset is split by image, with a warning that names the
    setting (so a recorded or re-derived split keeps its meaning).

    Byte-identical image files (:mod:`~marrowscope.data.duplicates`) among the chosen rows are
    checked before the split: copies under two different classes are an error; extra copies in
    one class are left out with a warning (the first in sorted path order is kept) and listed
    in :attr:`ManifestRows.left_out`, so no image is on both sides of the split.

    Raises:
        DataError: no data named, a class or file problem, or byte-identical files under
            different classes (the message names them and the fix).
    """
    d = cfg.data
    lost: Callable[[str], str]
    if d.manifest:
        rows = read_manifest(Path(d.manifest), group_column=d.split.group_column)
        if d.classes:
            wanted = set(d.classes)
            missing = [c for c in d.classes if c not in {r.label for r in rows}]
            if missing:
                raise DataError(
                    f"class {missing[0]} is in data.classes but not in manifest {d.manifest}; "
                    "remove it from data.classes"
                )
            rows = [r for r in rows if r.label in wanted]
            order = {c: i for i, c in enumerate(d.classes)}
            rows.sort(key=lambda r: (order[r.label], r.path))
        rows = limit_rows(
            rows,
            max_per_class=d.max_per_class,
            min_per_class=d.min_per_class,
            seed=cfg.seed,
            source=d.manifest,
        )
        source = f"manifest {d.manifest}"
        lost = _missing_files(rows, d.manifest)
    elif d.root:
        scan = scan_folder(resolve_root(d.root), check_images=False, progress=progress)
        rows = build_manifest(
            scan,
            classes=d.classes,
            max_per_class=d.max_per_class,
            min_per_class=d.min_per_class,
            seed=cfg.seed,
        )
        source = str(scan.root)
        lost = _unreadable_files(scan)
    else:
        raise DataError(
            "the config names no data: set data.root (a folder per class) or data.manifest"
        )
    require_utf8_paths(r.path for r in rows)
    row_of = {r.path: r for r in rows}
    rows, left_out = drop_duplicates(rows, source=source)
    if left_out:
        log.warning("%s", duplicates_warning(left_out, source))
        copied = [row_of[p].label for p, _ in left_out]
        _check_minimum(rows, copied, d.min_per_class)
        lost = _with_left_out(lost, copied)
    if all(r.split is not None for r in rows):
        return ManifestRows(rows, left_out, [row_of[p] for p, _ in left_out])
    grouped = d.split.group_column is not None
    if not grouped and any(r.group is not None for r in rows):
        n_groups = len({r.group for r in rows if r.group is not None})
        log.warning(
            "manifest %s has a 'group' column (%d groups) but data.split.group_column is not set, "
            "so the split is by image and one group's (patient's, slide's) images can land in "
            "train, val and test; to keep each group on one side set "
            "--set data.split.group_column=group (data manifest: --group-column group)",
            d.manifest,
            n_groups,
        )
    split = assign_splits(
        rows, val=d.split.val, test=d.split.test, seed=cfg.seed, grouped=grouped, lost=lost
    )
    return ManifestRows(split, left_out)


def _check_minimum(rows: list[ManifestRow], left_out: list[str], minimum: int) -> None:
    """``data.min_per_class`` again once identical copies are left out (``left_out``: their
    labels): the minimum counts distinct images."""
    counts = Counter(r.label for r in rows)
    for label in sorted(set(left_out)):
        n = counts[label]
        if n < minimum:
            copies = left_out.count(label)
            raise DataError(
                f"class {label} has only {n} distinct image(s) once {copies} identical "
                f"cop{'y' if copies == 1 else 'ies'} of its images are left out, fewer than "
                f"min_per_class={minimum}; add images of it, lower the minimum (train, cv: --set "
                f"data.min_per_class={n}), or drop the class (--set data.classes=[...])"
            )


def _with_left_out(lost: Callable[[str], str], left_out: list[str]) -> Callable[[str], str]:
    """``lost`` plus the class's identical copies left out (``left_out``: their labels), for
    split errors."""

    def words(label: str) -> str:
        n = left_out.count(label)
        extra = f"{n} identical cop{'y' if n == 1 else 'ies'} of its images left out" if n else ""
        return "; ".join(w for w in (lost(label), extra) if w)

    return words


def _class_of(scan: ScanResult, path: Path) -> str | None:
    try:
        return path.relative_to(scan.root).parts[0]
    except ValueError:  # pragma: no cover - scanned files always lie below root
        return None


def _unreadable_files(scan: ScanResult) -> Callable[[str], str]:
    """``class -> words`` on the class's files the scan found unusable (for split errors)."""

    def words(label: str) -> str:
        n = sum(1 for p, _ in scan.unreadable if _class_of(scan, p) == label)
        return f"{n} more of its files in {scan.root / label} are unreadable" if n else ""

    return words


def _missing_files(rows: list[ManifestRow], manifest: str) -> Callable[[str], str]:
    """``class -> words`` on the class's manifest files that do not exist (for split errors;
    checked only when such an error is raised, not for every row)."""

    def words(label: str) -> str:
        paths = [r.path for r in rows if r.label == label]
        n = sum(1 for p in paths if not os.path.isfile(p))
        return (
            f"{n} of its {len(paths)} files listed in manifest {manifest} are missing" if n else ""
        )

    return words


@dataclass(frozen=True)
class RecordedSplit:
    """The images a bundle was trained and validated on.

    Attributes:
        rows: manifest rows (absolute path, label, split) of the bundle's classes.
        source: where the split came from, in words (a file, or the re-derived config data).
    """

    rows: list[ManifestRow]
    source: str

    def split(self, name: str) -> list[ManifestRow]:
        """The rows of one split (``train``, ``val`` or ``test``)."""
        return [r for r in self.rows if r.split == name]


def _expected_counts(meta: BundleMetadata) -> dict[str, dict[str, int]]:
    """Per-class image counts the bundle recorded at training time, per split."""
    out: dict[str, dict[str, int]] = {}
    if meta.train_counts:
        out["train"] = {str(k): int(v) for k, v in meta.train_counts.items()}
    per_class: Any = (meta.metrics or {}).get("val_per_class")
    if isinstance(per_class, dict):
        val = {
            str(c): int(v["support"])
            for c, v in per_class.items()
            if isinstance(v, dict) and isinstance(v.get("support"), int)
        }
        if val:
            out["val"] = val
    return out


def _check_counts(
    rows: list[ManifestRow], meta: BundleMetadata, where: str, copies: int = 0
) -> None:
    """Refuse a re-derived split whose per-class counts differ from the recorded ones;
    ``copies``: identical copies the re-derivation left out (a bundle of a marrowscope from
    before 2026-11-30 was trained with them in its split)."""
    for split, want in _expected_counts(meta).items():
        got = Counter(r.label for r in rows if r.split == split)
        diff = {c: (got.get(c, 0), n) for c, n in want.items() if got.get(c, 0) != n}
        if diff:
            detail = ", ".join(f"{c} {g} (recorded {n})" for c, (g, n) in sorted(diff.items()))
            why = (
                f"the data changed since training, or the bundle is from a marrowscope before "
                f"2026-11-30, which kept the {copies} identical cop{'y' if copies == 1 else 'ies'} "
                "that are now left out before the split"
                if copies
                else "the data changed since training"
            )
            raise DataError(
                f"the {split} split re-derived from {where} differs from what the bundle recorded "
                f"at training time: {detail}; {why}, so its validation images may have been "
                f"trained on; {_FIX}"
            )


def recorded_split(bundle_dir: Path | None, meta: BundleMetadata) -> RecordedSplit:
    """The training/validation split of a bundle (see the module docstring for the order).

    Args:
        bundle_dir: the bundle folder (``None``: a model without one; only the config is used).
        meta: the bundle's metadata.

    Raises:
        DataError: no split can be found, its data folder is missing, or the re-derived split
            does not match the counts recorded at training time; the message names the files and
            the fix (pass ``--calibrate`` / ``--guard-data``).
    """
    classes = set(meta.classes)
    if bundle_dir is not None:
        split_csv = Path(bundle_dir).parent / SPLIT_FILE
        if split_csv.is_file():
            cfg_split = ((meta.config or {}).get("data") or {}).get("split") or {}
            rows = read_manifest(split_csv, group_column=cfg_split.get("group_column"))
            rows = [r for r in rows if r.label in classes]
            return RecordedSplit(rows=rows, source=str(split_csv))
    data = (meta.config or {}).get("data") or {}
    if not (data.get("root") or data.get("manifest")):
        raise DataError(
            f"{bundle_dir or 'the model'} records no training split (no {SPLIT_FILE} next to it, "
            f"no data.root or data.manifest in its config); {_FIX}"
        )
    try:
        cfg = from_dict(dict(meta.config or {}))
    except ConfigError as e:
        raise DataError(f"the config stored in {bundle_dir} cannot be read ({e}); {_FIX}") from None
    where = (
        f"data.manifest {cfg.data.manifest}" if cfg.data.manifest else f"data.root {cfg.data.root}"
    )
    target = cfg.data.manifest or cfg.data.root
    if target and not str(target).startswith("builtin:") and not Path(target).expanduser().exists():
        raise DataError(
            f"the bundle was trained on {where}, which does not exist here (relative paths are "
            f"taken from the current folder, {Path.cwd()}); run from the folder training ran in, "
            f"or {_FIX}"
        )
    derived = manifest_rows(cfg, progress=False)
    rows = [r for r in derived if r.label in classes]
    _check_counts(rows, meta, where, copies=len(derived.left_out))
    seed = cfg.seed
    return RecordedSplit(
        rows=rows,
        source=f"{where}, split re-derived from the bundle's config (seed {seed}, val "
        f"{cfg.data.split.val:g}) and checked against the counts recorded at training time",
    )


def stratified_subset(rows: list[ManifestRow], n: int, *, seed: int = 0) -> list[ManifestRow]:
    """At most ``n`` rows, each class represented in proportion to its size (at least one image
    per class while ``n`` allows), drawn with a per-class seeded generator; input order kept.

    Proportional allocation by largest remainder: class ``c`` with ``n_c`` of ``N`` rows gets
    ``floor(n * n_c / N)`` rows, and the classes with the largest fractional parts get one more
    until ``n`` are taken.
    """
    if n >= len(rows):
        return list(rows)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r.label, []).append(i)
    total = len(rows)
    exact = {c: n * len(idx) / total for c, idx in by_class.items()}
    quota = {c: max(1 if n >= len(by_class) else 0, int(q)) for c, q in exact.items()}
    rest = sorted(by_class, key=lambda c: (-(exact[c] - int(exact[c])), c))
    i = 0
    while sum(quota.values()) < n and rest:
        c = rest[i % len(rest)]
        if quota[c] < len(by_class[c]):
            quota[c] += 1
        i += 1
    while sum(quota.values()) > n:  # the at-least-one rule overshot: trim the largest
        c = max(quota, key=lambda k: (quota[k], k))
        quota[c] -= 1
    keep: list[int] = []
    for c, idx in by_class.items():
        pick = class_rng(seed, c).permutation(len(idx))[: quota[c]]
        keep.extend(idx[j] for j in pick)
    return [rows[i] for i in sorted(keep)]

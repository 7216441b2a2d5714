"""From a config to split, preprocessed, in-memory data: scan -> subset -> split -> cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marrowscope.config import ExperimentConfig
from marrowscope.data import DataError
from marrowscope.data.manifest import (
    ManifestRow,
    build_manifest,
    class_names,
    read_manifest,
    write_manifest,
)
from marrowscope.data.sample import resolve_root
from marrowscope.data.scan import scan_folder
from marrowscope.data.split import assign_splits
from marrowscope.preprocess.cache import PreprocessCache

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """Preprocessed images of one split, with labels and source paths."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class PreparedData:
    """Everything a training run needs from the data side."""

    classes: list[str]
    rows: list[ManifestRow]
    splits: dict[str, SplitData]
    skipped: list[tuple[str, str]]

    def class_counts(self, split: str) -> np.ndarray:
        """Images per class in ``split`` (index order of :attr:`classes`)."""
        return np.bincount(
            np.asarray(self.splits[split].labels, dtype=np.int64), minlength=len(self.classes)
        )


def manifest_rows(cfg: ExperimentConfig, *, progress: bool = True) -> list[ManifestRow]:
    """The split manifest for ``cfg``: read from ``data.manifest`` or built by scanning ``data.root``."""
    d = cfg.data
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
    elif d.root:
        scan = scan_folder(resolve_root(d.root), check_images=False, progress=progress)
        rows = build_manifest(
            scan,
            classes=d.classes,
            max_per_class=d.max_per_class,
            min_per_class=d.min_per_class,
            seed=cfg.seed,
        )
    else:
        raise DataError(
            "the config names no data: set data.root (a folder per class) or data.manifest"
        )
    if all(r.split is not None for r in rows):
        return rows
    return assign_splits(
        rows,
        val=d.split.val,
        test=d.split.test,
        seed=cfg.seed,
        grouped=d.split.group_column is not None,
    )


def class_order(cfg: ExperimentConfig, rows: list[ManifestRow]) -> list[str]:
    """Class names in model index order: ``data.classes`` if given, else first appearance."""
    return list(cfg.data.classes) if cfg.data.classes else class_names(rows)


def load_split_images(
    rows: list[ManifestRow],
    classes: list[str],
    cfg: ExperimentConfig,
    *,
    progress: bool = True,
) -> PreparedData:
    """Preprocess (through the on-disk cache) every image of ``rows`` and group them by split.

    Unreadable images are skipped with a warning and reported in :attr:`PreparedData.skipped`.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in rows} - set(index))
    if unknown:
        raise DataError(f"manifest label {unknown[0]!r} is not among the classes {classes}")
    cache = PreprocessCache(cfg.preprocess)
    arrays, failures = cache.load_many(
        [r.path for r in rows], workers=cfg.preprocess.workers, progress=progress
    )
    for path, msg in failures:
        log.warning("skipping unreadable image %s", msg if path in msg else f"{path}: {msg}")
    splits = {s: SplitData() for s in SPLITS}
    for row, arr in zip(rows, arrays, strict=True):
        if arr is None:
            continue
        if row.split not in splits:
            raise DataError(
                f"manifest row {row.path} has split {row.split!r}; use train, val or test"
            )
        s = splits[row.split]
        s.images.append(arr)
        s.labels.append(index[row.label])
        s.paths.append(row.path)
    for name in ("train", "val"):
        counts = np.bincount(
            np.asarray(splits[name].labels, dtype=np.int64), minlength=len(classes)
        )
        empty = [classes[i] for i, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(
                f"class {empty[0]} has no usable image in the {name} split; add images, drop the "
                "class from data.classes, or raise data.min_per_class"
            )
    return PreparedData(classes=classes, rows=rows, splits=splits, skipped=list(failures))


def prepare_data(
    cfg: ExperimentConfig,
    *,
    rows: list[ManifestRow] | None = None,
    progress: bool = True,
) -> PreparedData:
    """Resolve, split and preprocess the data of ``cfg`` (or of given split ``rows``)."""
    if rows is None:
        rows = manifest_rows(cfg, progress=progress)
    classes = class_order(cfg, rows)
    return load_split_images(rows, classes, cfg, progress=progress)


def save_split(data: PreparedData, path: Path) -> None:
    """Write the split manifest (reusable with ``data.manifest=PATH``)."""
    write_manifest(data.rows, path)

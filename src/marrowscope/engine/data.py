"""From a config to split, preprocessed, in-memory data: scan -> subset -> split -> cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from marrowscope.config import ExperimentConfig
from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow, class_names, write_manifest
from marrowscope.data.recorded import ManifestRows, manifest_rows
from marrowscope.preprocess.cache import PreprocessCache, resolve_workers

if TYPE_CHECKING:
    from marrowscope.engine.distributed import DistContext

__all__ = [
    "SPLITS",
    "PreparedData",
    "SplitData",
    "class_order",
    "load_split_images",
    "manifest_rows",
    "prepare_data",
    "save_split",
]

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


def class_order(cfg: ExperimentConfig, rows: list[ManifestRow]) -> list[str]:
    """Class names in model index order: ``data.classes`` if given, else first appearance."""
    return list(cfg.data.classes) if cfg.data.classes else class_names(rows)


def _fill_cache_share(
    cache: PreprocessCache, paths: list[str], cfg: ExperimentConfig, ctx: DistContext
) -> None:
    """Several processes on one machine: each preprocesses its share of ``paths`` into the cache
    (with its share of the worker processes), then all wait for each other; the full load that
    follows finds every image cached instead of computing each one once per process."""
    workers = max(1, resolve_workers(cfg.preprocess.workers) // ctx.local_world_size)
    cache.load_many(
        paths[ctx.local_rank :: ctx.local_world_size],
        workers=workers,
        progress=False,
    )
    ctx.barrier()


def load_split_images(
    rows: list[ManifestRow],
    classes: list[str],
    cfg: ExperimentConfig,
    *,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> PreparedData:
    """Preprocess (through the on-disk cache) every image of ``rows`` and group them by split.

    Unreadable images are skipped with a warning and reported in :attr:`PreparedData.skipped`,
    after the images :func:`manifest_rows` left out before the split (byte-identical copies
    within a class, :attr:`~marrowscope.data.recorded.ManifestRows.left_out`).
    Under torchrun (``ctx``) the processes of a machine share the preprocessing work, and each
    then holds every image in memory.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in rows} - set(index))
    if unknown:
        raise DataError(f"manifest label {unknown[0]!r} is not among the classes {classes}")
    cache = PreprocessCache(cfg.preprocess)
    paths = [r.path for r in rows]
    if ctx is not None and ctx.distributed:
        _fill_cache_share(cache, paths, cfg, ctx)
    arrays, failures = cache.load_many(paths, workers=cfg.preprocess.workers, progress=progress)
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
        if name == "val" and not splits[name].labels and cfg.data.split.val == 0:
            continue  # asked for: a final fit on every image (data.split.val=0)
        counts = np.bincount(
            np.asarray(splits[name].labels, dtype=np.int64), minlength=len(classes)
        )
        empty = [classes[i] for i, n in enumerate(counts) if n == 0]
        if empty:
            copies = rows.left_out_rows if isinstance(rows, ManifestRows) else []
            raise DataError(_empty_split_message(empty[0], name, rows, failures, copies))
    left_out = rows.left_out if isinstance(rows, ManifestRows) else []
    return PreparedData(classes=classes, rows=rows, splits=splits, skipped=[*left_out, *failures])


def _empty_split_message(
    label: str,
    split: str,
    rows: list[ManifestRow],
    failures: list[tuple[str, str]],
    copies: Sequence[ManifestRow] = (),
) -> str:
    """Why class ``label`` has no image in ``split``, and the fix (never "raise
    data.min_per_class": that only makes the class fail the minimum). ``copies``: rows left out
    as identical copies of images in another split."""
    failed = {p for p, _ in failures}
    listed = [r.path for r in rows if r.label == label and r.split == split]
    bad = sum(1 for p in listed if p in failed)
    missing = sum(1 for p in listed if p in failed and not os.path.exists(p))
    copied = [r.path for r in copies if r.label == label and r.split == split]
    if copied and not listed:
        shown = ", ".join(copied[:3]) + (f" and {len(copied) - 3} more" if len(copied) > 3 else "")
        why = (
            f" (the manifest's {split} image(s) of it, {shown}, have the same bytes as images "
            "of it in another split and were left out, so that no image is on both sides)"
        )
        fix = f"assign other images of it to {split}, "
    elif bad:
        parts = [f"{missing} missing"] if missing else []
        parts += [f"{bad - missing} unreadable"] if bad > missing else []
        why = (
            f" (its {len(listed)} {split} image(s): {' and '.join(parts)}, see the warnings above)"
        )
        fix = "replace or restore those files, add images, "
    else:
        why = " (no image of it is assigned to that split)"
        fix = "add images of it to that split, "
    lower = ", or lower data.split.val/test" if split == "train" else ""
    return (
        f"class {label} has no usable image in the {split} split{why}; {fix}or drop the class "
        f"(--set data.classes=[...] without it){lower}"
    )


def prepare_data(
    cfg: ExperimentConfig,
    *,
    rows: list[ManifestRow] | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> PreparedData:
    """Resolve, split and preprocess the data of ``cfg`` (or of given split ``rows``); ``ctx``:
    see :func:`load_split_images`."""
    if rows is None:
        rows = manifest_rows(cfg, progress=progress)
    classes = class_order(cfg, rows)
    return load_split_images(rows, classes, cfg, progress=progress, ctx=ctx)


def save_split(data: PreparedData, path: Path) -> None:
    """Write the split manifest (reusable with ``data.manifest=PATH``)."""
    write_manifest(data.rows, path)

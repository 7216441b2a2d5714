"""Evaluation of a checkpoint bundle on labelled images: metrics, CIs, confusion matrix, reports."""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from marrowscope.config import ConfigError
from marrowscope.data import DataError
from marrowscope.data.duplicates import DuplicateGroup, find_duplicates
from marrowscope.data.manifest import ManifestRow, read_manifest
from marrowscope.data.sample import resolve_root
from marrowscope.data.scan import scan_folder
from marrowscope.inference.predictor import Predictor
from marrowscope.metadata import TTA_MODES
from marrowscope.metrics.classification import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    focus_class_block,
)
from marrowscope.models.bundle import read_metadata
from marrowscope.preprocess.cache import PreprocessCache
from marrowscope.preprocess.ops import config_from_params
from marrowscope.reports.markdown import evaluation_report
from marrowscope.reports.plots import plot_confusion_matrix
from marrowscope.utils.io import atomic_write_json, atomic_write_text, printable

log = logging.getLogger(__name__)

DEFAULT_FOCUS = "HAC"


def score(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    focus: str | None = DEFAULT_FOCUS,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of an evaluation: metrics, 95% bootstrap CIs, calibration, focus-class block."""
    pred = probs.argmax(1)
    m = classification_metrics(labels, pred, list(classes))
    m["ci95"] = bootstrap_ci(labels, pred, len(classes), n_boot=n_boot, seed=seed)
    m["ece"] = expected_calibration_error(probs, labels)
    if focus:
        block = focus_class_block(m, focus)
        m["focus"] = block if block is not None else {"class": focus, "absent": True}
    return m


def write_evaluation(
    out_dir: Path,
    metrics: dict[str, Any],
    *,
    probs: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str],
    classes: Sequence[str],
    title: str,
    extra: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Write metrics.json, report.md, confusion_matrix.{png,csv} and predictions.csv
    (``notes``: paragraphs of the report under the facts, e.g. what was left out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics, escape=True)
    cm = np.asarray(metrics["confusion_matrix"])
    plot_confusion_matrix(cm, list(classes), out_dir / "confusion_matrix.png", title=title)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for c, row in zip(classes, cm.tolist(), strict=True):
        w.writerow([c, *row])
    atomic_write_text(out_dir / "confusion_matrix.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "predicted", "confidence", *[f"p_{c}" for c in classes]])
    for p, y, pr in zip(paths, labels.tolist(), probs, strict=True):
        k = int(pr.argmax())
        w.writerow([p, classes[y], classes[k], f"{pr[k]:.4f}", *[f"{v:.4f}" for v in pr]])
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue(), escape=True)
    focus = metrics.get("focus")
    atomic_write_text(
        out_dir / "report.md",
        escape=True,
        text=evaluation_report(
            metrics,
            title=title,
            ci=metrics.get("ci95"),
            focus=None if not focus or focus.get("absent") else focus,
            extra=extra,
            notes=notes,
        ),
    )


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """``["SRC=DST", ...]`` -> mapping; a malformed item is a clear error."""
    out = {}
    for it in items:
        if "=" not in it:
            raise DataError(f"class mapping {it!r} must look like SRC=DST (e.g. --map NEUTRO=NGS)")
        a, b = (s.strip() for s in it.split("=", 1))
        out[a] = b
    return out


def labelled_rows(source: Path, split: str | None = None) -> list[ManifestRow]:
    """Labelled images of a folder per class, or of a manifest CSV (its ``split`` rows; by
    default the ``test`` rows when the manifest has splits)."""
    return _labelled(source, split)[0]


MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
"""A data source with one of these suffixes is meant as a manifest file, not a folder."""

IGNORED_LISTED = 50
"""At most this many ignored files are listed in ``metrics.json`` (their number is recorded)."""


def _labelled(source: Path, split: str | None) -> tuple[list[ManifestRow], list[Path], list[Path]]:
    """:func:`labelled_rows`, and the files of a folder source that were left out: those
    directly in the data folder (in no class folder, so of no class, images or not), and those
    in class folders that are not images by extension."""
    suffix = source.suffix.lower()
    if suffix in MANIFEST_SUFFIXES and not source.exists():
        raise DataError(
            f"no such manifest file {source}; check the path (a manifest is a CSV with columns "
            "path,label and optionally split), or pass a folder with one sub-folder per class"
        )
    if suffix in MANIFEST_SUFFIXES[1:] and source.is_file():
        raise DataError(
            f"{source}: evaluate reads a manifest CSV (columns path,label[,split]), not Parquet; "
            "save it as CSV"
        )
    if source.is_file() and suffix == ".csv":
        rows = read_manifest(source)
        splits = sorted({r.split for r in rows if r.split})
        if split and not splits:
            raise DataError(
                f"manifest {source} has no split column (no row has a split), so --split "
                f"{split} selects nothing; leave out --split to evaluate all its rows"
            )
        chosen = split or ("test" if splits else None)
        if chosen:
            rows = [r for r in rows if r.split == chosen]
            if not rows:
                raise DataError(
                    f"manifest {source} has no row in split {chosen!r} (its splits: "
                    f"{', '.join(splits)}); pass --split with one of them"
                )
        return rows, [], []
    if split:
        raise DataError(
            f"--split {split} selects rows of a manifest CSV, but {source} is a folder, which has "
            "no splits; leave out --split to evaluate every image in it, or pass the manifest "
            "(e.g. the one `marrowscope data manifest` writes)"
        )
    scan = scan_folder(resolve_root(str(source)), check_images=False, progress=False)
    rows = [ManifestRow(path=str(p), label=c) for c, files in scan.files.items() for p in files]
    at_root = [p for p in scan.ignored if p.parent == scan.root]
    return rows, at_root, [p for p in scan.ignored if p.parent != scan.root]


def _not_read(at_root: Sequence[str], not_images: Sequence[str], show: int) -> list[str]:
    """What was not read, one phrase per reason, naming the first ``show`` files of each."""

    def files(paths: Sequence[str]) -> str:
        more = f" and {len(paths) - show} more" if len(paths) > show else ""
        return ", ".join(printable(Path(p).name) for p in paths[:show]) + more

    out = []
    if at_root:
        out.append(
            f"{len(at_root)} file(s) directly in the data folder, in no class folder "
            f"({files(at_root)}); put labelled images in their class's folder"
        )
    if not_images:
        out.append(
            f"{len(not_images)} file(s) in class folders that are not images by their "
            f"extension ({files(not_images)})"
        )
    return out


def _left_out_notes(
    dropped: Mapping[str, int], at_root: Sequence[str], not_images: Sequence[str]
) -> list[str]:
    """The report's sentences on what the evaluation left out."""
    notes = []
    if dropped:
        listed = ", ".join(f"{c} ({n} images)" for c, n in dropped.items())
        notes.append(
            f"Left out (--drop-unknown): {sum(dropped.values())} images of class(es) the model "
            f"does not know: {listed}."
        )
    notes.extend(f"Not read: {phrase}." for phrase in _not_read(at_root, not_images, 5))
    return notes


def _copies_note(groups: Sequence[DuplicateGroup]) -> str:
    """One sentence on byte-identical images in the evaluated data (empty if none): each copy is
    scored as an image of its own, and copies filed under different classes cannot all be
    right."""
    if not groups:
        return ""
    conflicts = [g for g in groups if g.conflict]
    extra = sum(len(g.extra) for g in groups)
    first = "; ".join(g.describe() for g in (conflicts or groups)[:3])
    clash = (
        f", {len(conflicts)} of them filed under different classes, so at least one copy of each "
        "of those is scored wrong"
        if conflicts
        else ""
    )
    return (
        f"{len(groups)} image(s) have byte-identical copies in the data ({extra} extra "
        f"file(s)){clash}; every copy is scored as an image of its own (e.g. {first}). Remove "
        "the extra copies, or correct the label, for a score over distinct cells."
    )


def evaluate_bundle(
    bundle_dir: Path,
    source: Path,
    *,
    out_dir: Path | None = None,
    split: str | None = None,
    class_map: Mapping[str, str] | None = None,
    drop_unknown: bool = False,
    focus: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    tta: str | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint bundle on a folder-per-class tree or a manifest CSV.

    Class names of the data must be among the bundle's classes (after ``class_map``), otherwise a
    :class:`DataError` names the unknown classes and the fixes (``--map SRC=DST``, ``--drop-unknown``).
    ``tta`` overrides the bundle's test-time augmentation (``None``: the bundle's setting).

    What was left out is recorded in the returned metrics (``metrics.json``) and in
    ``report.md``: ``dropped_classes`` (``{class: images}`` left out by ``drop_unknown``),
    ``ignored_files`` (files of a folder source not read: directly in the data folder, or in a
    class folder but not images by extension; the first 50 of them, with
    ``ignored_files_count`` all of them and ``ignored_files_at_root`` those directly in the data
    folder), ``skipped`` (unreadable images) and ``duplicates`` (groups of byte-identical files,
    each still scored as an image of its own; ``conflict``: filed under different classes).
    """
    console = console or Console()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(
            f"unknown test-time augmentation --tta {tta!r}; use {', '.join(TTA_MODES[:-1])} or "
            f"{TTA_MODES[-1]}"
        )
    meta = read_metadata(bundle_dir)
    classes = list(meta.classes)
    if focus and focus not in classes:
        console.print(
            f"[yellow]warning: --focus {printable(focus)} is not a class of the model (its "
            f"classes: {', '.join(classes)}); no focus block is reported"
        )
    rows, root_paths, other_paths = _labelled(Path(source), split)
    at_root, not_images = [str(p) for p in root_paths], [str(p) for p in other_paths]
    cmap = dict(class_map or {})
    rows = [ManifestRow(r.path, cmap.get(r.label, r.label), r.split, r.group) for r in rows]
    unknown = sorted({r.label for r in rows} - set(classes))
    if unknown and not drop_unknown:
        raise DataError(
            f"{source} has class(es) {', '.join(unknown)} that the checkpoint does not know "
            f"(it knows {', '.join(classes)}); map them with --map SRC=DST or leave them out with "
            "--drop-unknown"
        )
    dropped: dict[str, int] = {}
    if unknown:
        counts = Counter(r.label for r in rows)
        dropped = {c: counts[c] for c in unknown}
        console.print(
            "[yellow]leaving out class(es) unknown to the model: "
            + ", ".join(f"{c} ({n} images)" for c, n in dropped.items())
        )
        rows = [r for r in rows if r.label in set(classes)]
    for phrase in _not_read(at_root, not_images, 3):
        console.print(f"[yellow]not reading {phrase}")
    if not rows:
        raise DataError(f"no labelled image to evaluate in {source}")
    duplicates = find_duplicates((r.path, r.label) for r in rows)
    copies = _copies_note(duplicates)
    if copies:
        console.print(f"[yellow]warning: {escape(printable(copies))}")
    # built before the images are read: a device that is not there fails at once
    predictor = Predictor.from_checkpoint(bundle_dir, device=device, batch_size=batch_size, tta=tta)

    pre = config_from_params(meta.preprocess or {})  # exactly what the Predictor applies
    arrays, failures = PreprocessCache(pre).load_many(
        [r.path for r in rows], workers=pre.workers, progress=progress
    )
    for path, msg in failures:
        console.print(f"[yellow]skipping unreadable image {path}: {msg}")
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        named = ", ".join(printable(Path(p).name) for p, _ in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise DataError(
            f"all {len(rows)} images of {source} are unreadable ({named}{more}), so there is "
            f"nothing to evaluate; check the files (`marrowscope data scan {source}` lists "
            "every unreadable one)"
        )
    images = [arrays[i] for i in keep]
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[rows[i].label] for i in keep], dtype=np.int64)
    paths = [rows[i].path for i in keep]

    probs = predictor.predict_preprocessed(images, progress=progress)
    focus_cls = focus or (DEFAULT_FOCUS if DEFAULT_FOCUS in classes else None)
    metrics = score(probs, labels, classes, focus=focus_cls, n_boot=n_boot)
    metrics["checkpoint"] = str(bundle_dir)
    metrics["tta"] = predictor.tta_
    metrics["temperature"] = predictor.temperature_
    metrics["source"] = str(source)
    metrics["skipped"] = [{"path": p, "error": m} for p, m in failures]
    metrics["dropped_classes"] = dropped
    ignored = sorted(at_root + not_images)
    metrics["ignored_files"] = ignored[:IGNORED_LISTED]
    metrics["ignored_files_count"] = len(ignored)
    metrics["ignored_files_at_root"] = len(at_root)
    metrics["duplicates"] = [
        {"paths": list(g.paths), "classes": list(g.labels), "conflict": g.conflict}
        for g in duplicates
    ]
    if out_dir is not None:
        write_evaluation(
            Path(out_dir),
            metrics,
            probs=probs,
            labels=labels,
            paths=paths,
            classes=classes,
            title=f"{predictor.arch} on {Path(source).name}",
            extra={"checkpoint": str(bundle_dir), "data": str(source), "images": len(paths)},
            notes=[*_left_out_notes(dropped, at_root, not_images), *([copies] if copies else [])],
        )
    return metrics

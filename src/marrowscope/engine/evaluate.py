"""Evaluation of a checkpoint bundle on labelled images: metrics, CIs, confusion matrix, reports."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from marrowscope.config import ExperimentConfig, PreprocessConfig, from_dict
from marrowscope.data import DataError
from marrowscope.data.dataset import CellDataset
from marrowscope.data.manifest import ManifestRow, read_manifest
from marrowscope.data.sample import resolve_root
from marrowscope.data.scan import scan_folder
from marrowscope.engine.loops import make_progress, predict_logits, softmax
from marrowscope.metrics.classification import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    focus_class_block,
)
from marrowscope.models.bundle import load_bundle
from marrowscope.models.registry import Classifier
from marrowscope.preprocess.cache import PreprocessCache
from marrowscope.reports.markdown import evaluation_report
from marrowscope.reports.plots import plot_confusion_matrix
from marrowscope.transforms.augment import eval_transform
from marrowscope.utils.io import atomic_write_json, atomic_write_text
from marrowscope.utils.runtime import Precision, resolve_device, resolve_precision

log = logging.getLogger(__name__)

DEFAULT_FOCUS = "HAC"


def bundle_config(meta: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config stored in a bundle's metadata (cache location reset to the default)."""
    cfg = from_dict(dict(meta["config"]))
    return dc_replace(cfg, preprocess=dc_replace(cfg.preprocess, cache_dir=None))


def predict_probabilities(
    model: Classifier,
    images: Sequence[np.ndarray],
    *,
    size: int,
    device: torch.device,
    precision: Precision,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities (N x K) for preprocessed RGB HWC uint8 ``images``."""
    ds = CellDataset(images, [0] * len(images), eval_transform(size))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    with make_progress(transient=True, disable=not progress) as bar:
        logits, _ = predict_logits(
            model,
            loader,
            device=device,
            precision=precision,
            progress=bar if progress else None,
            task_name="predicting",
            total=len(ds),
        )
    if logits.size == 0:
        return np.zeros((0, model.num_classes), np.float32)
    return softmax(logits)


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
) -> None:
    """Write metrics.json, report.md, confusion_matrix.{png,csv} and predictions.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
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
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
    focus = metrics.get("focus")
    atomic_write_text(
        out_dir / "report.md",
        evaluation_report(
            metrics,
            title=title,
            ci=metrics.get("ci95"),
            focus=None if not focus or focus.get("absent") else focus,
            extra=extra,
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


def _rows_from_source(source: Path, split: str | None) -> list[ManifestRow]:
    if source.is_file() and source.suffix.lower() == ".csv":
        rows = read_manifest(source)
        has_split = any(r.split for r in rows)
        chosen = split or ("test" if has_split else None)
        if chosen:
            rows = [r for r in rows if r.split == chosen]
            if not rows:
                raise DataError(f"manifest {source} has no row in split {chosen!r}; pass --split")
        return rows
    scan = scan_folder(resolve_root(str(source)), check_images=False, progress=False)
    return [ManifestRow(path=str(p), label=c) for c, files in scan.files.items() for p in files]


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
    n_boot: int = 1000,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint bundle on a folder-per-class tree or a manifest CSV.

    Class names of the data must be among the bundle's classes (after ``class_map``), otherwise a
    :class:`DataError` names the unknown classes and the fixes (``--map SRC=DST``, ``--drop-unknown``).
    """
    console = console or Console()
    model, meta = load_bundle(bundle_dir, device="cpu")
    classes: list[str] = list(meta["classes"])
    cfg = bundle_config(meta)
    rows = _rows_from_source(Path(source), split)
    cmap = dict(class_map or {})
    rows = [ManifestRow(r.path, cmap.get(r.label, r.label), r.split, r.group) for r in rows]
    unknown = sorted({r.label for r in rows} - set(classes))
    if unknown and not drop_unknown:
        raise DataError(
            f"{source} has class(es) {', '.join(unknown)} that the checkpoint does not know "
            f"(it knows {', '.join(classes)}); map them with --map SRC=DST or leave them out with "
            "--drop-unknown"
        )
    if unknown:
        console.print(f"[yellow]leaving out class(es) unknown to the model: {', '.join(unknown)}")
        rows = [r for r in rows if r.label in set(classes)]
    if not rows:
        raise DataError(f"no labelled image to evaluate in {source}")

    pre: PreprocessConfig = cfg.preprocess
    arrays, failures = PreprocessCache(pre).load_many(
        [r.path for r in rows], workers=pre.workers, progress=progress
    )
    for path, msg in failures:
        console.print(f"[yellow]skipping unreadable image {path}: {msg}")
    keep = [i for i, a in enumerate(arrays) if a is not None]
    images = [arrays[i] for i in keep]
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[rows[i].label] for i in keep], dtype=np.int64)
    paths = [rows[i].path for i in keep]

    dev = resolve_device(device)
    precision = resolve_precision(cfg.train.precision, dev, cfg.train.channels_last)
    model.to(dev)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    probs = predict_probabilities(
        model,
        images,
        size=pre.size,
        device=dev,
        precision=precision,
        batch_size=batch_size,
        progress=progress,
    )
    focus_cls = focus or (DEFAULT_FOCUS if DEFAULT_FOCUS in classes else None)
    metrics = score(probs, labels, classes, focus=focus_cls, n_boot=n_boot)
    metrics["checkpoint"] = str(bundle_dir)
    metrics["source"] = str(source)
    metrics["skipped"] = [{"path": p, "error": m} for p, m in failures]
    if out_dir is not None:
        write_evaluation(
            Path(out_dir),
            metrics,
            probs=probs,
            labels=labels,
            paths=paths,
            classes=classes,
            title=f"{meta.get('arch', 'model')} on {Path(source).name}",
            extra={"checkpoint": str(bundle_dir), "data": str(source), "images": len(paths)},
        )
    return metrics

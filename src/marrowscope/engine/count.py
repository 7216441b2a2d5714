"""Per-sample differential count with a hairy-cell flag: one folder = one patient sample.

Every image below the sample folder is classified through the predictor (the same path as
``predict``). A cell whose top probability is below ``threshold`` goes to the *unidentified* bin
and is not counted; the differential (count and percentage per class, over the identified cells)
lists every class of the model, zeros included.

The **hairy-cell flag** fires when the cells called HAC reach ``hac_min_percent`` of the
identified cells *or* ``hac_min_count`` cells. The defaults (:data:`DEFAULT_HAC_MIN_PERCENT` = 2 %,
:data:`DEFAULT_HAC_MIN_COUNT` = 5 cells) are research settings chosen for sensitivity: a normal
marrow has no hairy cells, so a handful of confident HAC calls is worth a human look, while a
single stray call (a classifier's occasional false positive) does not fire the flag in a small
sample. They are not a clinical decision rule; the report says so. The flag comes with its
evidence: the highest-scoring HAC cells and their Grad-CAM maps. A model without a HAC class gets
the status ``"not available"`` instead of a flag.

:func:`write_count_outputs` writes ``report.html`` (see :mod:`marrowscope.reports.count_report`),
``count.json`` and ``cells.csv``, with the pictures the page shows under ``cells/``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope import __version__
from marrowscope.data import DataError
from marrowscope.reports.count_report import write_count_report
from marrowscope.utils.image import IMAGE_EXTENSIONS, ImageReadError, read_image
from marrowscope.utils.io import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "DEFAULT_EVIDENCE",
    "DEFAULT_GALLERY",
    "DEFAULT_HAC_MIN_COUNT",
    "DEFAULT_HAC_MIN_PERCENT",
    "DEFAULT_THRESHOLD",
    "FLAGGED",
    "HAC_CLASS",
    "NOT_AVAILABLE",
    "NOT_FLAGGED",
    "CellCall",
    "CountError",
    "CountResult",
    "Evidence",
    "HacFlag",
    "Tally",
    "check_settings",
    "count_sample",
    "select_evidence",
    "tally",
    "write_count_outputs",
]

DEFAULT_THRESHOLD = 0.5
"""Cells whose top class probability is below this go to the unidentified bin."""

DEFAULT_HAC_MIN_PERCENT = 2.0
"""Flag when HAC cells are at least this percentage of the identified cells (research setting)."""

DEFAULT_HAC_MIN_COUNT = 5
"""Flag when at least this many cells are called HAC (research setting)."""

DEFAULT_EVIDENCE = 8
"""How many of the highest-scoring HAC cells are shown with their Grad-CAM."""

DEFAULT_GALLERY = 48
"""Cells shown per class in the report's gallery (highest confidence first); all are in CSV."""

HAC_CLASS = "HAC"
"""The hairy-cell class name in the Matek et al. (2021) label set."""

FLAGGED = "flagged"
NOT_FLAGGED = "not flagged"
NOT_AVAILABLE = "not available"

CELLS_DIR = "cells"
_MARKER = ".marrowscope-count"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class CountError(DataError):
    """A sample folder or count setting cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class CellCall:
    """One classified cell.

    Attributes:
        path: the image file.
        rel: its path relative to the sample folder (POSIX separators).
        predicted: the most likely class.
        confidence: its probability.
        identified: ``confidence >= threshold`` (counted); else in the unidentified bin.
        probs: every class's probability, in the model's class order.
    """

    path: str
    rel: str
    predicted: str
    confidence: float
    identified: bool
    probs: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Evidence:
    """A HAC cell shown as evidence for the flag.

    Attributes:
        cell: the cell.
        probability: its HAC probability.
        rgb: the preprocessed image the model saw (RGB ``uint8``).
        overlay: the HAC Grad-CAM over ``rgb`` (``None`` when Grad-CAM is not available).
    """

    cell: CellCall
    probability: float
    rgb: np.ndarray | None = field(default=None, repr=False)
    overlay: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HacFlag:
    """The hairy-cell flag and the numbers behind it.

    Attributes:
        status: :data:`FLAGGED`, :data:`NOT_FLAGGED` or :data:`NOT_AVAILABLE`.
        message: one sentence for the report.
        hac_class: the model's HAC class name (``None`` when it has none).
        count: identified cells called HAC.
        percent: their share of the identified cells, in percent.
        min_percent: the percentage rule.
        min_count: the count rule.
        by_percent: the percentage rule fired.
        by_count: the count rule fired.
        evidence: the highest-scoring HAC cells.
        evidence_note: why the evidence has no Grad-CAM, if it has none.
    """

    status: str
    message: str
    hac_class: str | None
    count: int
    percent: float
    min_percent: float
    min_count: int
    by_percent: bool = False
    by_count: bool = False
    evidence: tuple[Evidence, ...] = ()
    evidence_note: str | None = None

    @property
    def flagged(self) -> bool:
        """True when the flag fired."""
        return self.status == FLAGGED


@dataclass(frozen=True)
class CountResult:
    """The differential count of one sample.

    Attributes:
        sample: the sample's name (its folder name).
        sample_dir: the sample folder.
        created: when the count was made (ISO 8601, local time with offset).
        classes: the model's classes, in index order.
        threshold: the unidentified threshold.
        cells: every classified cell, in file order.
        counts: identified cells per class (every class, zeros included).
        percents: ``counts`` as percentages of the identified cells (0 when none).
        unreadable: ``(path, message)`` per file that could not be used.
        ignored: non-image files found in the folder.
        flag: the hairy-cell flag.
        model: what the report says about the model (arch, name, version, checkpoint ...).
    """

    sample: str
    sample_dir: str
    created: str
    classes: tuple[str, ...]
    threshold: float
    cells: tuple[CellCall, ...]
    counts: dict[str, int]
    percents: dict[str, float]
    unreadable: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]
    flag: HacFlag
    model: dict[str, Any]

    @property
    def identified(self) -> list[CellCall]:
        """The counted cells."""
        return [c for c in self.cells if c.identified]

    @property
    def unidentified(self) -> list[CellCall]:
        """The cells below the threshold (not counted)."""
        return [c for c in self.cells if not c.identified]

    @property
    def n_images(self) -> int:
        """Image files found (classified + unreadable)."""
        return len(self.cells) + len(self.unreadable)

    def totals(self) -> dict[str, int]:
        """Images found, identified, unidentified, unreadable and ignored files."""
        n_id = sum(self.counts.values())
        return {
            "images": self.n_images,
            "identified": n_id,
            "unidentified": len(self.cells) - n_id,
            "unreadable": len(self.unreadable),
            "ignored": len(self.ignored),
        }

    def to_dict(self) -> dict[str, Any]:
        """Every number of the count as JSON-ready data (the content of ``count.json``)."""
        f = self.flag
        return {
            "sample": self.sample,
            "sample_dir": self.sample_dir,
            "created": self.created,
            "marrowscope_version": __version__,
            "model": dict(self.model),
            "settings": {
                "threshold": self.threshold,
                "hac_class": f.hac_class or HAC_CLASS,
                "hac_min_percent": f.min_percent,
                "hac_min_count": f.min_count,
            },
            "totals": self.totals(),
            "differential": [
                {"class": c, "count": self.counts[c], "percent": round(self.percents[c], 4)}
                for c in self.classes
            ],
            "flag": {
                "status": f.status,
                "message": f.message,
                "hac_class": f.hac_class,
                "count": f.count,
                "percent": round(f.percent, 4),
                "min_percent": f.min_percent,
                "min_count": f.min_count,
                "by_percent": f.by_percent,
                "by_count": f.by_count,
                "evidence": [
                    {"path": e.cell.path, "file": e.cell.rel, "probability": e.probability}
                    for e in f.evidence
                ],
                "evidence_note": f.evidence_note,
            },
            "unidentified": [
                {
                    "path": c.path,
                    "file": c.rel,
                    "predicted": c.predicted,
                    "confidence": c.confidence,
                }
                for c in self.unidentified
            ],
            "unreadable": [{"path": p, "error": e} for p, e in self.unreadable],
            "ignored": list(self.ignored),
        }


# ----------------------------------------------------------------------------------- counting


def check_settings(threshold: float, min_percent: float, min_count: int, evidence: int) -> None:
    """Check the count settings (threshold, HAC rules, evidence size).

    Raises:
        CountError: a setting out of range; the message names it and the default.
    """
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise CountError(
            f"threshold must be a probability between 0 and 1; got {threshold} (0.5 is the default)"
        )
    if not (isinstance(min_percent, (int, float)) and 0.0 < min_percent <= 100.0):
        raise CountError(
            f"the HAC percentage rule must be in (0, 100]; got {min_percent} "
            f"({DEFAULT_HAC_MIN_PERCENT} is the default)"
        )
    if not (isinstance(min_count, int) and min_count >= 1):
        raise CountError(
            f"the HAC count rule must be a whole number >= 1; got {min_count} "
            f"({DEFAULT_HAC_MIN_COUNT} is the default)"
        )
    if not (isinstance(evidence, int) and evidence >= 0):
        raise CountError(f"evidence must be a whole number >= 0; got {evidence}")


def _find_hac(classes: Sequence[str], name: str) -> str | None:
    if name in classes:
        return name
    folded = [c for c in classes if c.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _sample_files(sample_dir: Path) -> tuple[list[Path], list[Path]]:
    if not sample_dir.exists():
        raise CountError(f"{sample_dir}: no such sample folder; check the path")
    if not sample_dir.is_dir():
        raise CountError(
            f"{sample_dir} is a file; pass the folder holding one sample's cell images"
        )
    from marrowscope.explain.sheets import list_images  # torch: imported only when counting

    images, others = list_images(sample_dir)
    if not images:
        extra = f" (found {len(others)} other file(s))" if others else ""
        raise CountError(
            f"{sample_dir}: no cell images in this sample folder or its sub-folders{extra}; a "
            f"sample is one folder of single-cell images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return images, others


def _model_info(predictor: Predictor) -> dict[str, Any]:
    meta = dict(getattr(predictor, "metadata", {}) or {})
    config = meta.get("config") or {}
    pre = meta.get("preprocess") or {}
    return {
        "arch": meta.get("arch") or (meta.get("architecture") or {}).get("name"),
        "name": config.get("name") if isinstance(config, dict) else None,
        "classes": list(predictor.classes_),
        "bundle_version": meta.get("marrowscope_version"),
        "checkpoint": str(getattr(predictor, "checkpoint", "") or ""),
        "backend": getattr(predictor, "backend", "torch"),
        "input_size": int(meta.get("input_size") or predictor.input_size),
        "denoise": bool(pre.get("denoise", False)),
    }


def _flag(
    counts: dict[str, int],
    classes: Sequence[str],
    hac_class: str,
    min_percent: float,
    min_count: int,
) -> HacFlag:
    hac = _find_hac(classes, hac_class)
    if hac is None:
        return HacFlag(
            status=NOT_AVAILABLE,
            message=(
                f"Not available: the model has no {hac_class} class (its classes: "
                f"{', '.join(classes)}), so it cannot flag hairy cells. Use a model trained with "
                f"the {hac_class} class."
            ),
            hac_class=None,
            count=0,
            percent=0.0,
            min_percent=float(min_percent),
            min_count=int(min_count),
        )
    n = sum(counts.values())
    k = counts[hac]
    pct = 100.0 * k / n if n else 0.0
    by_pct = n > 0 and k > 0 and k * 100.0 >= min_percent * n - 1e-9
    by_count = k >= min_count
    share = f"{k} of {n} identified cells ({pct:.1f}%) are called {hac}"
    if by_pct or by_count:
        rules = [
            r
            for r, hit in (
                (f"at least {min_percent:g}% of identified cells", by_pct),
                (f"at least {min_count} {hac} cells", by_count),
            )
            if hit
        ]
        msg = f"{share}: {' and '.join(rules)}. Review the evidence cells below."
        status = FLAGGED
    else:
        msg = (
            f"{share}: below both rules ({min_percent:g}% of identified cells, {min_count} cells)."
        )
        status = NOT_FLAGGED
    return HacFlag(
        status=status,
        message=msg,
        hac_class=hac,
        count=k,
        percent=pct,
        min_percent=float(min_percent),
        min_count=int(min_count),
        by_percent=by_pct,
        by_count=by_count,
    )


def select_evidence(
    cells: Iterable[CellCall], hac: str, classes: Sequence[str], n: int
) -> list[CellCall]:
    """The ``n`` identified cells called ``hac`` with the highest ``hac`` probability.

    Ties are broken by ``rel`` so the choice is stable.
    """
    idx = list(classes).index(hac)
    return sorted(
        (c for c in cells if c.identified and c.predicted == hac),
        key=lambda c: (-float(c.probs[idx]), c.rel),
    )[: max(0, n)]


@dataclass(frozen=True)
class Tally:
    """A differential count and its hairy-cell flag (no evidence pictures).

    Attributes:
        counts: cells per class (every class of the model, zeros included, model order).
        percents: ``counts`` as percentages of the counted cells (0 when none).
        flag: the hairy-cell flag for these counts.
    """

    counts: dict[str, int]
    percents: dict[str, float]
    flag: HacFlag

    @property
    def total(self) -> int:
        """Counted cells."""
        return sum(self.counts.values())


def tally(
    labels: Iterable[str],
    classes: Sequence[str],
    *,
    hac_class: str = HAC_CLASS,
    hac_min_percent: float = DEFAULT_HAC_MIN_PERCENT,
    hac_min_count: int = DEFAULT_HAC_MIN_COUNT,
) -> Tally:
    """Count the labels of the identified cells and apply the hairy-cell rules.

    The one counting rule behind ``marrowscope count`` and the review app (model calls and
    reviewed labels alike).

    Args:
        labels: one class name per counted cell.
        classes: the model's classes, in index order (every one appears in ``counts``).
        hac_class: the hairy-cell class name (matched case-insensitively).
        hac_min_percent: flag when HAC cells are at least this % of the counted cells.
        hac_min_count: flag when at least this many cells are HAC.

    Raises:
        CountError: a label that is not one of ``classes``.
    """
    counts = {str(c): 0 for c in classes}
    for label in labels:
        if label not in counts:
            raise CountError(
                f"label {label!r} is not a class of the model ({', '.join(counts)}); use one of them"
            )
        counts[label] += 1
    n = sum(counts.values())
    percents = {c: (100.0 * k / n if n else 0.0) for c, k in counts.items()}
    flag = _flag(counts, list(counts), hac_class, hac_min_percent, hac_min_count)
    return Tally(counts=counts, percents=percents, flag=flag)


def _evidence(
    predictor: Predictor, cells: Sequence[CellCall], hac: str, classes: Sequence[str], n: int
) -> tuple[tuple[Evidence, ...], str | None]:
    """The ``n`` identified HAC cells with the highest HAC probability, with Grad-CAM overlays."""
    idx = list(classes).index(hac)
    chosen = select_evidence(cells, hac, classes, n)
    if not chosen:
        return (), None
    if getattr(predictor, "backend", "torch") != "torch":
        note = (
            f"Grad-CAM needs the PyTorch model; this count ran on the {predictor.backend} "
            "backend, so the evidence cells are shown without heat maps."
        )
        return tuple(Evidence(c, float(c.probs[idx])) for c in chosen), note
    from marrowscope.explain.gradcam import gradcam_preprocessed

    arrays, kept = [], []
    for c in chosen:
        try:
            arrays.append(predictor.preprocess(predictor.load(c.path)))
            kept.append(c)
        except (ImageReadError, ValueError):
            continue  # changed on disk since it was classified
    results = gradcam_preprocessed(predictor, arrays, names=[c.rel for c in kept], target_class=hac)
    return tuple(
        Evidence(c, float(c.probs[idx]), rgb=r.rgb, overlay=r.overlay)
        for c, r in zip(kept, results, strict=True)
    ), None


def count_sample(
    predictor: Predictor,
    sample_dir: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    hac_min_percent: float = DEFAULT_HAC_MIN_PERCENT,
    hac_min_count: int = DEFAULT_HAC_MIN_COUNT,
    evidence: int = DEFAULT_EVIDENCE,
    hac_class: str = HAC_CLASS,
    workers: int = 0,
    progress: bool = True,
) -> CountResult:
    """Classify every cell of one sample and make its differential count and hairy-cell flag.

    Args:
        predictor: the model (any backend; Grad-CAM evidence needs the torch backend).
        sample_dir: the sample folder; images are found recursively (hidden files skipped).
        threshold: top probability below which a cell is unidentified (not counted).
        hac_min_percent: flag when HAC cells are at least this % of the identified cells.
        hac_min_count: flag when at least this many cells are called HAC.
        evidence: how many top HAC cells get a Grad-CAM as evidence.
        hac_class: the hairy-cell class name (matched case-insensitively).
        workers: decoding processes (0 = one per core).
        progress: show a progress bar.

    Raises:
        CountError: a missing/empty sample folder or a setting out of range.
    """
    check_settings(threshold, hac_min_percent, hac_min_count, evidence)
    folder = Path(sample_dir).expanduser()
    images, others = _sample_files(folder)
    classes = tuple(str(c) for c in predictor.classes_)
    cells: list[CellCall] = []
    unreadable: list[tuple[str, str]] = []
    for res in predictor.predict_paths(images, workers=workers, progress=progress):
        if res.probs is None:
            unreadable.append((res.path, res.error or f"{res.path}: unreadable"))
            continue
        probs = np.asarray(res.probs, dtype=np.float32)
        top = int(np.argmax(probs))
        conf = float(probs[top])
        cells.append(
            CellCall(
                path=res.path,
                rel=Path(os.path.relpath(res.path, folder)).as_posix(),
                predicted=classes[top],
                confidence=conf,
                identified=conf >= threshold,
                probs=probs,
            )
        )
    t = tally(
        (c.predicted for c in cells if c.identified),
        classes,
        hac_class=hac_class,
        hac_min_percent=hac_min_percent,
        hac_min_count=hac_min_count,
    )
    counts, percents, flag = t.counts, t.percents, t.flag
    if flag.hac_class is not None and evidence > 0:
        ev, note = _evidence(predictor, cells, flag.hac_class, classes, evidence)
        flag = replace(flag, evidence=ev, evidence_note=note)
    return CountResult(
        sample=folder.resolve().name or str(folder),
        sample_dir=str(folder),
        created=datetime.now().astimezone().isoformat(timespec="seconds"),
        classes=classes,
        threshold=float(threshold),
        cells=tuple(cells),
        counts=counts,
        percents=percents,
        unreadable=tuple(unreadable),
        ignored=tuple(str(p) for p in others),
        flag=flag,
        model=_model_info(predictor),
    )


# ------------------------------------------------------------------------------------ outputs


def _encode_jpeg(rgb: np.ndarray, side: int | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if side is not None and max(im.size) > side:
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._")[:60] or "x"


class _Pictures:
    """Writes the report's pictures into a fresh ``cells/`` folder (swapped in at the end)."""

    def __init__(self, out_dir: Path) -> None:
        self.final = out_dir / CELLS_DIR
        if self.final.exists() and not (self.final / _MARKER).exists():
            raise CountError(
                f"{self.final} exists and was not written by 'marrowscope count'; choose another "
                "--out folder (the report keeps its pictures in DIR/cells)"
            )
        for stale in out_dir.glob(f".{CELLS_DIR}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = out_dir / f".{CELLS_DIR}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        (self.tmp / _MARKER).write_text("pictures of a marrowscope count report\n")
        self.n = 0

    def add(self, folder: str, stem: str, data: bytes) -> str:
        """Write one JPEG as ``cells/<folder>/<n>_<stem>.jpg``; returns that relative path."""
        self.n += 1
        rel = f"{folder}/{self.n:05d}_{_safe(stem)}.jpg"
        target = self.tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return f"{CELLS_DIR}/{rel}"

    def thumb(self, folder: str, cell: CellCall, side: int = 160) -> str | None:
        try:
            rgb = read_image(cell.path)
        except ImageReadError:
            return None
        return self.add(folder, Path(cell.rel).stem, _encode_jpeg(rgb, side))

    def commit(self) -> None:
        old = self.final.with_name(f".{CELLS_DIR}.old-{uuid.uuid4().hex[:8]}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cells_csv(result: CountResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["file", "path", "predicted", "confidence", "bin", *(f"p_{c}" for c in result.classes)]
        + ["error"]
    )
    for c in result.cells:
        w.writerow(
            [
                c.rel,
                c.path,
                c.predicted,
                f"{c.confidence:.6f}",
                "counted" if c.identified else "unidentified",
                *(f"{float(p):.6f}" for p in c.probs),
                "",
            ]
        )
    for path, err in result.unreadable:
        w.writerow(["", path, "", "", "unreadable", *([""] * len(result.classes)), err])
    return buf.getvalue()


def write_count_outputs(
    result: CountResult, out_dir: str | Path, *, gallery: int = DEFAULT_GALLERY
) -> dict[str, Path]:
    """Write ``report.html``, ``count.json``, ``cells.csv`` and the pictures under ``cells/``.

    The pictures (thumbnails of up to ``gallery`` cells per class and of the unidentified bin,
    the evidence cells and their Grad-CAM) are written to a new folder that replaces ``cells/``
    only when complete; every file is written atomically.

    Args:
        result: the count.
        out_dir: the report folder (created).
        gallery: cells shown per class (highest confidence first); ``cells.csv`` lists all.

    Returns:
        ``{"report": ..., "json": ..., "csv": ..., "cells": ...}`` paths.

    Raises:
        CountError: ``out_dir/cells`` exists and was not written by a count.
    """
    if gallery < 0:
        raise CountError(f"gallery must be >= 0 cells per class; got {gallery}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CountError(f"{out} is a file; --out names a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    pics = _Pictures(out)
    try:
        for item, e in zip(data["flag"]["evidence"], result.flag.evidence, strict=True):
            item["name"] = e.cell.rel
            stem = Path(e.cell.rel).stem
            if e.rgb is not None:
                item["cell_image"] = pics.add("evidence", f"{stem}_cell", _encode_jpeg(e.rgb))
            else:
                item["cell_image"] = pics.thumb("evidence", e.cell, side=256)
            item["cam_image"] = (
                None
                if e.overlay is None
                else pics.add("evidence", f"{stem}_gradcam", _encode_jpeg(e.overlay))
            )
        groups = []
        for k, cls in enumerate(result.classes):
            members = sorted(
                (c for c in result.cells if c.identified and c.predicted == cls),
                key=lambda c: (-c.confidence, c.rel),
            )
            shown = []
            for c in members[:gallery]:
                src = pics.thumb(f"{k:02d}_{_safe(cls)}", c)
                if src:
                    shown.append({"name": c.rel, "confidence": c.confidence, "image": src})
            if members:
                groups.append(
                    {"class": cls, "count": len(members), "shown": len(shown), "cells": shown}
                )
        unid = sorted(result.unidentified, key=lambda c: (-c.confidence, c.rel))
        unid_shown = []
        for c in unid[:gallery]:
            src = pics.thumb("unidentified", c)
            if src:
                unid_shown.append(
                    {
                        "name": c.rel,
                        "predicted": c.predicted,
                        "confidence": c.confidence,
                        "image": src,
                    }
                )
        report_data = dict(data)
        report_data["gallery"] = groups
        report_data["unidentified"] = {
            "count": len(unid),
            "shown": len(unid_shown),
            "cells": unid_shown,
        }
        pics.commit()
    except BaseException:
        pics.abort()
        raise
    json_data = dict(data)
    json_data["outputs"] = {"report": "report.html", "cells_csv": "cells.csv"}
    json_path = out / "count.json"
    atomic_write_json(json_path, _finite(json_data))
    csv_path = out / "cells.csv"
    atomic_write(csv_path, lambda p: p.write_text(_cells_csv(result), encoding="utf-8", newline=""))
    report = write_count_report(report_data, out / "report.html")
    return {"report": report, "json": json_path, "csv": csv_path, "cells": out / CELLS_DIR}


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (never expected) by None so count.json stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

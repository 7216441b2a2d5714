"""The files of a per-sample count: the records they are made from, ``count.json``, ``cells.csv``,
``report.html`` and the report's pictures under ``cells/``.

:class:`CountResult` is a count of one sample folder (made by
:func:`marrowscope.engine.count.count_sample`); :meth:`CountResult.to_dict` is the content of
``count.json``. :func:`write_count_outputs` writes every file of the report folder (the page itself
is rendered by :mod:`marrowscope.reports.count_report`). The numbers come from the counting rule,
:mod:`marrowscope.metrics.counting`. No torch here.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope import __version__
from marrowscope.metrics.counting import DEFAULT_GALLERY, HAC_CLASS, CountError, HacFlag
from marrowscope.reports.count_report import write_count_report
from marrowscope.reports.detect_files import (
    FieldOutcome,
    draw_overlay,
    overlay_name,
    prepare_overlays,
    write_detect_outputs,
    write_overlay,
)
from marrowscope.utils.image import ImageReadError, read_image
from marrowscope.utils.io import atomic_write_json, atomic_write_text, staging_folder

__all__ = ["CELLS_DIR", "COUNT_MODES", "CellCall", "CountResult", "write_count_outputs"]

COUNT_MODES = ("cells", "fields")
"""What a sample's images are: single-cell crops (``count``) or whole fields (``count --fields``)."""

log = logging.getLogger(__name__)

CELLS_DIR = "cells"
"""The report's picture folder, inside the report folder."""

_MARKER = ".marrowscope-count"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class CellCall:
    """One classified cell image of a sample folder.

    Attributes:
        path: the image file.
        rel: its path relative to the sample folder (POSIX separators).
        predicted: the most likely class.
        confidence: its probability.
        identified: ``confidence >= threshold`` (counted); else in the unidentified bin.
        probs: every class's probability, in the model's class order.
        field_rel: for a cell found in a field of view (``count --fields``): the field's path
            relative to the sample folder; ``None`` for a single-cell image.
        box: its box in the field, ``(x_min, y_min, x_max, y_max)`` pixels.
        um_per_px: the field's scale used to crop it.
    """

    path: str
    rel: str
    predicted: str
    confidence: float
    identified: bool
    probs: np.ndarray = field(repr=False)
    field_rel: str | None = None
    box: tuple[float, float, float, float] | None = None
    um_per_px: float | None = None

    @property
    def key(self) -> str:
        """``rel``: the cell's key for the counting rule (ties in the evidence break on it)."""
        return self.rel


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
        flag: the hairy-cell flag (its evidence cells are :class:`CellCall` records).
        model: what the report says about the model (arch, name, version, checkpoint ...).
        fields: for a count of whole fields (``count --fields``): one record per readable field
            (cells found, scale used, warnings); empty for a count of single-cell images, and
            for a count of fields none of which could be used.
        detector: the detector's settings (fields only).
        mode: ``"cells"`` (single-cell images) or ``"fields"`` (whole fields of view): what
            the files are, whether or not any could be used (:data:`COUNT_MODES`).
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
    fields: tuple[FieldOutcome, ...] = ()
    detector: dict[str, Any] | None = None
    mode: str = "cells"

    def __post_init__(self) -> None:
        if self.mode not in COUNT_MODES:
            raise ValueError(f"mode must be one of {COUNT_MODES}, got {self.mode!r}")
        if self.fields and self.mode != "fields":  # records built before the mode existed
            object.__setattr__(self, "mode", "fields")

    @property
    def of_fields(self) -> bool:
        """Whether the sample was counted as whole fields of view (``count --fields``)."""
        return self.mode == "fields"

    @property
    def field_errors(self) -> tuple[FieldOutcome, ...]:
        """A record per field that could not be used (its error), for ``fields.csv``."""
        if not self.of_fields:
            return ()
        method = str((self.detector or {}).get("name") or "")
        return tuple(FieldOutcome(path=p, method=method, error=e) for p, e in self.unreadable)

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
        """Image files found (classified + unreadable; fields + unreadable for a field count)."""
        if self.of_fields:
            return len(self.fields) + len(self.unreadable)
        return len(self.cells) + len(self.unreadable)

    def totals(self) -> dict[str, int]:
        """Images found, identified, unidentified, unreadable and ignored files (and, for a
        count of fields, the fields, the cells found and the fields without a white cell)."""
        n_id = sum(self.counts.values())
        out = {
            "images": self.n_images,
            "identified": n_id,
            "unidentified": len(self.cells) - n_id,
            "unreadable": len(self.unreadable),
            "ignored": len(self.ignored),
        }
        if self.of_fields:
            out["fields"] = len(self.fields)
            out["cells_found"] = len(self.cells)
            out["fields_without_cells"] = sum(not f.cells for f in self.fields)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every number of the count as JSON-ready data (the content of ``count.json``)."""
        f = self.flag
        return {
            "sample": self.sample,
            "sample_dir": self.sample_dir,
            "mode": self.mode,
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
            **(
                {
                    "detector": dict(self.detector or {}),
                    "fields": [f.to_dict() for f in self.fields],
                }
                if self.of_fields
                else {}
            ),
        }


def _encode_jpeg(rgb: np.ndarray, side: int | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if side is not None and max(im.size) > side:
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _box_view(cell: CellCall, margin: float = 0.25) -> np.ndarray:
    """The part of a cell's field around its box (square, ``margin`` of its side each way)."""
    from marrowscope.preprocess.fields import MAX_FIELD_PIXELS
    from marrowscope.utils.image import decode_image, read_file_bytes

    data = read_file_bytes(cell.path)
    rgb = decode_image(data, cell.path, max_pixels=MAX_FIELD_PIXELS, what="field")
    assert cell.box is not None
    x0, y0, x1, y1 = cell.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = rgb.shape[:2]
    a, b = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    c, d = min(w, round(cx + side / 2)), min(h, round(cy + side / 2))
    if c <= a or d <= b:
        return rgb
    return np.ascontiguousarray(rgb[b:d, a:c])


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
        # beside cells/; a crashed run's staging folder is removed, a running one's is not
        self.tmp = staging_folder(self.final)
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
            rgb = read_image(cell.path) if cell.box is None else _box_view(cell)
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
    boxes = result.of_fields
    where = ["field", "x_min", "y_min", "x_max", "y_max", "um_per_px"] if boxes else []
    w.writerow(
        ["file", "path", *where, "predicted", "confidence", "bin"]
        + [f"p_{c}" for c in result.classes]
        + ["error"]
    )
    for c in result.cells:
        at = []
        if boxes:
            b = c.box or (math.nan,) * 4
            at = [
                c.field_rel or "",
                *(f"{v:.1f}" for v in b),
                "" if c.um_per_px is None else f"{c.um_per_px:.5f}",
            ]
        w.writerow(
            [
                c.rel,
                c.path,
                *at,
                c.predicted,
                f"{c.confidence:.6f}",
                "counted" if c.identified else "unidentified",
                *(f"{float(p):.6f}" for p in c.probs),
                "",
            ]
        )
    for path, err in result.unreadable:
        blank = [""] * len(where)
        w.writerow(["", path, *blank, "", "", "unreadable", *([""] * len(result.classes)), err])
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
        CountError: ``gallery`` is negative, ``out_dir`` is a file, or ``out_dir/cells`` exists
            and was not written by a count.
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
    paths: dict[str, Path] = {}
    if result.of_fields:
        fields = _field_files(result, out)
        report_data["fields"] = [f.to_dict() for f in fields]
        data["fields"] = report_data["fields"]
        # fields.csv and detections.json list every field, those that could not be used with
        # their error (as 'detect' writes them), in the sample's file order
        every = sorted([*fields, *result.field_errors], key=lambda f: Path(f.path))
        paths.update(
            write_detect_outputs(every, out, classes=result.classes, settings=result.detector)
        )
    json_data = dict(data)
    json_data["outputs"] = {"report": "report.html", "cells_csv": "cells.csv"}
    if result.of_fields:
        json_data["outputs"].update(
            {
                "detections_csv": "detections.csv",
                "fields_csv": "fields.csv",
                "overlays": "overlays/",
            }
        )
    json_path = out / "count.json"
    atomic_write_json(json_path, _finite(json_data), escape=True)
    csv_path = out / "cells.csv"
    atomic_write_text(csv_path, _cells_csv(result), escape=True)
    report = write_count_report(report_data, out / "report.html")
    return {"report": report, "json": json_path, "csv": csv_path, "cells": out / CELLS_DIR, **paths}


def _field_files(result: CountResult, out: Path) -> list[FieldOutcome]:
    """Draw each field's overlay (boxes with class and confidence); the fields with its path.

    A field whose overlay cannot be made (changed on disk since it was counted, out of memory,
    a failed write) keeps its count and gets no overlay; the reason goes to the log.
    """
    from dataclasses import replace

    from marrowscope.preprocess.fields import MAX_FIELD_PIXELS
    from marrowscope.utils.image import decode_image, read_file_bytes

    prepare_overlays(out)
    done = []
    for n, f in enumerate(result.fields):
        rel = overlay_name(n, f.path)
        try:
            rgb = decode_image(
                read_file_bytes(f.path), f.path, max_pixels=MAX_FIELD_PIXELS, what="field"
            )
            note = None if f.cells else "no white cell found"
            write_overlay(out / rel, draw_overlay(rgb, f.cells, classes=result.classes, note=note))
        except Exception as e:  # noqa: BLE001 - one overlay's failure must not lose the report
            log.warning("%s: no overlay drawn (%s: %s)", f.path, type(e).__name__, e)
            done.append(f)
            continue
        done.append(replace(f, overlay=rel))
    return done


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (never expected) by None so count.json stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

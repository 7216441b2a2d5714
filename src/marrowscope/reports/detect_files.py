"""The files of ``marrowscope detect``: ``detections.csv``, ``fields.csv``, ``detections.json`` and
one overlay PNG per field (boxes drawn on the field). No torch here.

The records are plain: :class:`FieldOutcome` (one per field, found cells or the error) and
:class:`DetectedCell` (one box, with the class when a classifier ran), so the engine, the review
app and tests can build them from any detector.

``overlays/`` holds a marker file (:data:`~marrowscope.utils.image.OUTPUT_MARKER`): folder
listings skip it, so a run over a folder that holds an earlier run's output does not take the
overlays for fields; and the overlays an earlier run left there that this run did not write are
removed (:func:`write_detect_outputs`), so the folder shows this run's fields only.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from marrowscope import __version__
from marrowscope.utils.image import OUTPUT_MARKER, is_hidden
from marrowscope.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "DETECTIONS_CSV",
    "FIELDS_CSV",
    "OVERLAYS_DIR",
    "DetectedCell",
    "FieldOutcome",
    "check_overlays",
    "draw_overlay",
    "overlay_name",
    "prepare_overlays",
    "remove_stale_overlays",
    "write_detect_outputs",
    "write_overlay",
]

DETECTIONS_CSV = "detections.csv"
FIELDS_CSV = "fields.csv"
DETECTIONS_JSON = "detections.json"
OVERLAYS_DIR = "overlays"

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_OVERLAY_FILE = re.compile(r"\d{5,}_[A-Za-z0-9._+-]*\.png")
"""The names :func:`overlay_name` gives."""
_PALETTE = [  # RGB, colour-blind friendly (Okabe-Ito), one per class in model order
    (0, 158, 115),
    (230, 159, 0),
    (86, 180, 233),
    (204, 121, 167),
    (0, 114, 178),
    (213, 94, 0),
    (240, 228, 66),
    (120, 120, 120),
]


@dataclass(frozen=True)
class DetectedCell:
    """One white cell found in a field.

    Attributes:
        box: ``(x_min, y_min, x_max, y_max)`` in pixels of the field as given.
        score: the detection score.
        label: the predicted class (``None`` without a classifier).
        confidence: its probability.
        probs: every class's probability (model order), or ``None``.
    """

    box: tuple[float, float, float, float]
    score: float
    label: str | None = None
    confidence: float | None = None
    probs: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FieldOutcome:
    """What happened to one field.

    Attributes:
        path: the field as given.
        cells: the white cells found (empty: none, or an error).
        width, height: its size (``None`` when unreadable).
        um_per_px: the scale used.
        scale_source: ``given`` / ``ruler`` / ``model`` / ``default``.
        red_cells: red cells the ruler measured.
        method: the detector.
        tiles: windows the field was processed in.
        warnings: sentences for the user.
        error: why the field could not be used (``None``: it was).
        overlay: the overlay's path relative to the output folder.
    """

    path: str
    cells: tuple[DetectedCell, ...] = ()
    width: int | None = None
    height: int | None = None
    um_per_px: float | None = None
    scale_source: str | None = None
    red_cells: int = 0
    method: str = ""
    tiles: int = 1
    warnings: tuple[str, ...] = ()
    error: str | None = None
    overlay: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (cells with their boxes, classes and probabilities)."""
        return {
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "cells_found": len(self.cells),
            "um_per_px": self.um_per_px,
            "scale_source": self.scale_source,
            "red_cells_measured": self.red_cells,
            "method": self.method,
            "tiles": self.tiles,
            "warnings": list(self.warnings),
            "error": self.error,
            "overlay": self.overlay,
            "cells": [
                {
                    "x_min": c.box[0],
                    "y_min": c.box[1],
                    "x_max": c.box[2],
                    "y_max": c.box[3],
                    "score": c.score,
                    "class": c.label,
                    "confidence": c.confidence,
                }
                for c in self.cells
            ],
        }


def overlay_name(index: int, path: str) -> str:
    """``overlays/<index>_<file stem>.png`` (unique per field of a run)."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("._")[:60] or "field"
    return f"{OVERLAYS_DIR}/{index:05d}_{stem}.png"


def _overlays_ours(folder: Path) -> bool:
    """Whether ``folder`` is marrowscope's overlays folder: it carries the marker."""
    return (folder / OUTPUT_MARKER).is_file()


def _empty(folder: Path) -> bool:
    return not any(not is_hidden(f.name) for f in folder.iterdir())


def prepare_overlays(out_dir: str | Path) -> Path:
    """Create ``out_dir/overlays`` with its marker; returns the folder.

    Raises:
        FileExistsError: see :func:`check_overlays`.
    """
    folder = check_overlays(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text("overlays written by marrowscope; folder listings skip this folder\n")
    return folder


def check_overlays(out_dir: str | Path) -> Path:
    """``out_dir/overlays``, checked (nothing is created): it may be written when it does not
    exist, is empty, or carries marrowscope's marker.

    Raises:
        FileExistsError: ``overlays`` is a file, or a folder holding files without the marker
            (another program's, or an older marrowscope's: nothing in it is touched).
    """
    folder = Path(out_dir) / OVERLAYS_DIR
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"{folder} is a file; choose another --out folder (overlays are written to "
            "DIR/overlays)"
        )
    if folder.is_dir() and not _overlays_ours(folder) and not _empty(folder):
        raise FileExistsError(
            f"{folder} exists and was not written by this version of marrowscope (no "
            f"{OUTPUT_MARKER} marker in it); move it away or choose another --out folder "
            "(overlays are written to DIR/overlays, and the overlays of an earlier run there "
            "are replaced)"
        )
    return folder


def remove_stale_overlays(out_dir: str | Path, keep: Collection[str]) -> int:
    """Delete the overlays in ``out_dir/overlays`` that an earlier run wrote and this one did not
    (``keep``: this run's overlays, relative to ``out_dir``). Only files named as
    :func:`overlay_name` names them, in a folder carrying marrowscope's marker (written by
    :func:`prepare_overlays`), are touched.

    Returns:
        How many were removed.
    """
    folder = Path(out_dir) / OVERLAYS_DIR
    if not folder.is_dir() or not _overlays_ours(folder):
        return 0
    kept = {Path(k).name for k in keep}
    removed = 0
    for f in folder.iterdir():
        if f.is_file() and _OVERLAY_FILE.fullmatch(f.name) and f.name not in kept:
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def draw_overlay(
    rgb: np.ndarray,
    cells: Sequence[DetectedCell],
    *,
    classes: Sequence[str] | None = None,
    note: str | None = None,
) -> np.ndarray:
    """The field with each cell's box and a caption (``#n score`` or ``#n CLASS conf``).

    RGB uint8 in, RGB uint8 out (a copy). Line width and font follow the field's size.
    """
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    font = 0.4 * max(1.0, min(h, w) / 500)
    index = {c: i for i, c in enumerate(classes or [])}
    for n, c in enumerate(cells, start=1):
        colour = _PALETTE[index.get(c.label or "", 0) % len(_PALETTE)] if c.label else (0, 200, 0)
        x0, y0, x1, y1 = (round(v) for v in c.box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thick)
        text = (
            f"#{n} {c.label} {c.confidence:.2f}"
            if c.label and c.confidence is not None
            else f"#{n} {c.score:.2f}"
        )
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        ty = y0 - 3 if y0 - th - 4 >= 0 else min(h - 1, y1 + th + 3)
        cv2.rectangle(out, (x0, ty - th - 2), (min(w - 1, x0 + tw + 2), ty + base - 1), colour, -1)
        cv2.putText(
            out, text, (x0 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 1, cv2.LINE_AA
        )
    if note:
        (tw, th), base = cv2.getTextSize(note, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        cv2.rectangle(out, (0, 0), (min(w - 1, tw + 4), th + base + 4), (255, 255, 255), -1)
        cv2.putText(
            out, note, (2, th + 2), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 1, cv2.LINE_AA
        )
    return out


def write_overlay(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB overlay as PNG, atomically."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.tobytes())


def _num(v: float | None, digits: int = 1) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def write_detect_outputs(
    outcomes: Sequence[FieldOutcome],
    out_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``detections.csv`` (one row per cell), ``fields.csv`` (one row per field, cells
    found, scale, error) and ``detections.json`` (both, plus the settings), atomically; then
    remove the overlays of an earlier run that no outcome names (:func:`remove_stale_overlays`).
    Paths that are not valid UTF-8 are written with their undecodable bytes escaped
    (:func:`~marrowscope.utils.io.printable`).

    Returns:
        ``{"detections": ..., "fields": ..., "json": ...}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_classes = bool(classes)
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["field", "cell", "x_min", "y_min", "x_max", "y_max", "score"]
    if with_classes:
        head += ["class", "confidence", *(f"p_{c}" for c in classes or ())]
    w.writerow(head)
    for o in outcomes:
        for n, c in enumerate(o.cells, start=1):
            row = [o.path, n, *(_num(v) for v in c.box), f"{c.score:.4f}"]
            if with_classes:
                probs = [] if c.probs is None else [f"{float(p):.6f}" for p in c.probs]
                row += [c.label or "", _num(c.confidence, 6), *probs]
            w.writerow(row)
    det_path = out / DETECTIONS_CSV
    atomic_write_text(det_path, buf.getvalue(), escape=True)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "path",
            "cells_found",
            "width",
            "height",
            "um_per_px",
            "scale_source",
            "red_cells_measured",
            "method",
            "tiles",
            "overlay",
            "warnings",
            "error",
        ]
    )
    for o in outcomes:
        w.writerow(
            [
                o.path,
                len(o.cells),
                o.width or "",
                o.height or "",
                _num(o.um_per_px, 5),
                o.scale_source or "",
                o.red_cells,
                o.method,
                o.tiles,
                o.overlay or "",
                " | ".join(o.warnings),
                o.error or "",
            ]
        )
    fields_path = out / FIELDS_CSV
    atomic_write_text(fields_path, buf.getvalue(), escape=True)

    json_path = out / DETECTIONS_JSON
    atomic_write_json(
        json_path,
        {
            "marrowscope_version": __version__,
            "settings": dict(settings or {}),
            "classes": list(classes or []),
            "totals": {
                "fields": len(outcomes),
                "fields_with_error": sum(o.error is not None for o in outcomes),
                "fields_without_cells": sum(o.error is None and not o.cells for o in outcomes),
                "cells": sum(len(o.cells) for o in outcomes),
            },
            "fields": [o.to_dict() for o in outcomes],
        },
        escape=True,
    )
    remove_stale_overlays(out, [o.overlay for o in outcomes if o.overlay])
    return {"detections": det_path, "fields": fields_path, "json": json_path}

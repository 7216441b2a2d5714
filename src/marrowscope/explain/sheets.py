"""Explain outputs on disk: one overlay PNG per image, contact sheets, an index CSV.

Contact sheets are :class:`matplotlib.figure.Figure` objects on their own Agg canvas (no
``pyplot`` state). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from marrowscope.explain.gradcam import (
    DEFAULT_BATCH,
    DEFAULT_METHOD,
    CamResult,
    check_method,
    class_index,
    gradcam_preprocessed,
)
from marrowscope.utils.image import ImageReadError, list_image_files
from marrowscope.utils.io import atomic_write, atomic_write_bytes, printable_data

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from marrowscope.inference.predictor import Predictor

__all__ = [
    "CONTACT_SHEET",
    "ExplainSummary",
    "contact_sheet_figure",
    "encode_png",
    "explain_to_folder",
    "list_images",
    "overlay_filename",
    "write_contact_sheets",
]

CONTACT_SHEET = "contact_sheet.png"
"""Name of the first contact sheet page (later pages: ``contact_sheet_2.png`` ...)."""

SHEET_COLUMNS = 4
"""Images per contact-sheet row (each shows the cell and its overlay side by side)."""

SHEET_PAGE = 40
"""Images per contact-sheet page; more images make more pages."""

THUMB = 160
"""Side of each picture on a contact sheet, in pixels."""


def list_images(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Image files below ``folder`` and the other files: :func:`~marrowscope.utils.image.list_image_files`."""
    return list_image_files(folder)


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB ``uint8`` array -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def overlay_filename(name: str, taken: set[str]) -> str:
    """``<stem>_gradcam.png`` for an image name, made filesystem-safe and unique within ``taken``.

    The chosen name is added to ``taken``.
    """
    stem = _UNSAFE.sub("_", Path(name).stem).strip("._") or "image"
    stem = stem[:120]
    candidate = f"{stem}_gradcam.png"
    n = 2
    while candidate.lower() in taken:
        candidate = f"{stem}_{n}_gradcam.png"
        n += 1
    taken.add(candidate.lower())
    return candidate


def _thumb(rgb: np.ndarray, side: int = THUMB) -> np.ndarray:
    import cv2

    if rgb.shape[0] == side and rgb.shape[1] == side:
        return rgb
    interp = cv2.INTER_AREA if max(rgb.shape[:2]) > side else cv2.INTER_LINEAR
    return cv2.resize(rgb, (side, side), interpolation=interp)


@dataclass(frozen=True)
class SheetItem:
    """One contact-sheet entry: the cell, its overlay (both thumbnails) and its caption."""

    name: str
    rgb: np.ndarray
    overlay: np.ndarray
    predicted: str
    confidence: float
    target: str
    target_probability: float

    @classmethod
    def from_result(cls, r: CamResult) -> SheetItem:
        return cls(
            name=r.name,
            rgb=_thumb(r.rgb),
            overlay=_thumb(r.overlay),
            predicted=r.predicted,
            confidence=r.confidence,
            target=r.target,
            target_probability=r.target_probability,
        )


def _shorten(text: str, n: int = 30) -> str:
    return text if len(text) <= n else text[: n // 2 - 1] + "…" + text[-(n // 2 - 1) :]


def contact_sheet_figure(items: Sequence[SheetItem], *, columns: int = SHEET_COLUMNS) -> Figure:
    """A grid of cells: each the preprocessed image and its Grad-CAM overlay side by side, with
    the file name, the predicted class and its confidence (and the explained class when it is
    not the predicted one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(items))
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.05 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    gap = np.full((THUMB, 6, 3), 255, np.uint8)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(items):
            continue
        it = items[i]
        ax.imshow(np.hstack([_thumb(it.rgb), gap, _thumb(it.overlay)]), interpolation="none")
        label = f"{it.predicted} {it.confidence:.0%}"
        if it.target != it.predicted:
            label += f"  ·  CAM: {it.target} {it.target_probability:.0%}"
        ax.set_title(f"{label}\n{_shorten(it.name)}", fontsize=8.5, pad=3, loc="center")
    if not items:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    return fig


def write_contact_sheets(
    items: Sequence[SheetItem], out_dir: Path, *, page: int = SHEET_PAGE
) -> list[Path]:
    """Write ``contact_sheet.png`` (and ``contact_sheet_2.png`` ... for more than ``page`` images)."""
    paths: list[Path] = []
    for k, start in enumerate(range(0, max(1, len(items)), page)):
        fig = contact_sheet_figure(items[start : start + page])
        name = CONTACT_SHEET if k == 0 else f"contact_sheet_{k + 1}.png"
        path = Path(out_dir) / name
        try:
            atomic_write(path, lambda p, f=fig: f.savefig(p, format="png"))
        finally:
            fig.clear()
        paths.append(path)
    return paths


@dataclass
class ExplainSummary:
    """What :func:`explain_to_folder` wrote and skipped.

    Attributes:
        out_dir: the output folder.
        overlays: ``(image path, overlay PNG)`` per explained image.
        sheets: the contact sheet page(s).
        failed: ``(image path, message)`` per unreadable image.
        index: the CSV listing every image's prediction and overlay file.
    """

    out_dir: Path
    overlays: list[tuple[Path, Path]] = field(default_factory=list)
    sheets: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    index: Path | None = None


def explain_to_folder(
    predictor: Predictor,
    paths: Sequence[Path],
    out_dir: str | Path,
    *,
    target_class: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    method: str = DEFAULT_METHOD,
    on_progress: Callable[[int], None] | None = None,
) -> ExplainSummary:
    """Grad-CAM for image files: an overlay PNG per image, contact sheet(s) and ``explain.csv``.

    Unreadable images are skipped and listed in the summary; the others go through.

    Args:
        predictor: a torch-backend predictor.
        paths: image files.
        out_dir: output folder (created).
        target_class: class to explain; ``None``: each image's predicted class.
        batch_size: images per Grad-CAM pass.
        method: the class activation map method (:data:`~marrowscope.explain.gradcam.CAM_METHODS`),
            recorded in ``explain.csv``.
        on_progress: called with the number of images handled after each batch.

    Raises:
        ExplainError: unknown ``target_class`` or ``method``, or a non-torch predictor.
    """
    check_method(method)
    if target_class is not None:
        class_index(predictor.classes_, target_class)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExplainSummary(out_dir=out)
    taken: set[str] = set()
    items: list[SheetItem] = []
    rows: list[list[str]] = []
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start : start + batch_size]
        arrays, ok = [], []
        for p in chunk:
            try:
                arrays.append(predictor.preprocess(predictor.load(p)))
                ok.append(Path(p))
            except ImageReadError as e:
                summary.failed.append((Path(p), str(e)))
        if arrays:
            results = gradcam_preprocessed(
                predictor,
                arrays,
                names=[p.name for p in ok],
                paths=[str(p) for p in ok],
                target_class=target_class,
                batch_size=batch_size,
                method=method,
            )
            for p, r in zip(ok, results, strict=True):
                target = out / overlay_filename(p.name, taken)
                atomic_write_bytes(target, encode_png(r.overlay))
                summary.overlays.append((p, target))
                items.append(SheetItem.from_result(r))
                rows.append(
                    [
                        str(p),
                        target.name,
                        r.predicted,
                        f"{r.confidence:.6f}",
                        r.target,
                        f"{r.target_probability:.6f}",
                        method,
                    ]
                )
        if on_progress is not None:
            on_progress(len(chunk))
    if items:
        summary.sheets = write_contact_sheets(items, out)
    header = [
        "path",
        "overlay",
        "predicted",
        "confidence",
        "target",
        "target_probability",
        "method",
    ]

    def write_index(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*header, "error"])
            w.writerows(printable_data([*r, ""]) for r in rows)  # odd bytes of names escaped
            w.writerows(
                printable_data([str(p), "", "", "", "", "", "", msg]) for p, msg in summary.failed
            )

    summary.index = out / "explain.csv"
    atomic_write(summary.index, write_index)
    return summary

"""``marrowscope detect``: find (and classify) the white cells of many fields and write the files.

:func:`detect_fields` runs :func:`~marrowscope.inference.fields.analyze_field` over field files,
one at a time (a field is a whole image; a crop is not expected here), draws an overlay per field
and writes ``detections.csv``, ``fields.csv`` and ``detections.json``
(:mod:`marrowscope.reports.detect_files`). A field that cannot be used (unreadable, too large,
or any other failure on that field, a failed overlay write or running out of memory included)
is recorded with its error and the run goes on; a field without a white cell is recorded with
zero cells. Overlays of an earlier run into the same folder that this run did not write are
removed, and ``overlays/`` carries a marker so that a later run over a folder holding this one
does not take the overlays for fields.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.inference.fields import (
    CropSpec,
    FieldDetector,
    FieldError,
    FieldResult,
    analyze_field,
    crop_spec,
    load_field,
)
from marrowscope.reports.detect_files import (
    DetectedCell,
    FieldOutcome,
    draw_overlay,
    overlay_name,
    prepare_overlays,
    write_detect_outputs,
    write_overlay,
)
from marrowscope.utils.progress import make_progress

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "DetectRun",
    "detect_fields",
    "field_failure",
    "mark_model_scale",
    "new_failure_log",
    "outcome_of",
]

log = logging.getLogger(__name__)


_said_traceback = False


def new_failure_log() -> None:
    """Start a run: its first unexpected field failure is logged with its traceback."""
    global _said_traceback
    _said_traceback = False


def field_failure(name: str, error: BaseException) -> str:
    """The message recorded for a field that failed with an unexpected ``error``.

    The first such failure of a run (:func:`new_failure_log`) is logged with its traceback at
    ERROR (an unexpected
    error may be a bug, not a bad field: it must not hide among the per-field rows); later ones
    go to the debug log (``--verbose``)."""
    global _said_traceback
    if not _said_traceback and not isinstance(error, MemoryError):
        _said_traceback = True
        log.error(
            "field %s failed with an unexpected error (recorded as that field's error; the "
            "other fields go on); please report it if the field looks fine",
            name,
            exc_info=error,
        )
    else:
        log.debug("field %s failed", name, exc_info=error)
    if isinstance(error, MemoryError):
        return (
            f"{name}: not enough memory to process this field; cut it into smaller fields or "
            "free memory"
        )
    text = str(error)
    return f"{name}: {type(error).__name__}: {text}" if name not in text else text


def _with_overlay(
    outcome: FieldOutcome,
    rgb: np.ndarray,
    out: Path,
    rel: str,
    classes: Sequence[str] | None,
) -> FieldOutcome:
    """Draw and write the field's overlay; a failure to write it (a full disk) keeps the cells
    found and says so on the field instead of losing them."""
    note = None if outcome.cells else "no white cell found"
    try:
        write_overlay(out / rel, draw_overlay(rgb, outcome.cells, classes=classes, note=note))
    except Exception as e:  # noqa: BLE001 - a full disk, out of memory: the cells are kept
        log.warning("%s: the overlay could not be written: %s", outcome.path, e)
        return dataclasses.replace(
            outcome,
            overlay=None,
            warnings=(*outcome.warnings, f"the overlay could not be written ({e})"),
        )
    return outcome


@dataclass(frozen=True)
class DetectRun:
    """The result of :func:`detect_fields`.

    Attributes:
        outcomes: one per field, in input order.
        files: the written files (``detections``, ``fields``, ``json``).
        seconds: wall time of detection + classification (file writing excluded).
        crop: the classifier's crop scale (``None`` without a classifier).
    """

    outcomes: tuple[FieldOutcome, ...]
    files: dict[str, Path]
    seconds: float
    crop: CropSpec | None = None

    @property
    def cells(self) -> int:
        return sum(len(o.cells) for o in self.outcomes)


def outcome_of(path: str, result: FieldResult, overlay: str | None = None) -> FieldOutcome:
    """A field's :class:`FieldOutcome` from its :class:`FieldResult`."""
    d = result.detections
    by_index = {c.index: c for c in result.cells}
    cells = []
    for i, (b, s) in enumerate(zip(d.boxes, d.scores, strict=True)):
        c = by_index.get(i)
        cells.append(
            DetectedCell(
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                score=float(s),
                label=c.predicted if c else None,
                confidence=c.confidence if c else None,
                probs=c.probs if c else None,
            )
        )
    return FieldOutcome(
        path=path,
        cells=tuple(cells),
        width=d.width,
        height=d.height,
        um_per_px=d.scale.um_per_px,
        scale_source=d.scale.source,
        red_cells=d.scale.red_cells,
        method=d.method,
        tiles=d.tiles,
        warnings=d.warnings,
        overlay=overlay,
    )


def detect_fields(
    paths: Sequence[str | os.PathLike[str]],
    detector: FieldDetector,
    out_dir: str | Path,
    *,
    predictor: Predictor | None = None,
    um_per_px: float | None = None,
    use_model_scale: bool = False,
    overlays: bool = True,
    progress: bool = True,
    on_field: Callable[[FieldOutcome], None] | None = None,
) -> DetectRun:
    """Detect (and classify) the white cells of every field; write overlays, CSVs and JSON.

    Args:
        paths: field image files.
        detector: the detector.
        out_dir: the output folder (created).
        predictor: a classifier, or ``None`` for boxes only.
        um_per_px: the fields' scale, if known (else each field's red cells are measured).
        use_model_scale: assume the fields have the classifier's training scale.
        overlays: draw ``overlays/*.png``.
        progress: show a progress bar.
        on_field: called with each field's outcome as it is done (e.g. to print warnings).
    """
    new_failure_log()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overlays:
        prepare_overlays(out)
    spec = crop_spec(predictor) if predictor is not None else None
    if use_model_scale:
        if spec is None:
            raise FieldError("the model's scale needs a classifier; pass one or give --um-per-px")
        um_per_px = spec.um_per_px
    classes = list(predictor.classes_) if predictor is not None else None
    outcomes: list[FieldOutcome] = []
    busy = 0.0
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Detecting", total=len(paths))
        for n, p in enumerate(paths):
            name = str(p)
            t0 = time.perf_counter()
            analysed = False
            try:
                rgb = load_field(p, name=name)
                result = analyze_field(
                    rgb, detector, predictor, um_per_px=um_per_px, spec=spec, name=name
                )
                busy += time.perf_counter() - t0
                analysed = True
                if use_model_scale:
                    result = mark_model_scale(result)
                rel = overlay_name(n, name) if overlays else None
                outcome = outcome_of(name, result, rel)
                if rel is not None:
                    outcome = _with_overlay(outcome, rgb, out, rel, classes)
            except FieldError as e:
                busy += 0.0 if analysed else time.perf_counter() - t0
                outcome = FieldOutcome(
                    path=name, method=getattr(detector, "name_", ""), error=str(e)
                )
            except Exception as e:  # noqa: BLE001 - one field's failure is that field's error
                busy += 0.0 if analysed else time.perf_counter() - t0
                outcome = FieldOutcome(
                    path=name, method=getattr(detector, "name_", ""), error=field_failure(name, e)
                )
            outcomes.append(outcome)
            if on_field is not None:
                on_field(outcome)
            bar.advance(task)
    settings: dict[str, Any] = {
        "detector": getattr(detector, "name_", None),
        "min_score": getattr(detector, "min_score_", None),
        "um_per_px": um_per_px,
        "scale": "the classifier's training scale"
        if use_model_scale
        else ("given" if um_per_px else "measured per field (red-cell ruler)"),
        "classifier": str(predictor.checkpoint) if predictor is not None else None,
        "crop": None
        if spec is None
        else {"um_per_px": spec.um_per_px, "side_px": spec.side_px, "source": spec.source},
    }
    files = write_detect_outputs(outcomes, out, classes=classes, settings=settings)
    return DetectRun(tuple(outcomes), files, busy, spec)


def mark_model_scale(result: FieldResult) -> FieldResult:
    """``result`` with its scale recorded as the classifier's training scale (source
    ``model``), for fields analysed at that scale because the user said so."""
    from dataclasses import replace

    d = result.detections
    return replace(result, detections=replace(d, scale=replace(d.scale, source="model")))

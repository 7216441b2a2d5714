"""Per-sample differential count with a hairy-cell flag: one folder = one patient sample.

:func:`count_sample` classifies every image below the sample folder through the predictor (the
same path as ``predict``), then applies the counting rule of :mod:`marrowscope.metrics.counting`:
a cell whose top probability is below ``threshold`` goes to the *unidentified* bin and is not
counted; the differential (count and percentage per class, over the identified cells) lists every
class of the model, zeros included; the hairy-cell flag fires when the cells called HAC reach
``hac_min_percent`` of the identified cells *or* ``hac_min_count`` cells (research settings, not a
clinical decision rule). The flag comes with its evidence: the highest-scoring HAC cells and their
Grad-CAM maps, drawn here. A model without a HAC class gets the status ``"not available"``.

:func:`write_count_outputs` writes ``report.html``, ``count.json`` and ``cells.csv``, with the
pictures the page shows under ``cells/``. It and :class:`CountResult` live in
:mod:`marrowscope.reports.count_files`, :class:`CountError` in :mod:`marrowscope.metrics.counting`;
they are re-exported here, so one module gives a caller a sample's count, its report folder and
the error to catch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.metrics.counting import (
    DEFAULT_EVIDENCE,
    DEFAULT_HAC_MIN_COUNT,
    DEFAULT_HAC_MIN_PERCENT,
    DEFAULT_THRESHOLD,
    HAC_CLASS,
    CountError,
    Evidence,
    check_settings,
    select_evidence,
    tally,
)
from marrowscope.reports.count_files import CellCall, CountResult, write_count_outputs
from marrowscope.utils.image import IMAGE_EXTENSIONS, ImageReadError

if TYPE_CHECKING:
    from marrowscope.inference.fields import FieldDetector
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "CountError",
    "CountResult",
    "count_fields",
    "count_sample",
    "field_like_images",
    "write_count_outputs",
]


def _sample_files(sample_dir: Path, *, fields: bool = False) -> tuple[list[Path], list[Path]]:
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
        if fields:
            raise CountError(
                f"{sample_dir}: no field images in this sample folder or its sub-folders{extra}; "
                "with --fields a sample is one folder of whole fields of view "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        raise CountError(
            f"{sample_dir}: no cell images in this sample folder or its sub-folders{extra}; a "
            f"sample is one folder of single-cell images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return images, others


def _model_info(predictor: Predictor) -> dict[str, Any]:
    meta = predictor.bundle_metadata_
    return {
        "arch": meta.arch,
        "name": (meta.config or {}).get("name"),
        "classes": list(predictor.classes_),
        "bundle_version": meta.marrowscope_version,
        "checkpoint": str(predictor.checkpoint or ""),
        "backend": predictor.backend,
        "input_size": meta.input_size,
        "denoise": bool((meta.preprocess or {}).get("denoise", False)),
    }


def _evidence(
    predictor: Predictor, cells: Sequence[CellCall], hac: str, classes: Sequence[str], n: int
) -> tuple[tuple[Evidence[CellCall], ...], str | None]:
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
            arrays.append(predictor.preprocess(_cell_image(predictor, c)))
            kept.append(c)
        except (ImageReadError, ValueError):
            continue  # changed on disk since it was classified
    results = gradcam_preprocessed(predictor, arrays, names=[c.rel for c in kept], target_class=hac)
    return tuple(
        Evidence(c, float(c.probs[idx]), rgb=r.rgb, overlay=r.overlay)
        for c, r in zip(kept, results, strict=True)
    ), None


def _cell_image(predictor: Predictor, cell: CellCall) -> np.ndarray:
    """The image the model classified: the file, or the cell's crop from its field."""
    if cell.box is None:
        return predictor.load(cell.path)
    from marrowscope.inference.fields import cell_crop, crop_spec, load_field
    from marrowscope.preprocess.fields import FieldScale

    rgb = load_field(cell.path)
    scale = FieldScale(um_per_px=float(cell.um_per_px or 0.0), source="recorded")
    return cell_crop(rgb, cell.box, scale, crop_spec(predictor))


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
    decode: str = "auto",
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
        workers: decoding threads or processes (0 = one per core).
        progress: show a progress bar.
        decode: where the images are decoded (:data:`~marrowscope.inference.batching.DECODE_MODES`).

    Raises:
        CountError: a missing/empty sample folder or a setting out of range.
    """
    check_settings(threshold, hac_min_percent, hac_min_count, evidence)
    folder = Path(sample_dir).expanduser()
    images, others = _sample_files(folder)
    classes = tuple(str(c) for c in predictor.classes_)
    cells: list[CellCall] = []
    unreadable: list[tuple[str, str]] = []
    for res in predictor.predict_paths(images, workers=workers, progress=progress, decode=decode):
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
    return _counted(
        predictor,
        folder,
        classes,
        cells,
        unreadable,
        others,
        threshold=threshold,
        hac_min_percent=hac_min_percent,
        hac_min_count=hac_min_count,
        evidence=evidence,
        hac_class=hac_class,
    )


def _counted(
    predictor: Predictor,
    folder: Path,
    classes: tuple[str, ...],
    cells: list[CellCall],
    unreadable: list[tuple[str, str]],
    others: Sequence[Path],
    *,
    threshold: float,
    hac_min_percent: float,
    hac_min_count: int,
    evidence: int,
    hac_class: str,
    **extra: Any,
) -> CountResult:
    """The count of a sample's classified cells: the differential of the identified ones, the
    hairy-cell flag with its Grad-CAM evidence, and the result (``extra``: the fields' part)."""
    t = tally(
        (c.predicted for c in cells if c.identified),
        classes,
        hac_class=hac_class,
        hac_min_percent=hac_min_percent,
        hac_min_count=hac_min_count,
    )
    flag = t.flag
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
        counts=t.counts,
        percents=t.percents,
        unreadable=tuple(unreadable),
        ignored=tuple(str(p) for p in others),
        flag=flag,
        model=_model_info(predictor),
        **extra,
    )


def count_fields(
    predictor: Predictor,
    sample_dir: str | Path,
    detector: FieldDetector,
    *,
    um_per_px: float | None = None,
    use_model_scale: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    hac_min_percent: float = DEFAULT_HAC_MIN_PERCENT,
    hac_min_count: int = DEFAULT_HAC_MIN_COUNT,
    evidence: int = DEFAULT_EVIDENCE,
    hac_class: str = HAC_CLASS,
    progress: bool = True,
) -> CountResult:
    """The differential count of one sample given as whole fields of view.

    Every image below ``sample_dir`` is a field: its white cells are found by ``detector``, cut
    out at the classifier's scale and classified through ``predictor`` (TTA, calibration), then
    counted with the same rule, unidentified bin and hairy-cell flag as :func:`count_sample`.
    Each cell keeps its field and box (``CellCall.field_rel``, ``CellCall.box``); the result's
    ``fields`` lists every readable field, those without a white cell included; ``unreadable``
    every field that could not be used, with its reason (any error on one field is that field's
    error: the other fields are still counted). The result's ``mode`` is ``"fields"``, also when
    no field could be used.

    Args:
        predictor: the classifier.
        sample_dir: the sample folder (fields found recursively).
        detector: the white-cell detector.
        um_per_px: the fields' scale, if known (else measured on each field's red cells).
        use_model_scale: assume the fields have the classifier's training scale (recorded as
            scale source ``model``, as ``detect`` does; ``um_per_px`` is then ignored).
        threshold, hac_min_percent, hac_min_count, evidence, hac_class: as :func:`count_sample`.
        progress: show a progress bar.

    Raises:
        CountError: a missing/empty sample folder or a setting out of range.
    """
    from marrowscope.engine.detect import (
        field_failure,
        mark_model_scale,
        new_failure_log,
        outcome_of,
    )
    from marrowscope.inference.fields import FieldError, analyze_field, crop_spec
    from marrowscope.utils.progress import make_progress

    new_failure_log()
    check_settings(threshold, hac_min_percent, hac_min_count, evidence)
    folder = Path(sample_dir).expanduser()
    images, others = _sample_files(folder, fields=True)
    classes = tuple(str(c) for c in predictor.classes_)
    spec = crop_spec(predictor)
    if use_model_scale:
        um_per_px = spec.um_per_px
    cells: list[CellCall] = []
    fields = []
    unreadable: list[tuple[str, str]] = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Fields", total=len(images))
        for path in images:
            rel_field = Path(os.path.relpath(path, folder)).as_posix()
            try:
                res = analyze_field(
                    path, detector, predictor, um_per_px=um_per_px, spec=spec, name=str(path)
                )
                if use_model_scale:
                    res = mark_model_scale(res)
            except FieldError as e:
                unreadable.append((str(path), str(e)))
                bar.advance(task)
                continue
            except Exception as e:  # noqa: BLE001 - one field's failure is that field's error
                unreadable.append((str(path), field_failure(str(path), e)))
                bar.advance(task)
                continue
            fields.append(outcome_of(str(path), res))
            for c in res.cells:
                cells.append(
                    CellCall(
                        path=str(path),
                        rel=f"{rel_field}#{c.index + 1}",
                        predicted=c.predicted,
                        confidence=c.confidence,
                        identified=c.confidence >= threshold,
                        probs=c.probs,
                        field_rel=rel_field,
                        box=c.box,
                        um_per_px=res.detections.scale.um_per_px,
                    )
                )
            bar.advance(task)
    return _counted(
        predictor,
        folder,
        classes,
        cells,
        unreadable,
        others,
        threshold=threshold,
        hac_min_percent=hac_min_percent,
        hac_min_count=hac_min_count,
        evidence=evidence,
        hac_class=hac_class,
        mode="fields",
        fields=tuple(fields),
        detector={
            "name": getattr(detector, "name_", None),
            "min_score": getattr(detector, "min_score_", None),
            "um_per_px": um_per_px,
            "crop": {"um_per_px": spec.um_per_px, "side_px": spec.side_px, "source": spec.source},
        },
    )


def field_like_images(
    paths: Sequence[str | Path], detector: FieldDetector, *, limit: int = 16
) -> list[tuple[str, int]]:
    """The single-cell images that look like whole fields, when enough of them do.

    Up to ``limit`` images, evenly spread, are checked with
    :func:`~marrowscope.preprocess.fields.looks_like_field` (red cells all around and no white
    cell in the middle as a crop has). One odd image is not a sample of fields: the images are
    returned only when at least a quarter of those checked look like fields, and at least two
    (one when only one image was checked). Measured on real images in ``docs/fields.md``.

    Returns:
        ``(path, white cells found)`` per field-like image; empty when the sample looks like crops.
    """
    from marrowscope.inference.fields import FieldError
    from marrowscope.preprocess.fields import looks_like_field

    if not paths:
        return []
    step = max(1, len(paths) // limit)
    checked = 0
    out = []
    for p in list(paths)[::step][:limit]:
        try:
            d = detector.detect(p)
        except (FieldError, ImageReadError):
            continue
        checked += 1
        red = d.scale.red_cells if d.scale.source == "ruler" else 0
        if looks_like_field(d.boxes, d.width, d.height, red_cells=red):
            out.append((str(p), len(d)))
    needed = 1 if checked == 1 else max(2, math.ceil(checked / 4))
    return out if len(out) >= needed else []

"""The model inside the app: one :class:`ModelHandle` around the one ``Predictor``, and the
background :class:`ClassificationWorker` that classifies uploaded cells.

Every model call (background classification, ``/api/predict``, Grad-CAM) goes through the
handle's lock: Grad-CAM attaches hooks to the network, so no other forward pass may run at the
same time. The worker reads pending cells in one short transaction, runs the model outside any
transaction and writes the results in another, so requests are never blocked by inference.
After a crash the cells still ``pending`` are simply picked up again on the next start.

Whole fields of view go first: the worker runs the field detector on each pending field (outside
any transaction), cuts every white cell out at the classifier's scale (:mod:`.fields`), stores
the crops and records them as pending cells of the field in one transaction; the classifier then
picks them up like uploaded crops. A field that cannot be searched gets ``status = error`` and
the reason; a field with no white cell is ``done`` with ``found = 0``.

A signed sample is never written to: the write transaction locks the rows of the batch's
samples (the lock a sign-off takes) and drops, with a warning in the log, the results of any
sample that was signed off while the model ran; cells of signed samples are not read as work.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.service.db import Database
from marrowscope.service.models import (
    CELL_DONE,
    CELL_ERROR,
    CELL_PENDING,
    ORIGIN_DETECTED,
    AuditEvent,
    Cell,
    Field,
    Sample,
)
from marrowscope.service.storage import ImageStore

if TYPE_CHECKING:
    from marrowscope.inference.fields import CropSpec, FieldDetector
    from marrowscope.inference.predictor import Predictor

__all__ = ["DETECTOR_USER", "MODEL_USER", "ClassificationWorker", "ModelHandle", "ModelInfo"]

log = logging.getLogger(__name__)

MODEL_USER = "model"
"""The user name audit events of the background classifier carry."""

DETECTOR_USER = "detector"
"""The user name audit events of the field detector carry."""


@dataclass(frozen=True)
class ModelInfo:
    """What the app tells about its model (``/api/model``, reports, each cell's call).

    Attributes:
        name: the training config's name (or the architecture).
        arch: the registry architecture name.
        version: ``arch:<first 12 hex of the weights' SHA-256>`` (of the int8 model's own
            ``model.bin`` for the int8 backend); stored with every call.
        marrowscope_version: the marrowscope version that wrote the bundle.
        classes: class names in index order.
        input_size: pixels.
        backend: ``torch``, ``onnx`` or ``int8``.
        checkpoint: the bundle path (empty for an in-memory model).
    """

    name: str
    arch: str
    version: str
    marrowscope_version: str
    classes: tuple[str, ...]
    input_size: int
    backend: str
    checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "arch": self.arch,
            "version": self.version,
            "marrowscope_version": self.marrowscope_version,
            "classes": list(self.classes),
            "input_size": self.input_size,
            "backend": self.backend,
            "checkpoint": self.checkpoint,
        }


def _weights_digest(predictor: Predictor) -> str:
    from marrowscope.models.bundle import WEIGHTS_NAME
    from marrowscope.utils.io import file_sha256

    ckpt = getattr(predictor, "checkpoint", None)
    if ckpt:
        p = Path(ckpt)
        candidates = (
            # an int8 model's calls differ from its fp32 source's: its own file names the version
            getattr(predictor, "int8_path_", None),
            p / WEIGHTS_NAME,
            getattr(predictor, "onnx_path_", None),
            p,
        )
        for candidate in candidates:
            if candidate is not None and Path(candidate).is_file():
                digest = file_sha256(candidate)
                margin = getattr(predictor, "recheck_margin_", 0.0)
                if candidate == getattr(predictor, "int8_path_", None) and margin > 0:
                    # the fp32 re-check changes some calls: its margin is part of the version
                    digest = hashlib.sha256(f"{digest}:recheck={margin:g}".encode()).hexdigest()
                return digest
    h = hashlib.sha256()
    for key, tensor in sorted(predictor.model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


class ModelHandle:
    """The app's one predictor, with a lock and its :class:`ModelInfo`.

    Args:
        predictor: a loaded :class:`~marrowscope.inference.predictor.Predictor`.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()
        meta = predictor.bundle_metadata_
        arch = meta.arch
        self.info = ModelInfo(
            name=str((meta.config or {}).get("name") or arch),
            arch=arch,
            version=f"{arch}:{_weights_digest(predictor)[:12]}",
            marrowscope_version=meta.marrowscope_version,
            classes=tuple(str(c) for c in predictor.classes_),
            input_size=int(predictor.input_size),
            backend=str(getattr(predictor, "backend", "torch")),
            checkpoint=str(getattr(predictor, "checkpoint", "") or ""),
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in index order."""
        return self.info.classes

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """``Predictor.predict_proba`` under the lock."""
        with self.lock:
            return self.predictor.predict_proba(list(images))

    def gradcam_png(self, path: Path, target_class: str | None = None) -> bytes:
        """The Grad-CAM overlay of one image as PNG bytes (explains the predicted class, or
        ``target_class``).

        Raises:
            ExplainError: the model cannot be explained (ONNX or int8 backend, unknown class).
            ImageReadError: the image cannot be read.
        """
        from PIL import Image

        from marrowscope.explain.gradcam import gradcam

        with self.lock:
            (res,) = gradcam(self.predictor, [path], target_class=target_class)
        buf = io.BytesIO()
        Image.fromarray(res.overlay).save(buf, format="PNG")
        return buf.getvalue()


class ClassificationWorker:
    """A daemon thread that classifies pending cells, oldest first, in batches.

    Args:
        db: the database.
        store: the image store.
        model: the model handle.
        batch_size: cells per model call.
        detector: the field detector's name (``wbc2``, ``classical``, a folder), loaded at the
            first field.
    """

    def __init__(
        self,
        db: Database,
        store: ImageStore,
        model: ModelHandle,
        batch_size: int,
        *,
        detector: str = DEFAULT_DETECTOR,
    ) -> None:
        self.db = db
        self.store = store
        self.model = model
        self.batch_size = batch_size
        self.detector_name = detector
        self._detector: FieldDetector | None = None
        self._crop_spec: CropSpec | None = None
        self._field_lock = threading.Lock()
        self._cond = threading.Condition()
        self._generation = 0
        self._idle = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (it first picks up cells left pending by an earlier run)."""
        self._thread = threading.Thread(target=self._run, name="marrowscope-classify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to finish its batch and stop; wait up to ``timeout`` seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """New pending cells were committed: wake the thread."""
        with self._cond:
            self._generation += 1
            self._idle = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no cell is pending (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._idle or self._stopping, timeout)

    @property
    def idle(self) -> bool:
        """True when the thread found nothing left to classify."""
        return self._idle

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                generation = self._generation
            try:
                worked = self.process_field() or self.process_batch()
            except Exception:  # keep serving: log, then retry after a pause
                log.exception("background classification failed; retrying")
                with self._cond:
                    self._cond.wait(2.0)
                continue
            if worked:
                continue
            with self._cond:
                if self._generation == generation and not self._stopping:
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait_for(
                        lambda g=generation: self._generation != g or self._stopping
                    )
                if self._stopping:
                    return
                self._idle = False

    # ------------------------------------------------------------------------------------ fields

    def crop_spec(self) -> CropSpec:
        """How the classifier's training crops were cut (scale, side), worked out once."""
        if self._crop_spec is None:
            from marrowscope.inference.fields import crop_spec

            self._crop_spec = crop_spec(self.model.predictor)
        return self._crop_spec

    def detector(self) -> FieldDetector:
        """The field detector, loaded at the first field."""
        with self._field_lock:
            if self._detector is None:
                from marrowscope.inference.fields import FieldDetector

                self._detector = FieldDetector.load(self.detector_name)
            return self._detector

    def process_field(self) -> bool:
        """Search the oldest pending field of an unsigned sample for white cells and add them
        as pending cells; False when no field was pending."""
        from marrowscope.service.fields import find_cells

        with self.db.read() as s:
            row = s.execute(
                select(Field.id, Field.stored_path, Field.sample_id)
                .join(Sample, Sample.id == Field.sample_id)
                .where(
                    Field.status == CELL_PENDING,
                    Sample.signed_at.is_(None),
                    Sample.deleted_at.is_(None),
                )
                .order_by(Field.id)
                .limit(1)
            ).first()
        if row is None:
            return False
        error: str | None = None
        findings = None
        stored: list[tuple[str, str]] = []
        side = 0
        try:  # every step that can fail on this field: an error here is said on the field, not
            # raised, or the same field would be picked again and block all classification
            spec = self.crop_spec()
            side = spec.side_px
            findings = find_cells(self.store.path(row.stored_path), self.detector(), spec)
            try:
                stored = [self.store.put(c.png, "png") for c in findings.cells]
            except OSError as e:  # a full or read-only image store
                raise OSError(f"the crops of the cells found could not be stored: {e}") from e
        except Exception as e:  # FieldError, BundleError, ImageReadError ...: said on the field
            log.warning("field %d could not be searched: %s", row.id, e)
            error = str(e)[:500] or type(e).__name__
            findings, stored = None, []
        with self.db.write() as s:
            sample = s.scalar(select(Sample).where(Sample.id == row.sample_id).with_for_update())
            field = s.get(Field, row.id)
            if (
                sample is None
                or field is None
                or field.status != CELL_PENDING
                or sample.signed
                or sample.deleted_at is not None
            ):
                return True
            if findings is None:
                field.status = CELL_ERROR
                field.error = error
                s.add(
                    AuditEvent(
                        user_id=None,
                        username=DETECTOR_USER,
                        action="field.error",
                        sample_id=sample.id,
                        new_value={"field": field.id, "name": field.original_name, "error": error},
                    )
                )
                return True
            existing = set(s.scalars(select(Cell.sha256).where(Cell.sample_id == sample.id)))
            added = 0
            for i, (cut, (sha, rel)) in enumerate(zip(findings.cells, stored, strict=True)):
                if sha in existing:
                    continue
                existing.add(sha)
                s.add(
                    Cell(
                        sample_id=sample.id,
                        sha256=sha,
                        stored_path=rel,
                        original_name=f"{field.original_name} · cell {i + 1}"[-255:],
                        width=side,
                        height=side,
                        status=CELL_PENDING,
                        uploaded_by_id=field.uploaded_by_id,
                        field_id=field.id,
                        box_x0=cut.box[0],
                        box_y0=cut.box[1],
                        box_x1=cut.box[2],
                        box_y1=cut.box[3],
                        detection_score=cut.score,
                        origin=ORIGIN_DETECTED,
                    )
                )
                added += 1
            field.status = CELL_DONE
            field.found = len(findings.cells)
            field.um_per_px = findings.um_per_px
            field.scale_source = findings.scale_source
            field.detector = findings.detector
            field.warnings = list(findings.warnings)
            s.add(
                AuditEvent(
                    user_id=None,
                    username=DETECTOR_USER,
                    action="field.detected",
                    sample_id=sample.id,
                    new_value={
                        "field": field.id,
                        "name": field.original_name,
                        "cells": added,
                        "already_in_sample": len(findings.cells) - added,
                        "detector": findings.detector,
                        "um_per_px": round(findings.um_per_px, 5),
                        "scale": findings.scale_source,
                        "warnings": list(findings.warnings),
                    },
                )
            )
        return True

    # ------------------------------------------------------------------------------------- cells

    def process_batch(self) -> bool:
        """Classify up to ``batch_size`` pending cells of unsigned samples; False when none was
        pending."""
        with self.db.read() as s:
            rows = s.execute(
                select(Cell.id, Cell.stored_path, Cell.sample_id)
                .join(Sample, Sample.id == Cell.sample_id)
                .where(
                    Cell.status == CELL_PENDING,
                    Sample.signed_at.is_(None),
                    Sample.deleted_at.is_(None),
                )
                .order_by(Cell.id)
                .limit(self.batch_size)
            ).all()
        if not rows:
            return False
        results = self._classify([self.store.path(r.stored_path) for r in rows])
        self.save_results(rows, results)
        return True

    def save_results(
        self, rows: Sequence[Any], results: Sequence[tuple[np.ndarray | None, str | None]]
    ) -> int:
        """Write the model's results for ``rows`` (``id``, ``sample_id``) in one transaction.

        The rows of the batch's samples are locked first (``SELECT ... FOR UPDATE`` on
        PostgreSQL; SQLite's write transaction holds the database lock), the lock a sign-off
        holds while it checks the cells, so a sample is either signed off before this write
        (its results are then dropped and logged: a signed record never changes) or after it
        (the sign-off then sees the cells classified). A cell no longer pending is skipped.

        Returns:
            How many cells were written.
        """
        version = self.model.info.version
        classes = self.model.classes
        per_sample: dict[int, int] = {}
        with self.db.write() as s:
            samples = {
                sample.id: sample
                for sample in s.scalars(
                    select(Sample)
                    .where(Sample.id.in_(sorted({r.sample_id for r in rows})))
                    .order_by(Sample.id)
                    .with_for_update()
                )
            }
            dropped: dict[int, int] = {}
            for row, (probs, error) in zip(rows, results, strict=True):
                sample = samples.get(row.sample_id)
                if sample is None:
                    continue
                if sample.signed:
                    dropped[sample.id] = dropped.get(sample.id, 0) + 1
                    continue
                cell = s.get(Cell, row.id)
                if cell is None or cell.status != CELL_PENDING:
                    continue
                cell.model_version = version
                if probs is None:
                    cell.status = CELL_ERROR
                    cell.error = error
                else:
                    top = int(np.argmax(probs))
                    cell.status = CELL_DONE
                    cell.predicted_label = classes[top]
                    cell.confidence = float(probs[top])
                    cell.probabilities = [round(float(p), 6) for p in probs]
                per_sample[row.sample_id] = per_sample.get(row.sample_id, 0) + 1
            for sample_id, n in per_sample.items():
                s.add(
                    AuditEvent(
                        user_id=None,
                        username=MODEL_USER,
                        action="cells.classified",
                        sample_id=sample_id,
                        new_value={"cells": n, "model": version},
                    )
                )
            for sample_id, n in dropped.items():
                sample = samples[sample_id]
                log.warning(
                    "dropped the model's results for %d cell(s) of sample %s: it was signed off "
                    "(%s UTC, by user id %s) while they were being classified, and a signed "
                    "sample is never changed",
                    n,
                    sample.code,
                    f"{sample.signed_at:%Y-%m-%d %H:%M:%S}",
                    sample.signed_by_id,
                )
        return sum(per_sample.values())

    def _classify(self, paths: list[Path]) -> list[tuple[np.ndarray | None, str | None]]:
        try:
            probs = self.model.predict_proba(paths)
            return [(p, None) for p in probs]
        except Exception:  # one bad file: classify one by one to name it
            out: list[tuple[np.ndarray | None, str | None]] = []
            for p in paths:
                try:
                    out.append((self.model.predict_proba([p])[0], None))
                except Exception as e:
                    out.append((None, f"{type(e).__name__}: {e}"[:500]))
            return out

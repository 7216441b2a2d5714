"""What the app does, independent of HTTP: samples, uploads, re-classification, sign-off,
the differential count (and its report CSV) and the audit trail; whole fields of view (their
detected cells and cells a reviewer adds on a field); cells rejected (a field's cell as "not a
white cell", an uploaded crop as "not a countable cell"), which leave the count. The pages and
the API both go through these functions; list functions take ``skip``/``limit``, applied in SQL.

Every change writes an :class:`~marrowscope.service.models.AuditEvent` in the same transaction,
so a change and its audit row are committed together or not at all. A signed sample refuses
every change (:class:`Conflict`). The differential count and the hairy-cell flag come from
:func:`marrowscope.metrics.counting.tally`, the same rule as ``marrowscope count``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marrowscope.metrics.counting import Call, select_evidence, tally
from marrowscope.reports.count_report import CELL_NAMES
from marrowscope.service.db import Database
from marrowscope.service.models import (
    AGE_BANDS,
    CELL_DONE,
    CELL_ERROR,
    CELL_PENDING,
    ORIGIN_ADDED,
    REFERRAL_QUESTIONS,
    AuditEvent,
    Cell,
    Field,
    Sample,
    User,
    utcnow,
)
from marrowscope.service.settings import Settings
from marrowscope.service.storage import ImageStore
from marrowscope.service.uploads import Accepted, Rejected

if TYPE_CHECKING:
    from marrowscope.inference.fields import CropSpec

__all__ = [
    "AppError",
    "CLEARABLE",
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "REJECTED_CROP",
    "REJECTED_FIELD_CELL",
    "REPORT_COLUMNS",
    "SAME_CELL_SPAN",
    "SampleFields",
    "account_events",
    "add_cell_at_point",
    "add_cells",
    "add_field_cell",
    "add_fields",
    "audit",
    "audit_trail",
    "blocking_message",
    "cell_at",
    "cell_view",
    "check_uploadable",
    "counted",
    "create_sample",
    "current_label",
    "delete_sample",
    "ensure_editable",
    "field_cells",
    "field_message",
    "field_view",
    "fields_not_searched",
    "get_cell",
    "get_field",
    "get_sample",
    "identified",
    "list_samples",
    "reclassify",
    "reject_cell",
    "reject_reason",
    "rejected_cells",
    "report_csv",
    "report_data",
    "sample_cells",
    "sample_details",
    "sample_fields",
    "signoff",
    "signoff_message",
    "summary",
    "update_sample",
]

UNIDENTIFIED = "unidentified"
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AppError(Exception):
    """A request that cannot be done as asked; ``str(err)`` is shown to the user."""

    status = 400


class NotFound(AppError):
    status = 404


class Forbidden(AppError):
    status = 403


class Conflict(AppError):
    status = 409


class Invalid(AppError):
    status = 422


def audit(
    db: Session,
    user: User | None,
    action: str,
    *,
    sample_id: int | None = None,
    cell_id: int | None = None,
    old: Any = None,
    new: Any = None,
    username: str | None = None,
) -> None:
    """Add one audit event (committed with the caller's transaction)."""
    db.add(
        AuditEvent(
            at=utcnow(),
            user_id=None if user is None else user.id,
            username=username or (user.username if user else "system"),
            action=action,
            sample_id=sample_id,
            cell_id=cell_id,
            old_value=old,
            new_value=new,
        )
    )


def _page(query: Select[Any], skip: int, limit: int | None) -> Select[Any]:
    """``query`` with ``OFFSET skip`` and ``LIMIT limit`` (``None``: no limit), in SQL."""
    if skip:
        query = query.offset(skip)
    if limit is not None:
        query = query.limit(limit)
    return query


def audit_trail(
    db: Session, sample: Sample, *, skip: int = 0, limit: int | None = None
) -> list[dict[str, Any]]:
    """The sample's audit trail, oldest first, as the page and the API show it.

    Args:
        db: the session.
        sample: whose trail.
        skip: events to leave out at the start.
        limit: at most this many events (``None``: all).
    """
    events = db.scalars(
        _page(
            select(AuditEvent).where(AuditEvent.sample_id == sample.id).order_by(AuditEvent.id),
            skip,
            limit,
        )
    )
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "user": e.username,
            "action": e.action,
            "cell_id": e.cell_id,
            "old": e.old_value,
            "new": e.new_value,
        }
        for e in events
    ]


def account_events(db: Session, *, limit: int) -> list[AuditEvent]:
    """The latest ``limit`` audit events not tied to a sample (logins, logouts, users, tokens),
    newest first."""
    return list(
        db.scalars(
            select(AuditEvent)
            .where(AuditEvent.sample_id.is_(None))
            .order_by(AuditEvent.id.desc())
            .limit(limit)
        )
    )


# ------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class SampleFields:
    """The editable fields of a sample (``None`` = leave unchanged on update; the optional
    fields named in ``clear`` are emptied).

    ``seen``: the values the editor saw when they started (as :func:`_sample_dict` gives them,
    for the fields they send); a field that someone else changed since is not overwritten: the
    update is refused (a lost update otherwise, silent but for the audit trail).
    """

    code: str | None = None
    collected_on: date | None = None
    age_band: str | None = None
    referral_question: str | None = None
    notes: str | None = None
    clear: frozenset[str] = frozenset()
    seen: dict[str, Any] | None = None

    def check(self) -> None:
        """Raise :class:`Invalid` naming a bad value and what is accepted."""
        if self.code is not None and not _CODE.match(self.code):
            raise Invalid(
                f"sample id {self.code!r} is not accepted: use 1-64 letters, digits, '.', '_' or "
                "'-' (a pseudonymous id, never a patient name)"
            )
        if self.age_band is not None and self.age_band not in AGE_BANDS:
            raise Invalid(f"age band {self.age_band!r} is not one of: {', '.join(AGE_BANDS)}")
        if (
            self.referral_question is not None
            and self.referral_question != ""
            and self.referral_question not in REFERRAL_QUESTIONS
        ):
            raise Invalid(
                f"referral question {self.referral_question!r} is not one of: "
                f"{', '.join(REFERRAL_QUESTIONS)}"
            )
        if self.notes is not None and len(self.notes) > 10_000:
            raise Invalid(
                f"clinical notes are {len(self.notes):,} characters; keep them under 10,000"
            )
        cannot = sorted(self.clear - CLEARABLE)
        if cannot:
            raise Invalid(
                f"{', '.join(cannot)} cannot be emptied; give a value (only "
                f"{' and '.join(sorted(CLEARABLE))} can be emptied)"
            )


CLEARABLE = frozenset({"collected_on", "referral_question"})
"""The sample fields that may be emptied."""


def sample_details(sample: Sample) -> dict[str, Any]:
    """The sample's editable details as JSON-ready values (what the audit trail records)."""
    return _sample_dict(sample)


def _sample_dict(sample: Sample) -> dict[str, Any]:
    return {
        "code": sample.code,
        "collected_on": sample.collected_on.isoformat() if sample.collected_on else None,
        "age_band": sample.age_band,
        "referral_question": sample.referral_question,
        "notes": sample.notes,
    }


def _live_code_taken(db: Session, code: str) -> bool:
    """True when a sample that is not deleted has the id ``code`` (a deleted sample's id may be
    reused; the partial unique index ``uq_samples_code_live`` enforces the same rule)."""
    query = select(Sample.id).where(Sample.code == code, Sample.deleted_at.is_(None))
    return db.scalar(query) is not None


def create_sample(db: Session, user: User, fields: SampleFields) -> Sample:
    """Create a sample (``fields.code`` required; the id of a deleted sample may be reused).

    Raises:
        Invalid: a missing or bad field. Conflict: the sample id exists.
    """
    if not fields.code:
        raise Invalid("a sample needs a sample id (pseudonymous, e.g. BM-2025-0001)")
    fields.check()
    if _live_code_taken(db, fields.code):
        raise Conflict(f"sample id {fields.code!r} exists already; choose another id")
    sample = Sample(
        code=fields.code,
        collected_on=fields.collected_on,
        age_band=fields.age_band or "unknown",
        referral_question=fields.referral_question or None,
        notes=fields.notes or "",
        created_by_id=user.id,
        created_at=utcnow(),
    )
    db.add(sample)
    try:
        db.flush()
    except IntegrityError:
        raise Conflict(f"sample id {fields.code!r} exists already; choose another id") from None
    audit(db, user, "sample.create", sample_id=sample.id, new=_sample_dict(sample))
    return sample


def get_sample(db: Session, sample_id: int, *, lock: bool = False) -> Sample:
    """The sample (not deleted); ``lock`` takes a row lock for a change (PostgreSQL).

    Raises:
        NotFound: no such sample.
    """
    q = select(Sample).where(Sample.id == sample_id, Sample.deleted_at.is_(None))
    if lock:
        q = q.with_for_update()
    sample = db.scalar(q)
    if sample is None:
        raise NotFound(f"sample {sample_id} does not exist (or was deleted)")
    return sample


def check_uploadable(database: Database, sample_id: int) -> None:
    """Refuse an upload to a missing, deleted or signed sample before its files are judged and
    stored (in a short read transaction of its own: no write lock is taken); the write that
    records the files checks again under the sample's lock.

    Raises:
        NotFound: no such sample. Conflict: the sample is signed.
    """
    with database.read() as s:
        ensure_editable(get_sample(s, sample_id))


def list_samples(
    db: Session, *, skip: int = 0, limit: int | None = None
) -> list[tuple[Sample, int, int, int]]:
    """The samples (newest first) with their cell, pending and unreviewed counts (one query).

    Rejected cells are left out of every count, as in :func:`summary`.

    Args:
        db: the session.
        skip: samples to leave out at the start.
        limit: at most this many samples (``None``: all).
    """
    query = (
        select(
            Sample,
            func.count(Cell.id).filter(Cell.rejected_at.is_(None)),
            func.count(Cell.id).filter(Cell.status == CELL_PENDING, Cell.rejected_at.is_(None)),
            func.count(Cell.id).filter(Cell.reviewed_label.is_(None), Cell.rejected_at.is_(None)),
        )
        .outerjoin(Cell, Cell.sample_id == Sample.id)
        .where(Sample.deleted_at.is_(None))
        .group_by(Sample.id)
        .order_by(Sample.id.desc())
    )
    return [
        (s, n, pending, unreviewed)
        for s, n, pending, unreviewed in db.execute(_page(query, skip, limit))
    ]


def ensure_editable(sample: Sample) -> None:
    """Raise :class:`Conflict` when the sample is signed (read-only)."""
    if sample.signed:
        raise Conflict(
            f"sample {sample.code} was signed off on {sample.signed_at:%Y-%m-%d %H:%M} UTC and is "
            "read-only"
        )


def update_sample(db: Session, user: User, sample: Sample, fields: SampleFields) -> Sample:
    """Change the given fields (audited with old and new values).

    Raises:
        Conflict: the sample is signed, or the new id exists. Invalid: a bad value.
    """
    ensure_editable(sample)
    fields.check()
    old = _sample_dict(sample)
    if fields.seen is not None:
        wanted = {
            "collected_on": fields.collected_on.isoformat() if fields.collected_on else None,
            "age_band": fields.age_band,
            "referral_question": fields.referral_question or None,
            "notes": fields.notes,
        }
        stale = sorted(
            k
            for k, v in fields.seen.items()
            if k in old and old[k] != v and old[k] != wanted.get(k)  # equal: nothing to lose
        )
        if stale:
            raise Conflict(
                f"sample {sample.code}: {', '.join(k.replace('_', ' ') for k in stale)} "
                "changed since you opened the page (someone else saved them); nothing was "
                "saved: reload the page and make your change again"
            )
    if fields.code is not None and fields.code != sample.code:
        if _live_code_taken(db, fields.code):
            raise Conflict(f"sample id {fields.code!r} exists already; choose another id")
        sample.code = fields.code
    if fields.collected_on is not None:
        sample.collected_on = fields.collected_on
    if fields.age_band is not None:
        sample.age_band = fields.age_band
    if fields.referral_question is not None:
        sample.referral_question = fields.referral_question or None
    if fields.notes is not None:
        sample.notes = fields.notes
    if "collected_on" in fields.clear:
        sample.collected_on = None
    if "referral_question" in fields.clear:
        sample.referral_question = None
    new = _sample_dict(sample)
    changed = {k for k in new if new[k] != old[k]}
    if changed:
        audit(
            db,
            user,
            "sample.update",
            sample_id=sample.id,
            old={k: old[k] for k in sorted(changed)},
            new={k: new[k] for k in sorted(changed)},
        )
    return sample


def delete_sample(db: Session, user: User, sample: Sample) -> None:
    """Hide an unsigned sample (its rows and audit trail are kept; its id may be reused).

    Only the user who created the sample or an admin may delete it.

    Raises:
        Forbidden: the user neither created the sample nor is an admin. Conflict: the sample
            is signed.
    """
    if sample.created_by_id != user.id and not user.can("admin"):
        raise Forbidden(
            f"{user.username} is a {user.role}; only its creator ({sample.created_by.username}) "
            f"or an admin can delete sample {sample.code}"
        )
    ensure_editable(sample)
    sample.deleted_at = utcnow()
    audit(db, user, "sample.delete", sample_id=sample.id, old=_sample_dict(sample))


# -------------------------------------------------------------------------------------- cells


def add_cells(
    db: Session, user: User, sample: Sample, images: Sequence[Accepted], store: ImageStore
) -> tuple[list[Cell], list[Rejected]]:
    """Store the accepted images and add them as pending cells.

    An image already in this sample (same SHA-256) is not added twice; it comes back as a
    :class:`Rejected` naming the earlier file.

    Raises:
        Conflict: the sample is signed.
    """
    ensure_editable(sample)
    existing = {
        sha: name
        for sha, name in db.execute(
            select(Cell.sha256, Cell.original_name).where(Cell.sample_id == sample.id)
        ).all()
    }
    added: list[Cell] = []
    duplicates: list[Rejected] = []
    now = utcnow()
    for img in images:
        sha, rel = img.keep(store)
        if sha in existing:
            duplicates.append(
                Rejected(img.name, f"the same image is already in this sample as {existing[sha]}")
            )
            continue
        existing[sha] = img.name
        cell = Cell(
            sample_id=sample.id,
            sha256=sha,
            stored_path=rel,
            original_name=img.name[-255:],
            width=img.width,
            height=img.height,
            status=CELL_PENDING,
            uploaded_by_id=user.id,
            uploaded_at=now,
        )
        db.add(cell)
        added.append(cell)
    db.flush()
    if added:
        audit(
            db,
            user,
            "cells.upload",
            sample_id=sample.id,
            new={
                "count": len(added),
                "files": [
                    {"cell": c.id, "name": c.original_name, "sha256": c.sha256} for c in added
                ],
            },
        )
    return added, duplicates


def sample_cells(
    db: Session, sample: Sample, *, skip: int = 0, limit: int | None = None
) -> list[Cell]:
    """The sample's cells in upload order.

    Args:
        db: the session.
        sample: whose cells.
        skip: cells to leave out at the start.
        limit: at most this many cells (``None``: all).
    """
    query = select(Cell).where(Cell.sample_id == sample.id).order_by(Cell.id)
    return list(db.scalars(_page(query, skip, limit)))


def get_cell(db: Session, sample: Sample, cell_id: int) -> Cell:
    """One cell of the sample.

    Raises:
        NotFound: no such cell in this sample.
    """
    cell = db.scalar(select(Cell).where(Cell.id == cell_id, Cell.sample_id == sample.id))
    if cell is None:
        raise NotFound(f"sample {sample.code} has no cell {cell_id}")
    return cell


# ------------------------------------------------------------------------------------- fields


REJECTED_FIELD_CELL = "not a white cell"
"""Why a rejected cell of a field is not counted: the detector's (or a reviewer's) box holds no
white cell."""
REJECTED_CROP = "not a countable cell"
"""Why a rejected uploaded crop is not counted: debris, a smudge, a red cell or an unusable
image (a model such as pbc6 has no artefact class to re-classify it into)."""


def reject_reason(cell: Cell) -> str:
    """Why ``cell`` is, or would be, left out of the count once rejected: the reason the audit
    records and the pages and the API show (:data:`REJECTED_FIELD_CELL` for a field's cell,
    :data:`REJECTED_CROP` for an uploaded crop)."""
    return REJECTED_FIELD_CELL if cell.field_id is not None else REJECTED_CROP


def counted(cells: Iterable[Cell]) -> list[Cell]:
    """The cells that count: all but the rejected ones (:func:`reject_cell`)."""
    return [c for c in cells if c.rejected_at is None]


def add_fields(
    db: Session, user: User, sample: Sample, images: Sequence[Accepted], store: ImageStore
) -> tuple[list[Field], list[Rejected]]:
    """Store the accepted images as whole fields of view, waiting for the detector.

    The background worker finds each field's white cells, adds them as cells and classifies
    them. A field already in this sample (same SHA-256) is not added twice, except that uploading
    again a field whose search failed puts it back in the detector's queue (audited as
    ``field.retry``, with the error it had), so a failure that was fixed (a detector that could
    not load) does not leave the field out of the count for good. The returned fields include
    those retried.

    Raises:
        Conflict: the sample is signed.
    """
    ensure_editable(sample)
    existing = {f.sha256: f for f in db.scalars(select(Field).where(Field.sample_id == sample.id))}
    added: list[Field] = []
    retried: list[tuple[Field, str | None]] = []
    duplicates: list[Rejected] = []
    now = utcnow()
    for img in images:
        sha, rel = img.keep(store)
        if sha in existing:
            old = existing[sha]
            if old.status == CELL_ERROR and all(f is not old for f, _ in retried):
                retried.append((old, old.error))
                old.status, old.error = CELL_PENDING, None
                continue
            duplicates.append(
                Rejected(
                    img.name, f"the same field is already in this sample as {old.original_name}"
                )
            )
            continue
        field = Field(
            sample_id=sample.id,
            sha256=sha,
            stored_path=rel,
            original_name=img.name[-255:],
            width=img.width,
            height=img.height,
            status=CELL_PENDING,
            uploaded_by_id=user.id,
            uploaded_at=now,
        )
        db.add(field)
        added.append(field)
        existing[sha] = field
    db.flush()
    if retried:
        audit(
            db,
            user,
            "field.retry",
            sample_id=sample.id,
            old=[{"field": f.id, "name": f.original_name, "error": e} for f, e in retried],
            new={"status": CELL_PENDING},
        )
    if added:
        audit(
            db,
            user,
            "fields.upload",
            sample_id=sample.id,
            new={
                "count": len(added),
                "files": [
                    {"field": f.id, "name": f.original_name, "sha256": f.sha256} for f in added
                ],
            },
        )
    return added + [f for f, _ in retried], duplicates


def sample_fields(db: Session, sample: Sample) -> list[Field]:
    """The sample's fields in upload order."""
    return list(db.scalars(select(Field).where(Field.sample_id == sample.id).order_by(Field.id)))


def get_field(db: Session, sample: Sample, field_id: int) -> Field:
    """One field of the sample.

    Raises:
        NotFound: no such field in this sample.
    """
    field = db.scalar(select(Field).where(Field.id == field_id, Field.sample_id == sample.id))
    if field is None:
        raise NotFound(f"sample {sample.code} has no field {field_id}")
    return field


def field_message(field: Field, cells: Sequence[Cell] = ()) -> str:
    """One sentence on where the field stands (what the field page and the API show)."""
    if field.status == CELL_PENDING:
        return "searching the field for white cells"
    if field.status == CELL_ERROR:
        return (
            f"the field could not be searched: {field.error} (once the cause is fixed, upload "
            "the field again to retry)"
        )
    found = field.found or 0
    if found == 0 and not cells:
        return (
            "no white cell was found in this field: it adds 0 cells to the count (click on a "
            "missed cell to add it)"
        )
    rejected = sum(1 for c in cells if c.rejected_at is not None)
    added = sum(1 for c in cells if c.origin == ORIGIN_ADDED)
    parts = [f"{found} white cell{'s' if found != 1 else ''} found"]
    if added:
        parts.append(f"{added} added by a reviewer")
    if rejected:
        parts.append(f"{rejected} rejected as {REJECTED_FIELD_CELL}")
    n = len(cells) - rejected
    return f"{', '.join(parts)}; {n} counted"


def field_view(field: Field, cells: Sequence[Cell] = ()) -> dict[str, Any]:
    """A field as the page and the API show it (its cells' boxes, when given)."""
    return {
        "id": field.id,
        "name": field.original_name,
        "sha256": field.sha256,
        "width": field.width,
        "height": field.height,
        "status": field.status,
        "um_per_px": field.um_per_px,
        "scale_source": field.scale_source,
        "detector": field.detector,
        "found": field.found,
        "warnings": list(field.warnings or []),
        "error": field.error,
        "message": field_message(field, cells),
        "cells": [
            {
                "id": c.id,
                "box": list(c.box) if c.box else None,
                "score": c.detection_score,
                "origin": c.origin,
                "rejected": c.rejected_at is not None,
                "label": c.reviewed_label or c.predicted_label,
                "reviewed": c.reviewed_label is not None,
            }
            for c in cells
        ],
    }


def field_cells(db: Session, field: Field) -> list[Cell]:
    """The cells found in (or added to) a field, in order."""
    return list(db.scalars(select(Cell).where(Cell.field_id == field.id).order_by(Cell.id)))


SAME_CELL_SPAN = 0.25
"""A new cell whose centre is closer to the centre of a cell's box than this share of the
smaller of the two boxes (in x and in y) is that cell: adding it would count one cell twice. The
smaller box decides, so a cell missed inside a large box that merged it with a neighbour can
still be added (its centre is a cell radius or more from the merged box's centre)."""


def cell_at(cells: Iterable[Cell], box: tuple[float, float, float, float]) -> Cell | None:
    """The first of ``cells`` (rejected ones left out) that a new cell with ``box`` (field
    pixels, centred on the click) would duplicate, if any (:data:`SAME_CELL_SPAN`)."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    for c in cells:
        if c.box is None or c.rejected_at is not None:
            continue
        x0, y0, x1, y1 = c.box
        dx, dy = abs(x - (x0 + x1) / 2), abs(y - (y0 + y1) / 2)
        if dx <= SAME_CELL_SPAN * min(w, x1 - x0) and dy <= SAME_CELL_SPAN * min(h, y1 - y0):
            return c
    return None


def add_field_cell(
    db: Session,
    user: User,
    sample: Sample,
    field: Field,
    *,
    sha256: str,
    stored_path: str,
    side: int,
    box: tuple[float, float, float, float],
    point: tuple[float, float],
) -> Cell:
    """Add a cell a reviewer found on a field (its crop is stored already); it is classified in
    the background and enters review like any cell (audited as ``cell.add``).

    Raises:
        Conflict: the sample is signed; the field has not been searched yet; the same crop is
            in the sample already (a click on the same point), or the new cell would be a
            counted cell of the field again (:func:`cell_at`).
    """
    ensure_editable(sample)
    if field.status != "done":
        raise Conflict(
            f"field {field.original_name} "
            + ("is still being searched; wait for the detector" if field.status == CELL_PENDING
               else f"could not be searched ({field.error}); no cell can be added to it")
            + ", then add the missed cell"
        )  # fmt: skip
    same = db.scalar(select(Cell).where(Cell.sample_id == sample.id, Cell.sha256 == sha256))
    if same is not None:
        raise Conflict(f"this cell is in the sample already (cell {same.id}, {same.original_name})")
    other = cell_at(field_cells(db, field), box)
    if other is not None and other.box is not None:
        raise Conflict(
            f"there is a cell here already: cell {other.id} ({other.original_name}), box "
            f"{', '.join(f'{v:.0f}' for v in other.box)}; click on the missed cell's own centre"
        )
    n = db.scalar(select(func.count(Cell.id)).where(Cell.field_id == field.id)) or 0
    cell = Cell(
        sample_id=sample.id,
        sha256=sha256,
        stored_path=stored_path,
        original_name=f"{field.original_name} · added {n + 1}"[-255:],
        width=side,
        height=side,
        status=CELL_PENDING,
        uploaded_by_id=user.id,
        uploaded_at=utcnow(),
        field_id=field.id,
        box_x0=box[0],
        box_y0=box[1],
        box_x1=box[2],
        box_y1=box[3],
        origin=ORIGIN_ADDED,
    )
    db.add(cell)
    db.flush()
    audit(
        db,
        user,
        "cell.add",
        sample_id=sample.id,
        cell_id=cell.id,
        new={
            "field": field.id,
            "field_name": field.original_name,
            "point": [round(point[0], 1), round(point[1], 1)],
            "box": [round(v, 1) for v in box],
        },
    )
    return cell


def add_cell_at_point(
    database: Database,
    db: Session,
    user: User,
    sample_id: int,
    field_id: int,
    point: tuple[float, float],
    store: ImageStore,
    spec: CropSpec,
) -> Cell:
    """Cut the cell centred on ``point`` (field pixels) out of the field at the field's scale,
    store the crop and add it (:func:`add_field_cell`) in ``db``, the caller's write session.

    The field is read in a short read transaction of its own and the crop cut outside any, so
    the write lock (taken by ``db``'s first query) is held only to record the cell.

    Raises:
        AppError: no such sample or field, a signed sample, a field not searched yet, a point
            outside the field (:class:`Invalid`), or the same cell added twice.
    """
    from marrowscope.inference.fields import FieldError
    from marrowscope.service.fields import cut_cell_at

    with database.read() as s:
        sample = get_sample(s, sample_id)
        ensure_editable(sample)
        field = get_field(s, sample, field_id)
        stored, scale, source = field.stored_path, field.um_per_px, field.scale_source
        status, error, name = field.status, field.error, field.original_name
    if status != CELL_DONE or scale is None:
        raise Conflict(
            f"field {name} "
            + ("is still being searched; wait for the detector" if status == CELL_PENDING
               else f"could not be searched ({error}); no cell can be added to it")
        )  # fmt: skip
    try:
        cut = cut_cell_at(
            store.path(stored), point[0], point[1], um_per_px=scale,
            scale_source=source or "", spec=spec,
        )  # fmt: skip
    except FieldError as e:
        raise Invalid(str(e)) from None
    sha, rel = store.put(cut.png, "png")
    sample = get_sample(db, sample_id, lock=True)
    field = get_field(db, sample, field_id)
    return add_field_cell(
        db, user, sample, field, sha256=sha, stored_path=rel, side=spec.side_px, box=cut.box,
        point=point,
    )  # fmt: skip


def reject_cell(db: Session, user: User, sample: Sample, cell_id: int, *, rejected: bool) -> Cell:
    """Reject a cell (it leaves every count, the sign-off check and the report), or take the
    rejection back (``rejected=False``); audited as ``cell.reject`` (with the reason,
    :func:`reject_reason`) / ``cell.restore``.

    A cell found in or added to a field is rejected as "not a white cell"; an uploaded crop,
    classified or not, identified or not, as "not a countable cell". Rejecting a rejected cell
    (or restoring a counted one) changes nothing and writes no audit row.

    Raises:
        Conflict: the sample is signed. NotFound: no such cell.
    """
    ensure_editable(sample)
    cell = db.scalar(
        select(Cell).where(Cell.id == cell_id, Cell.sample_id == sample.id).with_for_update()
    )
    if cell is None:
        raise NotFound(f"sample {sample.code} has no cell {cell_id}")
    if (cell.rejected_at is not None) == rejected:
        return cell
    audit(
        db,
        user,
        "cell.reject" if rejected else "cell.restore",
        sample_id=sample.id,
        cell_id=cell.id,
        old={"rejected": not rejected, "label": cell.reviewed_label, "model": cell.predicted_label},
        new={"rejected": rejected, "reason": reject_reason(cell)}
        if rejected
        else {"rejected": False},
    )
    cell.rejected_at = utcnow() if rejected else None
    cell.rejected_by_id = user.id if rejected else None
    db.flush()
    db.expire(cell, ["rejected_by"])  # reloaded from the new rejected_by_id when read
    return cell


def identified(cell: Cell, threshold: float) -> bool:
    """True when the model's call is confident enough to be counted."""
    return cell.status == CELL_DONE and (cell.confidence or 0.0) >= threshold


def current_label(cell: Cell, threshold: float) -> str | None:
    """The reviewed label, else the model's call when identified, else ``None``."""
    if cell.reviewed_label:
        return cell.reviewed_label
    return cell.predicted_label if identified(cell, threshold) else None


def reclassify(
    db: Session,
    user: User,
    sample: Sample,
    cell_ids: Iterable[int],
    label: str | None,
    classes: Sequence[str],
    *,
    threshold: float,
) -> int:
    """Set the reviewed label of cells (``label=None``: confirm each cell's current label,
    i.e. its reviewed label if it has one, else the model's call when it is identified).

    An unidentified cell (the model's call below ``threshold``, never reviewed) has no label to
    confirm: it must be given a class, as the sample page's *Unidentified* group promises.

    Returns:
        How many cells changed (each change is audited with the old and new label).

    Raises:
        Conflict: the sample is signed, or a cell is still being classified.
        Invalid: an unknown label, no cells, or a confirmation of a cell without a confirmable
            label (unidentified, or never classified). NotFound: a cell not in this sample.
    """
    ensure_editable(sample)
    ids = sorted({int(i) for i in cell_ids})
    if not ids:
        raise Invalid("no cells selected; select at least one cell")
    if label is not None and label not in classes:
        raise Invalid(f"{label!r} is not a class of the model; use one of: {', '.join(classes)}")
    cells = {
        c.id: c
        for c in db.scalars(
            select(Cell).where(Cell.sample_id == sample.id, Cell.id.in_(ids)).with_for_update()
        )
    }
    missing = [i for i in ids if i not in cells]
    if missing:
        raise NotFound(
            f"sample {sample.code} has no cell {', '.join(map(str, missing[:10]))}"
            + (" ..." if len(missing) > 10 else "")
        )
    now = utcnow()
    changed = 0
    for i in ids:
        cell = cells[i]
        if cell.rejected_at is not None:
            raise Conflict(
                f"cell {cell.id} ({cell.original_name}) was rejected as {reject_reason(cell)}; "
                "restore it first to classify it"
            )
        new = label
        if new is None:
            if cell.status == CELL_PENDING:
                raise Conflict(
                    f"cell {cell.id} ({cell.original_name}) is still being classified; wait for "
                    "the model or choose a class"
                )
            if cell.predicted_label is None:
                raise Invalid(
                    f"cell {cell.id} ({cell.original_name}) has no model call to confirm; "
                    "choose a class"
                )
            new = current_label(cell, threshold)
            if new is None:
                raise Invalid(
                    f"cell {cell.id} ({cell.original_name}) is unidentified: the model's call, "
                    f"{cell.predicted_label} at {100 * (cell.confidence or 0.0):.0f}%, is below the "
                    f"{100 * threshold:.0f}% threshold; choose a class for it"
                )
        if cell.reviewed_label == new:
            continue
        audit(
            db,
            user,
            "cell.reclassify",
            sample_id=sample.id,
            cell_id=cell.id,
            old={"label": cell.reviewed_label, "model": cell.predicted_label},
            new={"label": new},
        )
        cell.reviewed_label = new
        cell.reviewed_by_id = user.id
        cell.reviewed_at = now
        changed += 1
    if changed:
        db.flush()
        for cell in cells.values():
            db.expire(cell, ["reviewed_by"])  # reloaded from the new reviewed_by_id when read
    return changed


# ---------------------------------------------------------------------------------- counting


def _blocking(cells: Sequence[Cell], threshold: float) -> dict[str, int]:
    """What stops a sign-off: the unreviewed cells (and, of them, the unidentified and the
    failed ones) and every cell still being classified, reviewed or not (a reviewed label given
    while the model runs does not make the cell final: the model's call is still to come)."""
    unreviewed = [c for c in cells if not c.reviewed_label]
    return {
        "unreviewed": len(unreviewed),
        "unidentified": sum(
            1 for c in unreviewed if c.status == CELL_DONE and not identified(c, threshold)
        ),
        "pending": sum(1 for c in cells if c.status == CELL_PENDING),
        "failed": sum(1 for c in unreviewed if c.status == CELL_ERROR),
    }


def _of(n: int, total: int) -> str:
    """``"2 of 3 cells are"`` / ``"1 of 3 cells is"``."""
    return f"{n} of {total} cell{'s' if total != 1 else ''} {'are' if n != 1 else 'is'}"


def blocking_message(
    sample: Sample, cells: Sequence[Cell], threshold: float, *, fields_pending: int = 0
) -> str | None:
    """Why the sample cannot be signed off yet, or ``None`` when it can.

    Every field must be searched for cells, and every counted cell (rejected ones leave the
    count) classified by the model (none still pending, even when a reviewer already labelled
    it) and reviewed; a sample whose every cell is rejected has nothing to count (the message
    says so, and how to go on).
    """
    if fields_pending:
        return (
            f"cannot sign off {sample.code}: {fields_pending} field(s) still being searched for "
            "white cells; wait for the detector, then review every cell"
        )
    rejected = sum(1 for c in cells if c.rejected_at is not None)
    cells = counted(cells)
    if not cells and rejected:
        return (
            f"cannot sign off {sample.code}: "
            + (f"all {rejected} of its cells are" if rejected != 1 else "its only cell is")
            + " rejected (not counted), so there is nothing to count; restore a cell that "
            "should count, or upload more cells"
        )
    if not cells:
        return f"sample {sample.code} has no cells yet; upload and review its cells first"
    b = _blocking(cells, threshold)
    if not b["unreviewed"] and not b["pending"]:
        return None
    problems = []
    if b["pending"]:
        problems.append(f"{_of(b['pending'], len(cells))} still being classified")
    if b["unreviewed"]:
        parts = []
        if b["unidentified"]:
            parts.append(f"{b['unidentified']} unidentified")
        if b["failed"]:
            parts.append(f"{b['failed']} that the model could not read")
        detail = f" ({', '.join(parts)})" if parts else ""
        problems.append(f"{_of(b['unreviewed'], len(cells))} not reviewed yet{detail}")
    advice = (
        "wait until the model has classified every cell, then review every cell"
        if b["pending"]
        else "review every cell first"
    )
    return f"cannot sign off {sample.code}: {'; '.join(problems)}; {advice}"


def fields_not_searched(fields: Iterable[Field]) -> list[dict[str, Any]]:
    """The fields whose search failed (none of their cells can be in the count), in order."""
    return [
        {"id": f.id, "name": f.original_name, "error": f.error}
        for f in fields
        if f.status == CELL_ERROR
    ]


def rejected_cells(cells: Iterable[Cell], fields: Iterable[Field] = ()) -> list[dict[str, Any]]:
    """The rejected cells (none of them is in the count), in order, each named: its file name,
    its field's name and box (field pixels) for a field's cell, why it is not counted
    (:func:`reject_reason`), the model's call, and who rejected it and when.

    Args:
        cells: the sample's cells (counted ones are left out here).
        fields: the sample's fields, for the names of the rejected cells' fields.
    """
    names = {f.id: f.original_name for f in fields}
    return [
        {
            "id": c.id,
            "name": c.original_name,
            "reason": reject_reason(c),
            "field_id": c.field_id,
            "field": names.get(c.field_id) if c.field_id is not None else None,
            "box": [round(v, 1) for v in c.box] if c.box else None,
            "predicted": c.predicted_label,
            "confidence": c.confidence,
            "rejected_by": c.rejected_by.username if c.rejected_by else None,
            "rejected_at": c.rejected_at.isoformat() if c.rejected_at else None,
        }
        for c in cells
        if c.rejected_at is not None
    ]


def signoff_message(
    sample: Sample,
    cells: Sequence[Cell],
    threshold: float,
    *,
    fields_pending: int = 0,
    not_searched: Sequence[dict[str, Any]] = (),
) -> str:
    """What the sign-off box says: why the sample cannot be signed off yet, or that it can;
    either way naming the fields that could not be searched, which a sign-off leaves out of the
    count (and records as such in its audit entry and the report)."""
    if sample.signed:
        return f"sample {sample.code} is signed off."
    why = blocking_message(sample, cells, threshold, fields_pending=fields_pending)
    text = (
        f"{why[0].upper()}{why[1:]}."
        if why
        else "Every cell is reviewed: the sample can be signed off."
    )
    if not_searched:
        names = ", ".join(f["name"] for f in not_searched[:5])
        more = f" and {len(not_searched) - 5} more" if len(not_searched) > 5 else ""
        n = len(not_searched)
        text += (
            f" {n} field{'s' if n != 1 else ''} could not be searched for white cells "
            f"({names}{more}): {'their' if n != 1 else 'its'} cells are not in the count; upload "
            f"{'them' if n != 1 else 'it'} again to retry, or sign off without "
            f"{'them' if n != 1 else 'it'} (the sign-off and the report record "
            f"{'them' if n != 1 else 'it'})."
        )
    return text


def signoff(db: Session, user: User, sample: Sample, threshold: float) -> Sample:
    """Sign the sample off (it is read-only afterwards).

    The caller passes ``sample`` loaded with ``lock=True`` (:func:`get_sample`) in the session
    that commits the sign-off: the cells are read under that lock, in the same transaction, so
    no upload and no classifier result can land between the check and the signature (the
    classifier takes the same lock before it writes, see :mod:`.worker`).

    Raises:
        Forbidden: the user is not a signer. Conflict: signed already, or cells remain
            unreviewed, unidentified or still being classified (the message says how many).
    """
    if not user.can("signer"):
        raise Forbidden(
            f"{user.username} is a {user.role}; only a signer (hematologist) can sign off"
        )
    ensure_editable(sample)
    all_cells = sample_cells(db, sample)
    fields = sample_fields(db, sample)
    fields_pending = sum(1 for f in fields if f.status == CELL_PENDING)
    why = blocking_message(sample, all_cells, threshold, fields_pending=fields_pending)
    if why:
        raise Conflict(why)
    not_searched = fields_not_searched(fields)
    cells = counted(all_cells)
    rejected = [c.id for c in all_cells if c.rejected_at is not None]
    sample.signed_at = utcnow()
    sample.signed_by_id = user.id
    db.flush()
    db.expire(sample, ["signed_by"])  # reloaded from the new signed_by_id when read
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.reviewed_label or ""] = counts.get(c.reviewed_label or "", 0) + 1
    audit(
        db,
        user,
        "sample.signoff",
        sample_id=sample.id,
        old={"signed": False},
        new={
            "signed": True,
            "cells": len(cells),
            "rejected": len(rejected),
            "counts": dict(sorted(counts.items())),
            **({"rejected_cells": rejected} if rejected else {}),
            **({"fields_not_searched": not_searched} if not_searched else {}),
        },
    )
    return sample


def _probs(cell: Cell, k: int) -> np.ndarray:
    p = cell.probabilities
    return np.asarray(p if p and len(p) == k else np.zeros(k), dtype=np.float32)


def cell_view(cell: Cell, classes: Sequence[str], threshold: float) -> dict[str, Any]:
    """A cell as the page and the API show it (top-3 probabilities included)."""
    probs = _probs(cell, len(classes))
    top = (
        [
            {"class": classes[i], "probability": round(float(probs[i]), 6)}
            for i in np.argsort(-probs)[:3]
        ]
        if cell.probabilities
        else []
    )
    return {
        "id": cell.id,
        "name": cell.original_name,
        "sha256": cell.sha256,
        "width": cell.width,
        "height": cell.height,
        "status": cell.status,
        "predicted": cell.predicted_label,
        "confidence": cell.confidence,
        "identified": identified(cell, threshold),
        "top3": top,
        "reviewed_label": cell.reviewed_label,
        "reviewed_by": cell.reviewed_by.username if cell.reviewed_by else None,
        "reviewed_at": cell.reviewed_at.isoformat() if cell.reviewed_at else None,
        "label": current_label(cell, threshold),
        "model_version": cell.model_version,
        "error": cell.error,
        "field_id": cell.field_id,
        "box": list(cell.box) if cell.box else None,
        "detection_score": cell.detection_score,
        "origin": cell.origin,
        "rejected": cell.rejected_at is not None,
        "rejected_reason": reject_reason(cell) if cell.rejected_at is not None else None,
    }


def summary(
    sample: Sample,
    cells: Sequence[Cell],
    classes: Sequence[str],
    settings: Settings,
    *,
    fields: Sequence[Field] = (),
) -> dict[str, Any]:
    """Progress, the model's and the reviewed differential, the hairy-cell flag and evidence.

    Rejected cells (:func:`reject_cell`) are left out of everything but ``progress.rejected``;
    ``fields`` (the sample's fields) give ``progress.fields``, ``fields_pending`` and
    ``fields_failed``; ``signoff_message`` says why the sample cannot be signed off yet, or that
    it can (naming the fields that could not be searched and are left out of the count).

    The *model* count uses every identified model call; the *reviewed* count uses the reviewed
    labels given so far (complete at sign-off). The flag is computed on the reviewed count once
    any cell is reviewed, else on the model's; evidence = the current HAC cells with the highest
    HAC probability (ties break on the rule's key, here the cell id: the earliest upload first).
    """
    thr = settings.threshold
    all_cells = cells
    rejected = len(cells) - len(counted(cells))
    cells = counted(cells)
    fields_pending = sum(1 for f in fields if f.status == CELL_PENDING)
    not_searched = fields_not_searched(fields)
    rules = {"hac_min_percent": settings.hac_min_percent, "hac_min_count": settings.hac_min_count}
    model = tally((c.predicted_label for c in cells if identified(c, thr)), classes, **rules)
    reviewed = tally((c.reviewed_label for c in cells if c.reviewed_label), classes, **rules)
    basis = "reviewed" if reviewed.total else "model"
    flag = reviewed.flag if reviewed.total else model.flag
    evidence: list[dict[str, Any]] = []
    if flag.hac_class and settings.evidence:
        calls = [
            Call(
                key=c.id,
                predicted=str(current_label(c, thr)),
                identified=current_label(c, thr) is not None,
                probs=_probs(c, len(classes)),
            )
            for c in cells
            if c.probabilities
        ]
        names = {c.id: c.original_name for c in cells}
        idx = list(classes).index(flag.hac_class)
        for call in select_evidence(calls, flag.hac_class, classes, settings.evidence):
            evidence.append(
                {"id": call.key, "name": names[call.key], "probability": float(call.probs[idx])}
            )
    b = _blocking(cells, thr)
    return {
        "sample_id": sample.id,
        "code": sample.code,
        "signed": sample.signed,
        "progress": {
            "total": len(cells),
            "pending": sum(1 for c in cells if c.status == CELL_PENDING),
            "classified": sum(1 for c in cells if c.status == CELL_DONE),
            "failed": sum(1 for c in cells if c.status == CELL_ERROR),
            "reviewed": sum(1 for c in cells if c.reviewed_label),
            "rejected": rejected,
            "fields": len(fields),
            "fields_pending": fields_pending,
            "fields_failed": len(not_searched),
        },
        "blocking": b,
        "can_sign": bool(cells)
        and not b["unreviewed"]
        and not b["pending"]
        and not fields_pending
        and not sample.signed,
        "signoff_message": signoff_message(
            sample, all_cells, thr, fields_pending=fields_pending, not_searched=not_searched
        ),
        "threshold": thr,
        "differential": [
            {
                "class": c,
                "name": CELL_NAMES.get(c, ""),
                "model_count": model.counts[c],
                "model_percent": round(model.percents[c], 2),
                "reviewed_count": reviewed.counts[c],
                "reviewed_percent": round(reviewed.percents[c], 2),
            }
            for c in classes
        ],
        "totals": {"model": model.total, "reviewed": reviewed.total},
        "flag": {
            "basis": basis,
            "status": flag.status,
            "message": flag.message,
            "hac_class": flag.hac_class,
            "count": flag.count,
            "percent": round(flag.percent, 2),
            "min_percent": flag.min_percent,
            "min_count": flag.min_count,
            "evidence": evidence,
            "model_status": model.flag.status,
        },
    }


def report_data(
    db: Session, sample: Sample, classes: Sequence[str], settings: Settings, model: dict[str, Any]
) -> dict[str, Any]:
    """Everything the signed report shows (HTML, CSV and JSON share it).

    Nothing is left out silently: besides the count, the report names the cells rejected
    (``rejected``, ``rejected_cells``: :func:`rejected_cells`) and the fields that could not be
    searched (``fields_not_searched``), none of which is in the count.

    Raises:
        Conflict: the sample is not signed off yet.
    """
    if not sample.signed:
        raise Conflict(
            f"sample {sample.code} is not signed off yet; the report is made from the signed count"
        )
    all_cells = sample_cells(db, sample)
    cells = counted(all_cells)
    s = summary(sample, cells, classes, settings)
    fields = sample_fields(db, sample)
    rejected = rejected_cells(all_cells, fields)
    reviewers = sorted({c.reviewed_by.username for c in cells if c.reviewed_by})
    versions = sorted({c.model_version for c in cells if c.model_version})
    return {
        "sample": {
            "id": sample.id,
            **_sample_dict(sample),
            "created_at": sample.created_at.isoformat(),
        },
        "signed_at": sample.signed_at.isoformat() if sample.signed_at else None,
        "signed_by": sample.signed_by.username if sample.signed_by else None,
        "reviewers": reviewers,
        "model": {**model, "versions_used": versions},
        "settings": {
            "threshold": settings.threshold,
            "hac_min_percent": settings.hac_min_percent,
            "hac_min_count": settings.hac_min_count,
        },
        "cells": len(cells),
        "differential": s["differential"],
        "totals": s["totals"],
        "flag": s["flag"],
        "changed_by_review": sum(
            1 for c in cells if c.reviewed_label and c.reviewed_label != c.predicted_label
        ),
        "rejected": len(rejected),
        "rejected_cells": rejected,
        "fields": len(fields),
        "fields_not_searched": fields_not_searched(fields),
    }


REPORT_COLUMNS = [
    "sample_id", "collected_on", "age_band", "referral_question", "class", "cell_type",
    "count", "percent", "model_count", "model_percent", "hac_flag", "hac_flag_message",
    "model", "model_version", "reviewers", "signed_by", "signed_at", "fields_not_searched",
    "rejected_count", "rejected_cells",
]  # fmt: skip
"""The columns of the report CSV, in order (new columns are added at the end only, so a reader
that takes the columns by position keeps working)."""


def _json_cell(values: Sequence[Any]) -> str:
    """Uploaded file names (or records naming them) in one CSV cell: a JSON list (unambiguous
    whatever the names hold, and never read as a spreadsheet formula, as a name starting with
    ``=`` would be); ``""`` for none."""
    return json.dumps(list(values), ensure_ascii=False) if values else ""


def report_csv(data: dict[str, Any]) -> str:
    """The signed differential count as CSV: one row per class, sample fields on every row.

    The sample-wide columns at the end name what is not in the count: ``fields_not_searched``
    (a JSON list of the fields' file names), ``rejected_count`` (the cells rejected) and
    ``rejected_cells`` (a JSON list of them, as :func:`rejected_cells` gives them).

    Args:
        data: the report, as :func:`report_data` returns it.
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(REPORT_COLUMNS)
    s, m, f = data["sample"], data["model"], data["flag"]
    for row in data["differential"]:
        w.writerow(
            [
                s["code"],
                s["collected_on"] or "",
                s["age_band"],
                s["referral_question"] or "",
                row["class"],
                CELL_NAMES.get(row["class"], ""),
                row["reviewed_count"],
                f"{row['reviewed_percent']:.2f}",
                row["model_count"],
                f"{row['model_percent']:.2f}",
                f["status"],
                f["message"],
                m["name"],
                m["version"],
                ";".join(data["reviewers"]),
                data["signed_by"],
                data["signed_at"],
                _json_cell([f["name"] for f in data.get("fields_not_searched", [])]),
                data.get("rejected", 0),
                _json_cell(data.get("rejected_cells", [])),
            ]  # fmt: skip
        )
    return buf.getvalue()

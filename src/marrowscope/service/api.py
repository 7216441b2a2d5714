"""The JSON API under ``/api`` (OpenAPI schema at ``/api/openapi.json``, login required).

Every change route makes its change, builds its answer, then commits, so a committed change is
never answered with an error (see :mod:`.db`).

Same rules as the pages: every route except ``/api/health`` needs a login (bearer token or the
login cookie plus its CSRF token for changes); a signed sample refuses every change (409); only
a signer signs off (403). Every JSON route answers a named model of :mod:`.schemas`; the list
routes page with ``skip`` and ``limit`` (100 by default, at most 1000), applied in SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import text

import marrowscope
from marrowscope.service import review
from marrowscope.service.deps import (
    DB,
    DatabaseDep,
    Editor,
    Model,
    SettingsDep,
    Store,
    Viewer,
    Worker,
)
from marrowscope.service.models import Cell, Sample
from marrowscope.service.schemas import (
    AuditEventPublic,
    CellPublic,
    FieldPublic,
    Health,
    Me,
    ModelPublic,
    Point,
    Prediction,
    Problem,
    Reclassify,
    ReclassifyResult,
    Relabel,
    ReportPublic,
    SampleIn,
    SamplePublic,
    SampleUpdate,
    UploadResult,
)
from marrowscope.service.uploads import Accepted, Rejected, check_image, read_capped, validate_files
from marrowscope.service.web import MAX_ID, Id, report_download

__all__ = ["router"]

router = APIRouter(prefix="/api", tags=["api"])

MAX_LIMIT = 1000
"""The most items one page of a list route holds."""

Skip = Annotated[int, Query(ge=0, le=MAX_ID, description="Items to skip (for paging).")]
Limit = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"Items to return, at most {MAX_LIMIT}.")
]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Login required"},
    403: {"model": Problem, "description": "Not allowed (role or CSRF token)"},
    404: {"model": Problem, "description": "No such sample, cell or field"},
    409: {"model": Problem, "description": "Conflict (signed sample, not ready)"},
}


def sample_public(
    sample: Sample, counts: tuple[int, int, int] | None = None, **extra: Any
) -> SamplePublic:
    """The API view of a sample (``counts``: its cells, pending and unreviewed cells)."""
    n, pending, unreviewed = counts if counts else (None, None, None)
    return SamplePublic.model_validate(
        {
            "id": sample.id,
            "code": sample.code,
            "collected_on": sample.collected_on,
            "age_band": sample.age_band,
            "referral_question": sample.referral_question,
            "notes": sample.notes,
            "created_at": sample.created_at,
            "created_by": sample.created_by.username,
            "signed": sample.signed,
            "signed_at": sample.signed_at,
            "signed_by": sample.signed_by.username if sample.signed_by else None,
            "cells": n,
            "pending": pending,
            "unreviewed": unreviewed,
            **extra,
        }
    )


# -------------------------------------------------------------------------------- basic routes


@router.get("/health", response_model=Health)
def health(db: DB) -> Health:
    """Liveness and database check (no login needed)."""
    db.execute(text("SELECT 1"))
    return Health(status="ok")


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, who: Viewer) -> JSONResponse:
    """The OpenAPI schema of this API (login required)."""
    return JSONResponse(request.app.openapi())


@router.get("/model", response_model=ModelPublic, responses=ERRORS)
def model_info(who: Viewer, model: Model, settings: SettingsDep) -> ModelPublic:
    """The model: name, version, classes (in index order) and the unidentified threshold."""
    return ModelPublic.model_validate(
        {
            **model.info.to_dict(),
            "threshold": settings.threshold,
            "app_version": marrowscope.__version__,
        }
    )


@router.get("/me", response_model=Me, response_model_exclude_none=True, responses=ERRORS)
def me(who: Viewer) -> Me:
    """The logged-in user; ``csrf_token`` only for the login cookie (send it as X-CSRF-Token)."""
    return Me(username=who.user.username, role=who.user.role, via=who.via, csrf_token=who.csrf)


# ------------------------------------------------------------------------------------- samples


@router.get("/samples", response_model=list[SamplePublic], responses=ERRORS)
def list_samples(who: Viewer, db: DB, skip: Skip = 0, limit: Limit = 100) -> list[SamplePublic]:
    """The samples, newest first, with cell counts (``skip`` and ``limit`` page through them)."""
    return [
        sample_public(s, (n, p, u))
        for s, n, p, u in review.list_samples(db, skip=skip, limit=limit)
    ]


@router.post("/samples", status_code=201, response_model=SamplePublic, responses=ERRORS)
def create_sample(body: SampleIn, who: Editor, db: DB) -> SamplePublic:
    """Create a sample."""
    sample = review.create_sample(db, who.user, review.SampleFields(**body.model_dump()))
    answer = sample_public(sample, (0, 0, 0))
    db.commit()
    return answer


@router.get("/samples/{sample_id}", response_model=SamplePublic, responses=ERRORS)
def get_sample(
    sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> SamplePublic:
    """One sample with its progress, differential counts and hairy-cell flag."""
    sample = review.get_sample(db, sample_id)
    cells = review.sample_cells(db, sample)
    fields = review.sample_fields(db, sample)
    s = review.summary(sample, cells, model.classes, settings, fields=fields)
    p = s["progress"]
    return sample_public(sample, (p["total"], p["pending"], p["total"] - p["reviewed"]), summary=s)


@router.patch("/samples/{sample_id}", response_model=SamplePublic, responses=ERRORS)
def update_sample(sample_id: Id, body: SampleUpdate, who: Editor, db: DB) -> SamplePublic:
    """Change sample fields (refused once signed); ``null`` empties the date or the referral
    question (the other fields cannot be emptied)."""
    sample = review.get_sample(db, sample_id, lock=True)
    given = body.model_dump(exclude_unset=True)
    emptied = frozenset(k for k, v in given.items() if v is None)
    review.update_sample(
        db,
        who.user,
        sample,
        review.SampleFields(**{k: v for k, v in given.items() if v is not None}, clear=emptied),
    )
    answer = sample_public(sample)
    db.commit()
    return answer


@router.delete("/samples/{sample_id}", status_code=204, responses=ERRORS)
def delete_sample(sample_id: Id, who: Editor, db: DB) -> Response:
    """Delete an unsigned sample (its creator or an admin only; 403 otherwise). It is hidden,
    its records and audit trail are kept, and its sample id may be given to a new sample."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.delete_sample(db, who.user, sample)
    db.commit()
    return Response(status_code=204)


# --------------------------------------------------------------------------------------- cells


@router.get("/samples/{sample_id}/cells", response_model=list[CellPublic], responses=ERRORS)
def list_cells(
    sample_id: Id,
    who: Viewer,
    db: DB,
    model: Model,
    settings: SettingsDep,
    skip: Skip = 0,
    limit: Limit = 100,
) -> list[CellPublic]:
    """The sample's cells in upload order, with model call, confidence, top-3 and reviewed
    label (``skip`` and ``limit`` page through them)."""
    sample = review.get_sample(db, sample_id)
    return [
        CellPublic.model_validate(review.cell_view(c, model.classes, settings.threshold))
        for c in review.sample_cells(db, sample, skip=skip, limit=limit)
    ]


def upload_result(added: Sequence[Cell], rejected: Sequence[Rejected]) -> UploadResult:
    """What an upload answers: the accepted cells and each refused file with its reason."""
    return UploadResult.model_validate(
        {
            "accepted": [{"id": c.id, "name": c.original_name} for c in added],
            "rejected": [
                {"name": r.name, "reason": r.reason, "message": r.message} for r in rejected
            ],
        }
    )


@router.post(
    "/samples/{sample_id}/cells", status_code=201, response_model=UploadResult, responses=ERRORS
)
def upload_cells(
    sample_id: Id,
    files: Annotated[list[UploadFile], File(description="Cell images and/or zip files of them.")],
    who: Editor,
    db: DB,
    database: DatabaseDep,
    settings: SettingsDep,
    store: Store,
    worker: Worker,
) -> UploadResult:
    """Upload cell images (many files and/or zips); refused files are listed by name."""
    review.check_uploadable(database, sample_id)  # nothing is stored for a signed sample
    # Judge and store the files before the write transaction (no lock is held meanwhile).
    accepted, rejected = validate_files(
        ((f.filename or "", f.file) for f in files), settings, store=store
    )
    sample = review.get_sample(db, sample_id, lock=True)
    added, duplicates = review.add_cells(db, who.user, sample, accepted, store)
    answer = upload_result(added, rejected + duplicates)
    db.commit()
    if added:
        worker.notify()
    return answer


@router.get("/samples/{sample_id}/cells/{cell_id}", response_model=CellPublic, responses=ERRORS)
def get_cell(
    sample_id: Id, cell_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> CellPublic:
    """One cell."""
    sample = review.get_sample(db, sample_id)
    cell = review.get_cell(db, sample, cell_id)
    return CellPublic.model_validate(review.cell_view(cell, model.classes, settings.threshold))


@router.patch("/samples/{sample_id}/cells/{cell_id}", response_model=CellPublic, responses=ERRORS)
def relabel_cell(
    sample_id: Id,
    cell_id: Id,
    body: Relabel,
    who: Editor,
    db: DB,
    model: Model,
    settings: SettingsDep,
) -> CellPublic:
    """Re-classify one cell (``label: null`` confirms its current label)."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.reclassify(
        db, who.user, sample, [cell_id], body.label, model.classes, threshold=settings.threshold
    )
    cell = review.get_cell(db, sample, cell_id)
    answer = CellPublic.model_validate(review.cell_view(cell, model.classes, settings.threshold))
    db.commit()  # the answer is built first: nothing after a commit can turn it into an error
    return answer


@router.post(
    "/samples/{sample_id}/cells/reclassify", response_model=ReclassifyResult, responses=ERRORS
)
def reclassify_cells(
    sample_id: Id, body: Reclassify, who: Editor, db: DB, model: Model, settings: SettingsDep
) -> ReclassifyResult:
    """Re-classify many cells at once; returns how many changed and the new counts."""
    sample = review.get_sample(db, sample_id, lock=True)
    changed = review.reclassify(
        db,
        who.user,
        sample,
        body.cell_ids,
        body.label,
        model.classes,
        threshold=settings.threshold,
    )
    cells = review.sample_cells(db, sample)
    answer = ReclassifyResult.model_validate(
        {
            "changed": changed,
            "summary": review.summary(
                sample, cells, model.classes, settings, fields=review.sample_fields(db, sample)
            ),
        }
    )
    db.commit()  # the answer is built first: nothing after a commit can turn it into an error
    return answer


# -------------------------------------------------------------------------------------- fields


@router.post(
    "/samples/{sample_id}/fields", status_code=201, response_model=UploadResult, responses=ERRORS
)
def upload_fields(
    sample_id: Id,
    files: Annotated[
        list[UploadFile], File(description="Whole fields of view and/or zip files of them.")
    ],
    who: Editor,
    db: DB,
    database: DatabaseDep,
    settings: SettingsDep,
    store: Store,
    worker: Worker,
) -> UploadResult:
    """Upload whole fields of view: the detector finds their white cells in the background and
    each one is classified and enters review (``accepted`` lists the fields)."""
    review.check_uploadable(database, sample_id)
    accepted, rejected = validate_files(
        ((f.filename or "", f.file) for f in files), settings, fields=True, store=store
    )
    sample = review.get_sample(db, sample_id, lock=True)
    added, duplicates = review.add_fields(db, who.user, sample, accepted, store)
    answer = UploadResult.model_validate(
        {
            "accepted": [{"id": f.id, "name": f.original_name} for f in added],
            "rejected": [
                {"name": r.name, "reason": r.reason, "message": r.message}
                for r in rejected + duplicates
            ],
        }
    )
    db.commit()
    if added:
        worker.notify()
    return answer


@router.get("/samples/{sample_id}/fields", response_model=list[FieldPublic], responses=ERRORS)
def list_fields(sample_id: Id, who: Viewer, db: DB) -> list[FieldPublic]:
    """The sample's fields in upload order, each with its cells' boxes."""
    sample = review.get_sample(db, sample_id)
    return [
        FieldPublic.model_validate(review.field_view(f, review.field_cells(db, f)))
        for f in review.sample_fields(db, sample)
    ]


@router.get("/samples/{sample_id}/fields/{field_id}", response_model=FieldPublic, responses=ERRORS)
def get_field(sample_id: Id, field_id: Id, who: Viewer, db: DB) -> FieldPublic:
    """One field: scale, detector, warnings and its cells' boxes (rejected ones flagged)."""
    sample = review.get_sample(db, sample_id)
    field = review.get_field(db, sample, field_id)
    return FieldPublic.model_validate(review.field_view(field, review.field_cells(db, field)))


@router.post(
    "/samples/{sample_id}/fields/{field_id}/cells",
    status_code=201,
    response_model=CellPublic,
    responses={**ERRORS, 422: {"model": Problem, "description": "A point outside the field"}},
)
def add_field_cell(
    sample_id: Id,
    field_id: Id,
    body: Point,
    who: Editor,
    database: DatabaseDep,
    db: DB,
    model: Model,
    settings: SettingsDep,
    store: Store,
    worker: Worker,
) -> CellPublic:
    """Add a cell the detector missed: the point (field pixels) is the cell's centre. Its crop
    is cut at the field's scale, classified in the background, and it enters review (audited as
    ``cell.add``)."""
    cell = review.add_cell_at_point(
        database, db, who.user, sample_id, field_id, (body.x, body.y), store, worker.crop_spec()
    )
    answer = CellPublic.model_validate(review.cell_view(cell, model.classes, settings.threshold))
    db.commit()
    worker.notify()
    return answer


@router.post(
    "/samples/{sample_id}/cells/{cell_id}/reject", response_model=CellPublic, responses=ERRORS
)
def reject_cell(
    sample_id: Id, cell_id: Id, who: Editor, db: DB, model: Model, settings: SettingsDep
) -> CellPublic:
    """Reject a cell: it leaves the count, the sign-off check and the report (audited with the
    reason, undo with ``restore``). A field's cell is rejected as "not a white cell", an uploaded
    crop (debris, a smudge, a red cell, an unusable image) as "not a countable cell"."""
    sample = review.get_sample(db, sample_id, lock=True)
    cell = review.reject_cell(db, who.user, sample, cell_id, rejected=True)
    answer = CellPublic.model_validate(review.cell_view(cell, model.classes, settings.threshold))
    db.commit()
    return answer


@router.post(
    "/samples/{sample_id}/cells/{cell_id}/restore", response_model=CellPublic, responses=ERRORS
)
def restore_cell(
    sample_id: Id, cell_id: Id, who: Editor, db: DB, model: Model, settings: SettingsDep
) -> CellPublic:
    """Take back a rejection: the cell counts again (audited)."""
    sample = review.get_sample(db, sample_id, lock=True)
    cell = review.reject_cell(db, who.user, sample, cell_id, rejected=False)
    answer = CellPublic.model_validate(review.cell_view(cell, model.classes, settings.threshold))
    db.commit()
    return answer


# ------------------------------------------------------------------------- sign-off and audit


@router.post("/samples/{sample_id}/signoff", response_model=SamplePublic, responses=ERRORS)
def signoff(sample_id: Id, who: Editor, db: DB, settings: SettingsDep) -> SamplePublic:
    """Sign the sample off (signer or admin; every cell reviewed). Read-only afterwards."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.signoff(db, who.user, sample, settings.threshold)
    answer = sample_public(sample)
    db.commit()
    return answer


@router.get("/samples/{sample_id}/audit", response_model=list[AuditEventPublic], responses=ERRORS)
def sample_audit(
    sample_id: Id, who: Viewer, db: DB, skip: Skip = 0, limit: Limit = 100
) -> list[AuditEventPublic]:
    """Every recorded change of the sample, oldest first: user, time, action, old and new value
    (``skip`` and ``limit`` page through them)."""
    sample = review.get_sample(db, sample_id)
    return [
        AuditEventPublic.model_validate(e)
        for e in review.audit_trail(db, sample, skip=skip, limit=limit)
    ]


# ---------------------------------------------------------------------------------------- report


@router.get(
    "/samples/{sample_id}/report",
    response_model=ReportPublic,
    responses={
        **ERRORS,
        200: {
            "description": "The report (JSON), or with ``format=csv`` the CSV download.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
    },
)
def report(
    sample_id: Id,
    who: Viewer,
    db: DB,
    model: Model,
    settings: SettingsDep,
    format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
) -> ReportPublic | Response:
    """The signed differential count (409 before sign-off): JSON, or CSV with ``format=csv``."""
    sample = review.get_sample(db, sample_id)
    data = review.report_data(db, sample, model.classes, settings, model.info.to_dict())
    if format == "csv":
        return report_download(data)
    return ReportPublic.model_validate(data)


# --------------------------------------------------------------------------------------- predict


@router.post(
    "/predict",
    response_model=Prediction,
    responses={**ERRORS, 422: {"model": Problem, "description": "Bad image"}},
)
def predict(
    file: Annotated[UploadFile, File(description="One cell image.")],
    who: Editor,
    model: Model,
    settings: SettingsDep,
) -> Prediction:
    """Stateless: one image in, class probabilities out (nothing is stored)."""
    name = file.filename or "upload"
    data = read_capped(file.file, settings.max_file_bytes)
    if data is None:
        raise review.Invalid(f"{name}: file is above the {settings.max_file_bytes:,}-byte limit")
    judged = check_image(name, data, settings)
    if not isinstance(judged, Accepted):
        raise review.Invalid(judged.message)
    probs = model.predict_proba([data])[0]
    classes = model.classes
    order = sorted(range(len(classes)), key=lambda i: -float(probs[i]))
    return Prediction.model_validate(
        {
            "name": name,
            "model": model.info.version,
            "predicted": classes[order[0]],
            "confidence": float(probs[order[0]]),
            "identified": float(probs[order[0]]) >= settings.threshold,
            "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
            "top3": [{"class": classes[i], "probability": float(probs[i])} for i in order[:3]],
        }
    )

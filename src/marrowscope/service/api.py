"""The JSON API under ``/api`` (OpenAPI schema at ``/api/openapi.json``, login required).

Same rules as the pages: every route except ``/api/health`` needs a login (bearer token or the
login cookie plus its CSRF token for changes); a signed sample refuses every change (409); only
a signer signs off (403).
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Path, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select, text

import marrowscope
from marrowscope.reports.count_report import CELL_NAMES
from marrowscope.service import review
from marrowscope.service.deps import DB, Editor, Model, SettingsDep, Store, Viewer, Worker
from marrowscope.service.models import AGE_BANDS, REFERRAL_QUESTIONS, AuditEvent, Sample
from marrowscope.service.uploads import Accepted, check_image, read_capped, validate_files

__all__ = ["report_csv", "router"]

router = APIRouter(prefix="/api", tags=["api"])

MAX_ID = 2**31 - 1


def _clean_text(value: str | None) -> str | None:
    """Refuse NUL and other control characters (except tab/newline) and unencodable text."""
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    if any((ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 for c in value):
        raise ValueError("text must not contain control characters")
    return value


Text = Annotated[str, AfterValidator(_clean_text)]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
SampleCode = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
AgeBand = Literal[AGE_BANDS]  # type: ignore[valid-type]
Referral = Literal[REFERRAL_QUESTIONS]  # type: ignore[valid-type]
Day = Annotated[date, Field(ge=date(1900, 1, 1), le=date(2999, 12, 31))]


class SampleIn(BaseModel):
    """A new sample: a pseudonymous id, never a patient name."""

    model_config = ConfigDict(extra="forbid")

    code: SampleCode = Field(description="Pseudonymous sample id, e.g. BM-2025-0001.")
    collected_on: Day | None = None
    age_band: AgeBand = "unknown"
    referral_question: Referral | None = None
    notes: Annotated[Text, Field(max_length=10_000)] = ""


class SampleUpdate(BaseModel):
    """Fields to change (omitted = unchanged)."""

    model_config = ConfigDict(extra="forbid")

    code: SampleCode | None = None
    collected_on: Day | None = None
    age_band: AgeBand | None = None
    referral_question: Referral | None = None
    notes: Annotated[Text, Field(max_length=10_000)] | None = None


class SampleOut(BaseModel):
    id: int
    code: str
    collected_on: date | None
    age_band: str
    referral_question: str | None
    notes: str
    created_at: datetime
    created_by: str
    signed: bool
    signed_at: datetime | None
    signed_by: str | None
    cells: int | None = None
    pending: int | None = None
    unreviewed: int | None = None
    summary: dict[str, Any] | None = None


class Reclassify(BaseModel):
    """Set the reviewed label of cells; ``label: null`` confirms each cell's current label
    (the reviewed one, else the model's call)."""

    model_config = ConfigDict(extra="forbid")

    cell_ids: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]], Field(min_length=1, max_length=10_000)
    ]
    label: Annotated[str, Field(max_length=32)] | None = None


class Relabel(BaseModel):
    """The reviewed label of one cell (``null`` confirms its current label)."""

    model_config = ConfigDict(extra="forbid")

    label: Annotated[str, Field(max_length=32)] | None = None


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Login required"},
    403: {"model": Problem, "description": "Not allowed (role or CSRF token)"},
    404: {"model": Problem, "description": "No such sample or cell"},
    409: {"model": Problem, "description": "Conflict (signed sample, not ready)"},
}


def sample_out(
    sample: Sample, counts: tuple[int, int, int] | None = None, **extra: Any
) -> SampleOut:
    """The API view of a sample."""
    n, pending, unreviewed = counts if counts else (None, None, None)
    return SampleOut(
        id=sample.id,
        code=sample.code,
        collected_on=sample.collected_on,
        age_band=sample.age_band,
        referral_question=sample.referral_question,
        notes=sample.notes,
        created_at=sample.created_at,
        created_by=sample.created_by.username,
        signed=sample.signed,
        signed_at=sample.signed_at,
        signed_by=sample.signed_by.username if sample.signed_by else None,
        cells=n,
        pending=pending,
        unreviewed=unreviewed,
        **extra,
    )


# -------------------------------------------------------------------------------- basic routes


@router.get("/health")
def health(db: DB) -> dict[str, str]:
    """Liveness and database check (no login needed)."""
    db.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, who: Viewer) -> JSONResponse:
    """The OpenAPI schema of this API (login required)."""
    return JSONResponse(request.app.openapi())


@router.get("/model", responses=ERRORS)
def model_info(who: Viewer, model: Model, settings: SettingsDep) -> dict[str, Any]:
    """The model: name, version, classes (in index order) and the unidentified threshold."""
    return {
        **model.info.to_dict(),
        "threshold": settings.threshold,
        "app_version": marrowscope.__version__,
    }


@router.get("/me", responses=ERRORS)
def me(who: Viewer) -> dict[str, Any]:
    """The logged-in user."""
    out = {"username": who.user.username, "role": who.user.role, "via": who.via}
    if who.csrf:
        out["csrf_token"] = who.csrf  # for scripts using the login cookie (send as X-CSRF-Token)
    return out


# ------------------------------------------------------------------------------------- samples


@router.get("/samples", responses=ERRORS)
def list_samples(who: Viewer, db: DB) -> list[SampleOut]:
    """Every sample, newest first, with cell counts."""
    return [sample_out(s, (n, p, u)) for s, n, p, u in review.list_samples(db)]


@router.post("/samples", status_code=201, responses=ERRORS)
def create_sample(body: SampleIn, who: Editor, db: DB) -> SampleOut:
    """Create a sample."""
    sample = review.create_sample(db, who.user, review.SampleFields(**body.model_dump()))
    db.commit()
    return sample_out(sample, (0, 0, 0))


@router.get("/samples/{sample_id}", responses=ERRORS)
def get_sample(
    sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> SampleOut:
    """One sample with its progress, differential counts and hairy-cell flag."""
    sample = review.get_sample(db, sample_id)
    cells = review.sample_cells(db, sample)
    s = review.summary(sample, cells, model.classes, settings)
    p = s["progress"]
    return sample_out(sample, (p["total"], p["pending"], p["total"] - p["reviewed"]), summary=s)


@router.patch("/samples/{sample_id}", responses=ERRORS)
def update_sample(sample_id: Id, body: SampleUpdate, who: Editor, db: DB) -> SampleOut:
    """Change sample fields (refused once signed)."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.update_sample(
        db, who.user, sample, review.SampleFields(**body.model_dump(exclude_unset=True))
    )
    db.commit()
    return sample_out(sample)


@router.delete("/samples/{sample_id}", status_code=204, responses=ERRORS)
def delete_sample(sample_id: Id, who: Editor, db: DB) -> Response:
    """Delete an unsigned sample (hidden; its records and audit trail are kept)."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.delete_sample(db, who.user, sample)
    db.commit()
    return Response(status_code=204)


# --------------------------------------------------------------------------------------- cells


@router.get("/samples/{sample_id}/cells", responses=ERRORS)
def list_cells(
    sample_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> list[dict[str, Any]]:
    """The sample's cells with model call, confidence, top-3 and reviewed label."""
    sample = review.get_sample(db, sample_id)
    return [
        review.cell_view(c, model.classes, settings.threshold)
        for c in review.sample_cells(db, sample)
    ]


def upload_result(added: list[Any], rejected: list[Any]) -> dict[str, Any]:
    """What an upload answers: the accepted cells and each refused file with its reason."""
    return {
        "accepted": [{"id": c.id, "name": c.original_name} for c in added],
        "rejected": [{"name": r.name, "reason": r.reason, "message": r.message} for r in rejected],
    }


@router.post("/samples/{sample_id}/cells", status_code=201, responses=ERRORS)
def upload_cells(
    sample_id: Id,
    files: Annotated[list[UploadFile], File(description="Cell images and/or zip files of them.")],
    who: Editor,
    db: DB,
    settings: SettingsDep,
    store: Store,
    worker: Worker,
) -> dict[str, Any]:
    """Upload cell images (many files and/or zips); refused files are listed by name."""
    # Judge the files before touching the database (no lock is held while images decode).
    accepted, rejected = validate_files(((f.filename or "", f.file) for f in files), settings)
    sample = review.get_sample(db, sample_id, lock=True)
    added, duplicates = review.add_cells(db, who.user, sample, accepted, store)
    db.commit()
    if added:
        worker.notify()
    return upload_result(added, rejected + duplicates)


@router.get("/samples/{sample_id}/cells/{cell_id}", responses=ERRORS)
def get_cell(
    sample_id: Id, cell_id: Id, who: Viewer, db: DB, model: Model, settings: SettingsDep
) -> dict[str, Any]:
    """One cell."""
    sample = review.get_sample(db, sample_id)
    return review.cell_view(review.get_cell(db, sample, cell_id), model.classes, settings.threshold)


@router.patch("/samples/{sample_id}/cells/{cell_id}", responses=ERRORS)
def relabel_cell(
    sample_id: Id,
    cell_id: Id,
    body: Relabel,
    who: Editor,
    db: DB,
    model: Model,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Re-classify one cell (``label: null`` confirms its current label)."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.reclassify(db, who.user, sample, [cell_id], body.label, model.classes)
    db.commit()
    return review.cell_view(review.get_cell(db, sample, cell_id), model.classes, settings.threshold)


@router.post("/samples/{sample_id}/cells/reclassify", responses=ERRORS)
def reclassify_cells(
    sample_id: Id, body: Reclassify, who: Editor, db: DB, model: Model, settings: SettingsDep
) -> dict[str, Any]:
    """Re-classify many cells at once; returns how many changed and the new counts."""
    sample = review.get_sample(db, sample_id, lock=True)
    changed = review.reclassify(db, who.user, sample, body.cell_ids, body.label, model.classes)
    db.commit()
    cells = review.sample_cells(db, sample)
    return {"changed": changed, "summary": review.summary(sample, cells, model.classes, settings)}


# ------------------------------------------------------------------------- sign-off and audit


@router.post("/samples/{sample_id}/signoff", responses=ERRORS)
def signoff(sample_id: Id, who: Editor, db: DB, settings: SettingsDep) -> SampleOut:
    """Sign the sample off (signer or admin; every cell reviewed). Read-only afterwards."""
    sample = review.get_sample(db, sample_id, lock=True)
    review.signoff(db, who.user, sample, settings.threshold)
    db.commit()
    return sample_out(sample)


def audit_rows(db: Any, sample: Sample) -> list[dict[str, Any]]:
    """The sample's audit trail, oldest first."""
    events = db.scalars(
        select(AuditEvent).where(AuditEvent.sample_id == sample.id).order_by(AuditEvent.id)
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


@router.get("/samples/{sample_id}/audit", responses=ERRORS)
def sample_audit(sample_id: Id, who: Viewer, db: DB) -> list[dict[str, Any]]:
    """Every recorded change of the sample: user, time, action, old and new value."""
    return audit_rows(db, review.get_sample(db, sample_id))


# ---------------------------------------------------------------------------------------- report


REPORT_COLUMNS = [
    "sample_id", "collected_on", "age_band", "referral_question", "class", "cell_type",
    "count", "percent", "model_count", "model_percent", "hac_flag", "hac_flag_message",
    "model", "model_version", "reviewers", "signed_by", "signed_at",
]  # fmt: skip


def report_csv(data: dict[str, Any]) -> str:
    """The signed differential count as CSV: one row per class, sample fields on every row."""
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
            ]  # fmt: skip
        )
    return buf.getvalue()


@router.get("/samples/{sample_id}/report", responses=ERRORS)
def report(
    sample_id: Id,
    who: Viewer,
    db: DB,
    model: Model,
    settings: SettingsDep,
    format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
) -> Any:
    """The signed differential count (409 before sign-off): JSON, or CSV with ``format=csv``."""
    sample = review.get_sample(db, sample_id)
    data = review.report_data(db, sample, model.classes, settings, model.info.to_dict())
    if format == "csv":
        return Response(
            report_csv(data),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{sample.code}-report.csv"'},
        )
    return data


# --------------------------------------------------------------------------------------- predict


@router.post("/predict", responses={**ERRORS, 422: {"model": Problem, "description": "Bad image"}})
def predict(
    file: Annotated[UploadFile, File(description="One cell image.")],
    who: Editor,
    model: Model,
    settings: SettingsDep,
) -> dict[str, Any]:
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
    return {
        "name": name,
        "model": model.info.version,
        "predicted": classes[order[0]],
        "confidence": float(probs[order[0]]),
        "identified": float(probs[order[0]]) >= settings.threshold,
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
        "top3": [{"class": classes[i], "probability": float(probs[i])} for i in order[:3]],
    }

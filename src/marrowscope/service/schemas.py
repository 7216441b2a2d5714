"""The JSON shapes of the API: request bodies and the named response models of every route.

Response models mirror the dicts :mod:`.review` builds (:func:`~.review.cell_view`,
:func:`~.review.summary`, :func:`~.review.report_data`...) field for field, so the OpenAPI schema
describes exactly what the routes answer; a field a class name would clash with (``class``) is
declared under an alias. Timestamps built by the review service stay ISO 8601 strings.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from marrowscope.service.models import AGE_BANDS, REFERRAL_QUESTIONS
from marrowscope.service.web import MAX_ID

__all__ = [
    "AuditEventPublic",
    "Blocking",
    "CellPublic",
    "ClassProbability",
    "DifferentialRow",
    "Evidence",
    "FieldCell",
    "FieldNotSearched",
    "FieldPublic",
    "FlagPublic",
    "Health",
    "Me",
    "ModelInfoPublic",
    "ModelPublic",
    "Point",
    "Prediction",
    "Problem",
    "Progress",
    "Reclassify",
    "ReclassifyResult",
    "RefusedFile",
    "RejectedCell",
    "Relabel",
    "ReportModel",
    "ReportPublic",
    "ReportSample",
    "ReportSettings",
    "SampleIn",
    "SamplePublic",
    "SampleUpdate",
    "SummaryPublic",
    "Totals",
    "UploadResult",
    "UploadedCell",
]


# ------------------------------------------------------------------------------ request bodies


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
SampleCode = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
AgeBand = Literal[AGE_BANDS]  # type: ignore[valid-type]
Referral = Literal[REFERRAL_QUESTIONS]  # type: ignore[valid-type]
Day = Annotated[date, Field(ge=date(1900, 1, 1), le=date(2999, 12, 31))]
Label = Annotated[str, Field(max_length=32)]


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


class Reclassify(BaseModel):
    """Set the reviewed label of cells; ``label: null`` confirms each cell's current label
    (the reviewed one, else the model's call)."""

    model_config = ConfigDict(extra="forbid")

    cell_ids: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID)]], Field(min_length=1, max_length=10_000)
    ]
    label: Label | None = None


class Relabel(BaseModel):
    """The reviewed label of one cell (``null`` confirms its current label)."""

    model_config = ConfigDict(extra="forbid")

    label: Label | None = None


# ----------------------------------------------------------------------------------- responses


class Point(BaseModel):
    """A point of a field, in its pixels (``x`` right, ``y`` down from the top-left corner)."""

    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=0, le=1_000_000)
    y: float = Field(ge=0, le=1_000_000)


class Problem(BaseModel):
    """An error: what went wrong and what to do."""

    detail: str


class Health(BaseModel):
    """The service and its database answer."""

    status: str


class ModelInfoPublic(BaseModel):
    """The model the app classifies with."""

    name: str = Field(description="The training config's name (or the architecture).")
    arch: str
    version: str = Field(description="arch:<first 12 hex of the weights' SHA-256>.")
    marrowscope_version: str = Field(description="The marrowscope version that wrote the bundle.")
    classes: list[str] = Field(description="Class names in index order.")
    input_size: int
    backend: str
    checkpoint: str


class ModelPublic(ModelInfoPublic):
    """The model, the unidentified threshold and the app's version."""

    threshold: float = Field(description="Below this top probability a cell is unidentified.")
    app_version: str


class Me(BaseModel):
    """The logged-in user and how they logged in."""

    username: str
    role: str
    via: Literal["session", "token"]
    csrf_token: str | None = Field(
        default=None,
        description="Login cookie only (absent for tokens): send it as X-CSRF-Token on changes.",
    )


class ClassProbability(BaseModel):
    """One class and its probability."""

    class_: str = Field(alias="class")
    probability: float


class Progress(BaseModel):
    """How many cells are in each state."""

    total: int
    pending: int
    classified: int
    failed: int
    reviewed: int
    rejected: int = Field(
        0,
        description="Cells rejected (a field's cell as not a white cell, an uploaded crop as not "
        "a countable cell): not counted.",
    )
    fields: int = Field(0, description="Whole fields of view uploaded.")
    fields_pending: int = Field(0, description="Fields still being searched for white cells.")
    fields_failed: int = Field(
        0,
        description="Fields that could not be searched (their cells are not in the count; "
        "upload the field again to retry).",
    )


class Blocking(BaseModel):
    """What stops a sign-off: the unreviewed cells, by why they are not counted yet, and the
    cells the model is still classifying (reviewed or not)."""

    unreviewed: int
    unidentified: int = Field(description="Unreviewed cells below the threshold.")
    pending: int = Field(description="Cells still being classified, reviewed or not.")
    failed: int = Field(description="Unreviewed cells the model could not read.")


class DifferentialRow(BaseModel):
    """One class of the differential count: the model's and the reviewed count."""

    class_: str = Field(alias="class")
    name: str = Field(description="The cell type's name ('' when unknown).")
    model_count: int
    model_percent: float
    reviewed_count: int
    reviewed_percent: float


class Totals(BaseModel):
    """How many cells each count is made of."""

    model: int
    reviewed: int


class Evidence(BaseModel):
    """A cell behind the hairy-cell flag."""

    id: int
    name: str
    probability: float


class FlagPublic(BaseModel):
    """The hairy-cell flag, on the reviewed count once any cell is reviewed, else the model's."""

    basis: Literal["model", "reviewed"]
    status: str
    message: str
    hac_class: str | None
    count: int
    percent: float
    min_percent: float
    min_count: int
    evidence: list[Evidence]
    model_status: str


class SummaryPublic(BaseModel):
    """A sample's progress, differential counts and hairy-cell flag."""

    sample_id: int
    code: str
    signed: bool
    progress: Progress
    blocking: Blocking
    can_sign: bool
    signoff_message: str = Field(
        description="Why the sample cannot be signed off yet, or that it can (naming any field "
        "that could not be searched and is left out of the count)."
    )
    threshold: float
    differential: list[DifferentialRow]
    totals: Totals
    flag: FlagPublic


class SamplePublic(BaseModel):
    """A sample; the counts when the route gives them, the summary for one sample."""

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
    summary: SummaryPublic | None = None


class CellPublic(BaseModel):
    """A cell: the model's call, its top-3 probabilities and the reviewed label."""

    id: int
    name: str = Field(description="The uploaded file's name.")
    sha256: str
    width: int
    height: int
    status: str = Field(description="pending, done or error.")
    predicted: str | None
    confidence: float | None
    identified: bool
    top3: list[ClassProbability]
    reviewed_label: str | None
    reviewed_by: str | None
    reviewed_at: str | None
    label: str | None = Field(description="The reviewed label, else the identified model call.")
    model_version: str | None
    error: str | None
    field_id: int | None = Field(None, description="The field it was cut from (None: a crop).")
    box: list[float] | None = Field(
        None, description="x_min, y_min, x_max, y_max in the field's pixels."
    )
    detection_score: float | None = None
    origin: Literal["detected", "added"] | None = Field(
        None, description="Found by the detector, or added by a reviewer (None: a crop)."
    )
    rejected: bool = Field(False, description="Rejected by a reviewer: not counted.")
    rejected_reason: str | None = Field(
        None,
        description="Why it is not counted: 'not a white cell' (a field's cell) or 'not a "
        "countable cell' (an uploaded crop); None while it counts.",
    )


class FieldCell(BaseModel):
    """A cell of a field: its box and where it stands."""

    id: int
    box: list[float] | None
    score: float | None
    origin: str | None
    rejected: bool
    label: str | None = Field(description="The reviewed label, else the model's call.")
    reviewed: bool


class FieldPublic(BaseModel):
    """A whole field of view: its scale, the detector's findings and its cells' boxes."""

    id: int
    name: str
    sha256: str
    width: int
    height: int
    status: str = Field(description="pending (being searched), done or error.")
    um_per_px: float | None
    scale_source: str | None = Field(description="ruler, given or default.")
    detector: str | None
    found: int | None = Field(description="White cells the detector found (0: none).")
    warnings: list[str]
    error: str | None
    message: str = Field(description="Where the field stands, in one sentence.")
    cells: list[FieldCell]


class UploadedCell(BaseModel):
    """An accepted image, now a cell (or a field, for a field upload)."""

    id: int
    name: str


class RefusedFile(BaseModel):
    """A file that was not added, and why."""

    name: str
    reason: str
    message: str


class UploadResult(BaseModel):
    """What an upload did: the accepted cells (or fields) and each refused file with its
    reason."""

    accepted: list[UploadedCell]
    rejected: list[RefusedFile]


class ReclassifyResult(BaseModel):
    """How many cells changed and the sample's new counts."""

    changed: int
    summary: SummaryPublic


class AuditEventPublic(BaseModel):
    """One recorded change of a sample."""

    id: int
    at: str
    user: str
    action: str
    cell_id: int | None
    old: Any = Field(description="The value before (JSON; null when none).")
    new: Any = Field(description="The value after (JSON; null when none).")


class ReportSample(BaseModel):
    """The sample fields a report shows."""

    id: int
    code: str
    collected_on: str | None
    age_band: str
    referral_question: str | None
    notes: str
    created_at: str


class ReportModel(ModelInfoPublic):
    """The model, and every model version whose calls the sample's cells carry."""

    versions_used: list[str]


class ReportSettings(BaseModel):
    """The thresholds the report was made with."""

    threshold: float
    hac_min_percent: float
    hac_min_count: int


class FieldNotSearched(BaseModel):
    """A field left out of a signed count because it could not be searched for cells."""

    id: int
    name: str
    error: str | None


class RejectedCell(BaseModel):
    """A cell rejected when the sample was signed off: it is not in the count."""

    id: int
    name: str = Field(
        description="The cell's file name (a field's cell: its field's name and its number)."
    )
    reason: str = Field(
        description='"not a white cell" (a field\'s cell) or "not a countable cell" (a crop).'
    )
    field_id: int | None
    field: str | None = Field(description="The name of the field it was found in or added to.")
    box: list[float] | None = Field(
        description="Its box in the field's pixels: x_min, y_min, x_max, y_max."
    )
    predicted: str | None = Field(description="The model's call, if it was classified.")
    confidence: float | None
    rejected_by: str | None
    rejected_at: str | None


class ReportPublic(BaseModel):
    """The signed differential count."""

    sample: ReportSample
    signed_at: str | None
    signed_by: str | None
    reviewers: list[str]
    model: ReportModel
    settings: ReportSettings
    cells: int
    differential: list[DifferentialRow]
    totals: Totals
    flag: FlagPublic
    changed_by_review: int = Field(description="Cells whose reviewed label is not the model's.")
    rejected: int = Field(0, description="Cells rejected: not in the count (``cells``).")
    rejected_cells: list[RejectedCell] = Field(
        default_factory=list, description="Every rejected cell, named, in upload order."
    )
    fields: int = Field(0, description="Whole fields of view uploaded to the sample.")
    fields_not_searched: list[FieldNotSearched] = Field(
        default_factory=list,
        description="Fields that could not be searched when the sample was signed off: none of "
        "their cells is in the count.",
    )


class Prediction(BaseModel):
    """One image's class probabilities (nothing is stored)."""

    name: str
    model: str = Field(description="The model version.")
    predicted: str
    confidence: float
    identified: bool
    probabilities: dict[str, float]
    top3: list[ClassProbability]

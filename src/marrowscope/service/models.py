"""The review app's tables (SQLAlchemy 2 declarative models; the schema lives in Alembic).

Portable SQL only (SQLite and PostgreSQL): JSON columns through SQLAlchemy's ``JSON`` type,
timestamps stored as UTC. :class:`AuditEvent` rows are append-only: a flush that would change or
delete one raises (there is no update or delete path for them in the app either).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "AGE_BANDS",
    "REFERRAL_QUESTIONS",
    "ROLES",
    "ApiToken",
    "AuditEvent",
    "Base",
    "Cell",
    "Field",
    "LoginSession",
    "Sample",
    "User",
    "utcnow",
]

ROLES = ("reviewer", "signer", "admin")
"""Roles in increasing power: a signer can do what a reviewer does and sign samples off; an
admin can do both and manage users."""

AGE_BANDS = ("unknown", "0-17", "18-39", "40-59", "60-79", "80+")
"""Structured clinical field: the patient's age band (no birth date is stored)."""

REFERRAL_QUESTIONS = (
    "cytopenia",
    "suspected acute leukaemia",
    "suspected hairy-cell leukaemia",
    "lymphoma staging",
    "plasma-cell disorder",
    "follow-up after treatment",
    "other",
)
"""Structured clinical field: why the marrow was sent."""

CELL_PENDING = "pending"
CELL_DONE = "done"
CELL_ERROR = "error"

ORIGIN_DETECTED = "detected"
"""A cell found by the field detector."""
ORIGIN_ADDED = "added"
"""A cell a reviewer added by clicking on its field (the detector missed it)."""

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention (stable constraint names for migrations)."""

    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    """An account. Passwords are stored as argon2 hashes only."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def can(self, role: str) -> bool:
        """True when this user's role is ``role`` or a more powerful one."""
        return ROLES.index(self.role) >= ROLES.index(role)


class ApiToken(Base):
    """A bearer token for the JSON API; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    user: Mapped[User] = relationship()


class LoginSession(Base):
    """A browser login. The cookie holds a random id whose SHA-256 is the key; logout ends it."""

    __tablename__ = "login_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    user: Mapped[User] = relationship()


LIVE_SAMPLE = "deleted_at IS NULL"
"""The rows of samples that are not deleted (the predicate of the partial unique index)."""


class Sample(Base):
    """One patient sample (pseudonymous id; no names or birth dates).

    The sample id (``code``) is unique among the samples not deleted: a deleted sample keeps
    its row, code and audit trail, and its code may be given to a new sample (a partial unique
    index, so the database itself refuses two live samples with one code).
    """

    __tablename__ = "samples"
    __table_args__ = (
        Index(
            "uq_samples_code_live",
            "code",
            unique=True,
            sqlite_where=text(LIVE_SAMPLE),
            postgresql_where=text(LIVE_SAMPLE),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64))
    collected_on: Mapped[date | None] = mapped_column(Date, nullable=True)
    age_band: Mapped[str] = mapped_column(String(16), default="unknown")
    referral_question: Mapped[str | None] = mapped_column(String(64), nullable=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    signed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    created_by: Mapped[User] = relationship(foreign_keys=[created_by_id])
    signed_by: Mapped[User | None] = relationship(foreign_keys=[signed_by_id])

    @property
    def signed(self) -> bool:
        """True once a signer signed the sample off (it is read-only then)."""
        return self.signed_at is not None


class Field(Base):
    """One uploaded whole field of view of a sample: the detector finds its white cells, each
    of which becomes a :class:`Cell` (its crop cut at the classifier's scale).

    ``status`` is ``pending`` until the detector ran (``done``) or could not (``error``, with
    ``error`` saying why); ``found`` is how many white cells it found (0: none, said so).
    """

    __tablename__ = "fields"
    __table_args__ = (UniqueConstraint("sample_id", "sha256", name="uq_fields_sample_id_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str] = mapped_column(String(300))
    original_name: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=CELL_PENDING, index=True)
    um_per_px: Mapped[float | None] = mapped_column(Float, nullable=True)
    scale_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    detector: Mapped[str | None] = mapped_column(String(200), nullable=True)
    found: Mapped[int | None] = mapped_column(Integer, nullable=True)
    warnings: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    uploaded_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Cell(Base):
    """One single-cell image of a sample, its model call and its reviewed label.

    A cell is an uploaded crop, or (``field_id`` set) a crop cut from a field around a box the
    detector found (``origin`` ``detected``) or a reviewer added (``added``). Any cell can be
    rejected (``rejected_at``): a field's cell as "not a white cell", an uploaded crop as "not a
    countable cell"; it then leaves the count.
    """

    __tablename__ = "cells"
    __table_args__ = (
        UniqueConstraint("sample_id", "sha256", name="uq_cells_sample_id_sha256"),
        Index("ix_cells_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str] = mapped_column(String(300))
    original_name: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=CELL_PENDING)
    predicted_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewed_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reviewed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    uploaded_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    field_id: Mapped[int | None] = mapped_column(ForeignKey("fields.id"), nullable=True, index=True)
    box_x0: Mapped[float | None] = mapped_column(Float, nullable=True)
    box_y0: Mapped[float | None] = mapped_column(Float, nullable=True)
    box_x1: Mapped[float | None] = mapped_column(Float, nullable=True)
    box_y1: Mapped[float | None] = mapped_column(Float, nullable=True)
    detection_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    origin: Mapped[str | None] = mapped_column(String(16), nullable=True)
    rejected_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rejected_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)

    reviewed_by: Mapped[User | None] = relationship(foreign_keys=[reviewed_by_id])
    rejected_by: Mapped[User | None] = relationship(foreign_keys=[rejected_by_id])

    @property
    def rejected(self) -> bool:
        """True when a reviewer rejected it (it is not counted)."""
        return self.rejected_at is not None

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """``(x_min, y_min, x_max, y_max)`` in its field's pixels (``None``: not from a field)."""
        x0, y0, x1, y1 = self.box_x0, self.box_y0, self.box_x1, self.box_y1
        if x0 is None or y0 is None or x1 is None or y1 is None:
            return None
        return (x0, y0, x1, y1)


class AuditEvent(Base):
    """One recorded change: who, when, what, the old and the new value. Append-only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(40))
    sample_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    cell_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    old_value: Mapped[Any] = mapped_column(JSON, nullable=True)
    new_value: Mapped[Any] = mapped_column(JSON, nullable=True)


@event.listens_for(Session, "before_flush")
def _audit_is_append_only(session: Session, flush_context: Any, instances: Any) -> None:
    for obj in (*session.dirty, *session.deleted):
        if isinstance(obj, AuditEvent):
            raise PermissionError(
                f"audit event {obj.id} cannot be changed or deleted: the audit log is append-only"
            )

"""Sample ids are unique among live samples only: a deleted sample's id may be reused

The table-level ``UNIQUE (code)`` of ``samples`` becomes the partial unique index
``uq_samples_code_live`` on ``code`` ``WHERE deleted_at IS NULL`` (SQLite and PostgreSQL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "uq_samples_code_live"
CONSTRAINT = "uq_samples_code"
LIVE = "deleted_at IS NULL"
COLUMNS = (
    "id", "code", "collected_on", "age_band", "referral_question", "notes", "created_at",
    "created_by_id", "signed_at", "signed_by_id", "deleted_at",
)  # fmt: skip


def _create_samples(*extra: sa.schema.SchemaItem) -> None:
    """``samples`` as revision 0001 made it, without its unique constraint (plus ``extra``)."""
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("collected_on", sa.Date(), nullable=True),
        sa.Column("age_band", sa.String(length=16), nullable=False),
        sa.Column("referral_question", sa.String(length=64), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signed_by_id", sa.Integer(), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name=op.f("fk_samples_created_by_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["signed_by_id"], ["users.id"], name=op.f("fk_samples_signed_by_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        *extra,
    )


def _rebuild_sqlite(*extra: sa.schema.SchemaItem) -> None:
    """SQLite cannot drop a table constraint: copy the rows aside, drop and re-create the table,
    copy them back, all in the migration's one transaction.

    ``cells.sample_id`` references ``samples``: the foreign keys stay on, deferred to the commit
    (``PRAGMA defer_foreign_keys``, reset by SQLite at the commit), so dropping the table counts
    the cells as orphans and copying the rows back counts them off again; a row that did not
    come back would make the commit fail, and nothing would change.
    """
    cols = ", ".join(COLUMNS)
    op.execute("PRAGMA defer_foreign_keys = ON")
    op.execute(f"CREATE TEMP TABLE _samples_copy AS SELECT {cols} FROM samples")
    op.drop_table("samples")
    _create_samples(*extra)
    op.execute(f"INSERT INTO samples ({cols}) SELECT {cols} FROM _samples_copy")
    op.execute("DROP TABLE _samples_copy")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite()
    else:
        op.drop_constraint(CONSTRAINT, "samples", type_="unique")
    op.create_index(
        INDEX,
        "samples",
        ["code"],
        unique=True,
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )


def downgrade() -> None:
    """Back to one sample per code, deleted ones included (fails when a code was reused)."""
    op.drop_index(INDEX, table_name="samples")
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(sa.UniqueConstraint("code", name=op.f(CONSTRAINT)))
    else:
        op.create_unique_constraint(op.f(CONSTRAINT), "samples", ["code"])

"""Whole fields of view: the ``fields`` table, and each cell's field, box, origin and rejection

A sample can be uploaded as fields; the detector's cells (and the cells a reviewer adds by
clicking on a field) are ordinary cells with ``field_id``, their box in field pixels, the
detection score and ``origin`` (``detected`` / ``added``). A reviewer may reject such a cell as
"not a white cell" (``rejected_at``, ``rejected_by_id``): it leaves the count. Every new column
of ``cells`` is nullable, so the rows already there stay as they are (uploaded crops).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_FLOATS = ("box_x0", "box_y0", "box_x1", "box_y1", "detection_score")


def upgrade() -> None:
    op.create_table(
        "fields",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("stored_path", sa.String(length=300), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("um_per_px", sa.Float(), nullable=True),
        sa.Column("scale_source", sa.String(length=16), nullable=True),
        sa.Column("detector", sa.String(length=200), nullable=True),
        sa.Column("found", sa.Integer(), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("uploaded_by_id", sa.Integer(), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_fields_sample_id_samples")
        ),
        sa.ForeignKeyConstraint(
            ["uploaded_by_id"], ["users.id"], name=op.f("fk_fields_uploaded_by_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fields")),
        sa.UniqueConstraint("sample_id", "sha256", name="uq_fields_sample_id_sha256"),
    )
    op.create_index(op.f("ix_fields_sample_id"), "fields", ["sample_id"])
    op.create_index(op.f("ix_fields_status"), "fields", ["status"])
    # batch: SQLite re-creates ``cells`` (nothing references it) to add the foreign keys
    with op.batch_alter_table("cells") as batch:
        batch.add_column(sa.Column("field_id", sa.Integer(), nullable=True))
        for name in _FLOATS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))
        batch.add_column(sa.Column("origin", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rejected_by_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f("fk_cells_field_id_fields"), "fields", ["field_id"], ["id"])
        batch.create_foreign_key(
            op.f("fk_cells_rejected_by_id_users"), "users", ["rejected_by_id"], ["id"]
        )
        batch.create_index(op.f("ix_cells_field_id"), ["field_id"])


def downgrade() -> None:
    """Back to crops only: the fields and the field cells' boxes are dropped (the cells cut from
    fields stay, as uploaded crops)."""
    with op.batch_alter_table("cells") as batch:
        batch.drop_index(op.f("ix_cells_field_id"))
        batch.drop_constraint(op.f("fk_cells_rejected_by_id_users"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_cells_field_id_fields"), type_="foreignkey")
        for name in ("rejected_by_id", "rejected_at", "origin", *reversed(_FLOATS), "field_id"):
            batch.drop_column(name)
    op.drop_index(op.f("ix_fields_status"), table_name="fields")
    op.drop_index(op.f("ix_fields_sample_id"), table_name="fields")
    op.drop_table("fields")

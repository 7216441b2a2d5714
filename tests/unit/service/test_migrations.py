"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from marrowscope.service.db import Database, migrate
from marrowscope.service.models import Base


def test_upgrade_head_matches_the_models_and_sets_wal(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        migrate(db)
        migrate(db)  # idempotent
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == []
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        tables = set(inspect(db.engine).get_table_names())
        assert tables >= {"users", "samples", "cells", "audit_events", "alembic_version"}
    finally:
        db.dispose()

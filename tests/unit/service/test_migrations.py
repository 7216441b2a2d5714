"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from marrowscope.service.db import Database, alembic_config, migrate
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


def test_0002_keeps_every_sample_and_cell_and_lets_deleted_codes_be_reused(tmp_path: Path) -> None:
    """0001 -> head on a database with data (SQLite rebuilds ``samples``, which ``cells``
    references): every row survives, the foreign keys still hold, and only live samples must
    have distinct codes; the downgrade restores one code per sample."""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        migrate(db, "0001")
        now = "2026-01-01 10:00:00.000000"
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                    "VALUES (1, 'rev', 'x', 'reviewer', 1, :now)"
                ),
                {"now": now},
            )
            for sid, code, deleted in [(1, "BM-1", now), (2, "BM-2", None), (3, "BM-3", None)]:
                conn.execute(
                    text(
                        "INSERT INTO samples (id, code, age_band, notes, created_at, "
                        "created_by_id, deleted_at) VALUES (:id, :code, 'unknown', 'n', :now, 1, "
                        ":deleted)"
                    ),
                    {"id": sid, "code": code, "now": now, "deleted": deleted},
                )
            for cid, sid in [(10, 1), (11, 2), (12, 2)]:
                conn.execute(
                    text(
                        "INSERT INTO cells (id, sample_id, sha256, stored_path, original_name, "
                        "width, height, status, uploaded_by_id, uploaded_at) VALUES (:id, :sid, "
                        ":sha, 'p', 'c.jpg', 1, 1, 'done', 1, :now)"
                    ),
                    {"id": cid, "sid": sid, "sha": f"{cid:064d}", "now": now},
                )
            before = conn.execute(text("SELECT * FROM samples ORDER BY id")).all()
        migrate(db)
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT * FROM samples ORDER BY id")).all() == before
            assert conn.execute(text("SELECT id, sample_id FROM cells ORDER BY id")).all() == [
                (10, 1), (11, 2), (12, 2),
            ]  # fmt: skip
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            insert = (
                "INSERT INTO samples (code, age_band, notes, created_at, created_by_id) "
                "VALUES (:code, 'unknown', '', :now, 1)"
            )
            conn.execute(text(insert), {"code": "BM-1", "now": now})  # a deleted sample's code
        for code in ("BM-1", "BM-2"):  # ... but never a live sample's
            with pytest.raises(IntegrityError), db.engine.begin() as conn:
                conn.execute(text(insert), {"code": code, "now": now})
        with pytest.raises(IntegrityError), db.engine.begin() as conn:  # cells still checked
            conn.execute(text("UPDATE cells SET sample_id = 99 WHERE id = 10"))
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM samples WHERE id = 4"))  # undo the reuse
            cfg = alembic_config(db.url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT * FROM samples ORDER BY id")).all() == before
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        with pytest.raises(IntegrityError), db.engine.begin() as conn:  # 0001: codes unique
            conn.execute(text(insert), {"code": "BM-1", "now": now})
    finally:
        db.dispose()


def test_0003_adds_fields_and_keeps_every_cell_as_an_uploaded_crop(tmp_path: Path) -> None:
    """0002 -> head on a database with cells (SQLite re-creates ``cells``): every row survives
    with no field (an uploaded crop, not rejected), ``cells.field_id`` must name a field, and the
    downgrade to 0002 keeps the cells."""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        migrate(db, "0002")
        now = "2026-01-01 10:00:00.000000"
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                    "VALUES (1, 'rev', 'x', 'reviewer', 1, :now)"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO samples (id, code, age_band, notes, created_at, created_by_id) "
                    "VALUES (1, 'BM-1', 'unknown', '', :now, 1)"
                ),
                {"now": now},
            )
            for cid in (10, 11):
                conn.execute(
                    text(
                        "INSERT INTO cells (id, sample_id, sha256, stored_path, original_name, "
                        "width, height, status, reviewed_label, uploaded_by_id, uploaded_at) "
                        "VALUES (:id, 1, :sha, 'p', 'c.jpg', 1, 1, 'done', 'BLA', 1, :now)"
                    ),
                    {"id": cid, "sha": f"{cid:064d}", "now": now},
                )
            before = conn.execute(text("SELECT * FROM cells ORDER BY id")).all()
        migrate(db)
        with db.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, reviewed_label, field_id, box_x0, origin, rejected_at "
                    "FROM cells ORDER BY id"
                )
            ).all()
            assert rows == [
                (10, "BLA", None, None, None, None),
                (11, "BLA", None, None, None, None),
            ]
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            conn.execute(text("UPDATE cells SET field_id = 99 WHERE id = 10"))
        with db.engine.begin() as conn:
            cfg = alembic_config(db.url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT * FROM cells ORDER BY id")).all() == before
            assert "fields" not in set(inspect(conn).get_table_names())
    finally:
        db.dispose()

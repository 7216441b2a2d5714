"""The database layer: the connection pool's size and what a write session does after a commit."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import anyio.to_thread
from sqlalchemy import select

from marrowscope.service.db import DEFAULT_CONNECTIONS, Database, migrate
from marrowscope.service.models import User
from marrowscope.service.security import hash_password


async def _request_threads() -> int:
    return int(anyio.to_thread.current_default_thread_limiter().total_tokens)


def test_the_pool_has_a_connection_for_every_request_thread(tmp_path: Path) -> None:
    """The server runs up to 40 sync requests at once (anyio's thread pool), each holding at most
    one connection, plus the background classifier: the pool must never make one wait."""
    threads = anyio.run(_request_threads)
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        pool = db.engine.pool
        assert pool.size() + pool._max_overflow >= threads + 1  # type: ignore[attr-defined]
        assert threads + 1 <= DEFAULT_CONNECTIONS
        conns = [db.engine.connect() for _ in range(threads + 1)]  # all at once, no waiting
        assert pool.checkedout() == threads + 1  # type: ignore[attr-defined]
        for c in conns:
            c.close()
    finally:
        db.dispose()


def test_reads_after_a_commit_never_wait_for_the_write_lock(tmp_path: Path) -> None:
    """A request that committed its change and then reads (a lazy relationship, a list for its
    answer) must not take the SQLite write lock again: another writer may hold it."""
    path = tmp_path / "w.db"
    db = Database(f"sqlite:///{path}", lock_timeout=0.5)
    migrate(db)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        s = db.session(write=True)
        s.add(User(username="a", password_hash=hash_password("x" * 12), role="admin"))
        s.commit()
        other.execute("BEGIN IMMEDIATE")  # another writer takes the lock
        t0 = time.monotonic()
        assert s.scalar(select(User.username)) == "a"
        assert time.monotonic() - t0 < 0.4  # read at once, no wait for the lock
        s.close()
        other.execute("ROLLBACK")
        # a new write session still writes (and takes the lock) as before
        with db.write() as w:
            w.add(User(username="b", password_hash="-", role="reviewer"))
        with db.read() as r:
            assert sorted(r.scalars(select(User.username))) == ["a", "b"]
    finally:
        other.close()
        db.dispose()

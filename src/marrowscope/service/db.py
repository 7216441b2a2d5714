"""Database engine, sessions and migrations (Alembic, shipped inside the package).

SQLite (the default, a file in the data folder) runs in WAL mode with ``synchronous=FULL`` and
foreign keys on, set on every new connection. Transactions that write start with
``BEGIN IMMEDIATE`` so two writers queue for the lock instead of failing half-way; read-only
requests use a plain deferred transaction and never block. PostgreSQL (``postgresql+psycopg://``)
needs nothing special. :func:`migrate` runs ``alembic upgrade head`` programmatically.

Rules that keep the SQLite write lock short (and PostgreSQL row locks with it):

- a write transaction starts at the first query of a write session, so do slow work (password
  checks, image decoding) before it, or in a separate read session;
- after a write session commits, whatever it reads next runs in a read-only (deferred)
  transaction (:meth:`Database.session`), so building a response after the commit can never
  wait for the write lock and turn a committed change into an error;
- the connection pool holds :data:`DEFAULT_CONNECTIONS` connections, more than the server's
  request threads (40) plus the background classifier, so no request waits for a connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from marrowscope.service.settings import ServiceError

__all__ = ["DEFAULT_CONNECTIONS", "Database", "alembic_config", "make_engine", "migrate"]

_BEGIN_OPTION = "marrowscope_sqlite_begin"

DEFAULT_CONNECTIONS = 60
"""Most database connections one app opens: the server runs up to 40 requests at a time (its
thread pool), each holding at most one connection, plus the background classifier and spare."""

_POOL_KEPT = 10
"""Connections the pool keeps open when idle (the rest up to the limit are closed after use)."""


def make_engine(
    url: str, *, lock_timeout: float = 30.0, connections: int = DEFAULT_CONNECTIONS
) -> Engine:
    """An engine for ``url``, with the SQLite pragmas and locking described in the module doc.

    Args:
        url: the SQLAlchemy database URL.
        lock_timeout: seconds a statement waits for a lock (SQLite's write lock, a PostgreSQL
            row lock) before it fails.
        connections: most connections open at once (the pool keeps up to 10 of them idle).

    Raises:
        ServiceError: a malformed URL or a database driver that is not installed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ServiceError(
            f"cannot parse the database URL {url!r}; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB"
        ) from None
    kwargs: dict[str, Any] = {}
    sqlite = parsed.get_backend_name() == "sqlite"
    if not (sqlite and parsed.database in (None, "", ":memory:")):
        kept = min(_POOL_KEPT, connections)
        kwargs.update(pool_size=kept, max_overflow=connections - kept, pool_timeout=30)
    if sqlite:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": lock_timeout}
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql" and "options" not in parsed.query:
            kwargs["connect_args"] = {"options": f"-c lock_timeout={int(lock_timeout * 1000)}"}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as e:
        raise ServiceError(
            f"no database driver for {parsed.drivername!r} ({e}); use sqlite:/// or "
            "postgresql+psycopg:// (pip install 'psycopg[binary]')"
        ) from None
    if sqlite:
        _sqlite_setup(engine, lock_timeout)
    return engine


def _sqlite_setup(engine: Engine, lock_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class _WriteSession(Session):
    """A session whose transactions write (``BEGIN IMMEDIATE`` on SQLite) until it commits;
    after a commit it reads through ``reader`` (a deferred transaction that never waits for the
    SQLite write lock), so nothing done after a successful commit can fail on that lock."""

    def __init__(self, *args: Any, reader: Engine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = reader

    def commit(self) -> None:
        super().commit()
        self.bind = self._reader


class Database:
    """The engine and two session factories: ``write()`` (locks on SQLite) and ``read()``.

    Args:
        url: the SQLAlchemy database URL.
        lock_timeout: seconds a write waits for a lock before it fails (see :func:`make_engine`).
        connections: most connections open at once.
    """

    def __init__(
        self, url: str, *, lock_timeout: float = 30.0, connections: int = DEFAULT_CONNECTIONS
    ) -> None:
        self.url = url
        self.engine = make_engine(url, lock_timeout=lock_timeout, connections=connections)
        reader = self.engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
        self._write = sessionmaker(
            self.engine, class_=_WriteSession, expire_on_commit=False, reader=reader
        )
        self._read = sessionmaker(reader, expire_on_commit=False)

    def session(self, *, write: bool = True) -> Session:
        """A new session (the caller closes it).

        A write session writes until its first :meth:`~sqlalchemy.orm.Session.commit`; what it
        reads after that (a lazy-loaded relationship, a list for the answer) runs in a read
        transaction, which cannot wait for (or fail on) the SQLite write lock. Make every change
        of a request before its one commit.
        """
        return self._write() if write else self._read()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._write() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (rolled back at the end)."""
        with self._read() as s:
            yield s

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    """An Alembic ``Config`` for the migrations inside the package, pointing at ``url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(files("marrowscope.service") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(db: Database, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``alembic upgrade head``), in one transaction.

    Raises:
        ServiceError: the database cannot be reached or migrated; the message says which.
    """
    from alembic import command

    cfg = alembic_config(db.url)
    try:
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as e:
        raise ServiceError(
            f"cannot open or migrate the database {make_url(db.url).render_as_string()} "
            f"({str(e.orig).strip() or type(e.orig).__name__}); check the --database-url, that "
            "the server runs and that the user may create tables"
        ) from None

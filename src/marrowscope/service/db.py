"""Database engine, sessions and migrations (Alembic, shipped inside the package).

SQLite (the default, a file in the data folder) runs in WAL mode with ``synchronous=FULL`` and
foreign keys on, set on every new connection. Transactions that write start with
``BEGIN IMMEDIATE`` so two writers queue for the lock instead of failing half-way; read-only
requests use a plain deferred transaction and never block. PostgreSQL (``postgresql+psycopg://``)
needs nothing special. :func:`migrate` runs ``alembic upgrade head`` programmatically.
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

__all__ = ["Database", "alembic_config", "make_engine", "migrate"]

_BEGIN_OPTION = "marrowscope_sqlite_begin"


def make_engine(url: str) -> Engine:
    """An engine for ``url``, with the SQLite pragmas and locking described in the module doc.

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
    if sqlite:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as e:
        raise ServiceError(
            f"no database driver for {parsed.drivername!r} ({e}); use sqlite:/// or "
            "postgresql+psycopg:// (pip install 'psycopg[binary]')"
        ) from None
    if sqlite:
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The engine and two session factories: ``write()`` (locks on SQLite) and ``read()``.

    Args:
        url: the SQLAlchemy database URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        reader = self.engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._read = sessionmaker(reader, expire_on_commit=False)

    def session(self, *, write: bool = True) -> Session:
        """A new session (the caller closes it)."""
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

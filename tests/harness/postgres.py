"""The PostgreSQL database given to the tests (``MARROWSCOPE_TEST_DATABASE_URL``).

``scripts/with-postgres.sh`` (run by ``make test``) starts a throwaway server and sets the
variable; anyone can point it at their own server instead.
"""

from __future__ import annotations

import os
import re
import secrets
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ENV_URL",
    "PostgresUnavailable",
    "check_postgres",
    "configured_url",
    "create_database",
    "drop_database",
    "libpq_url",
    "with_database",
]

ENV_URL = "MARROWSCOPE_TEST_DATABASE_URL"


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL for the tests; the message says what to do."""


def configured_url() -> str | None:
    """The SQLAlchemy URL from ``MARROWSCOPE_TEST_DATABASE_URL``, or ``None`` when unset."""
    return os.environ.get(ENV_URL) or None


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy) -> ``postgresql://...`` (libpq / psycopg)."""
    if not re.match(r"^postgres(ql)?(\+\w+)?://", url):
        raise PostgresUnavailable(f"{ENV_URL} is not a postgresql:// URL: {redact(url)}")
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def with_database(url: str, name: str) -> str:
    """The same URL (driver, user, password, host, query) naming database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _connect(url: str):  # noqa: ANN202 (psycopg's Connection; imported lazily)
    try:
        import psycopg
    except ImportError as err:
        raise PostgresUnavailable(
            f"the PostgreSQL driver is not installed ({err}): pip install -e '.[dev]'"
        ) from err
    try:
        return psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10)
    except psycopg.Error as err:
        raise PostgresUnavailable(f"cannot connect to {redact(url)}: {err}") from err


def check_postgres(url: str) -> str:
    """Connect and return the server's version string.

    Raises:
        PostgresUnavailable: no driver, a bad URL, or the server does not answer.
    """
    with _connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0])


def create_database(url: str, prefix: str = "mt") -> str:
    """Create a new, empty database next to ``url``'s and return its SQLAlchemy URL.

    The URL's user needs the CREATEDB right (the throwaway server's user is a superuser).
    """
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _connect(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(url, name)


def drop_database(url: str) -> None:
    """Drop the database that ``url`` names (closing its open connections), connected via the
    server's ``postgres`` maintenance database."""
    name = urlsplit(url).path.lstrip("/")
    if not re.fullmatch(r"\w+", name):
        raise ValueError(f"refusing to drop a database named {name!r}")
    with _connect(with_database(url, "postgres")) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

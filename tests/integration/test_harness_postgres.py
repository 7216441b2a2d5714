"""The test PostgreSQL server is real: connect, write, read, fresh databases come and go."""

from __future__ import annotations

import pytest
from harness.postgres import (
    PostgresUnavailable,
    check_postgres,
    create_database,
    drop_database,
    libpq_url,
    redact,
    with_database,
)

URL = "postgresql+psycopg://marrowscope:s3cr:et@127.0.0.1:5433/marrowscope_test?sslmode=disable"


def test_urls_are_rewritten_for_libpq_and_redacted() -> None:
    assert libpq_url(URL).startswith("postgresql://marrowscope:s3cr:et@127.0.0.1:5433/")
    assert with_database(URL, "other") == URL.replace("/marrowscope_test?", "/other?")
    assert redact(URL) == URL.replace("s3cr:et", "***")
    with pytest.raises(PostgresUnavailable, match="not a postgresql"):
        libpq_url("sqlite:///x.db")


def test_an_unreachable_server_is_reported_with_the_password_hidden() -> None:
    pytest.importorskip("psycopg")
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    bad = "postgresql+psycopg://u:topsecret@127.0.0.1:1/db"
    with pytest.raises(PostgresUnavailable, match="cannot connect") as err:
        check_postgres(bad)
    assert "topsecret" not in str(err.value)


@pytest.mark.integration
@pytest.mark.postgres
def test_the_test_server_is_real_postgresql(postgres_url: str) -> None:
    version = check_postgres(postgres_url)
    assert int(version.split(".")[0]) >= 12


@pytest.mark.integration
@pytest.mark.postgres
def test_a_fresh_database_is_empty_writable_and_dropped(postgres_url: str) -> None:
    import psycopg

    url = create_database(postgres_url)
    name = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
            assert tables == (0,)
            conn.execute("CREATE TABLE cell (id serial PRIMARY KEY, label text NOT NULL)")
            conn.execute("INSERT INTO cell (label) VALUES ('BLA'), ('LYT')")
            rows = conn.execute("SELECT label FROM cell ORDER BY id").fetchall()
            assert rows == [("BLA",), ("LYT",)]
    finally:
        drop_database(url)
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        assert left.fetchone() == (0,)


@pytest.mark.integration
@pytest.mark.postgres
def test_fresh_postgres_url_fixture_gives_its_own_database(
    postgres_url: str, fresh_postgres_url: str
) -> None:
    assert fresh_postgres_url != postgres_url
    assert fresh_postgres_url.startswith("postgresql+psycopg://")
    assert check_postgres(fresh_postgres_url)

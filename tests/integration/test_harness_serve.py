"""The live-server fixture on the real app: ``marrowscope serve`` starts on a free port, answers
``/api/health``, and comes back on the same data after a SIGKILL; on PostgreSQL too."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness.postgres import libpq_url
from typer.testing import CliRunner

from marrowscope.cli.main import app

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_serve_answers_health_and_restarts_after_sigkill(
    app_server, tiny_bundle: Path, tmp_path: Path
) -> None:
    server = app_server(tiny_bundle)
    status, body = _get(server.url("/api/health"))
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert _get(server.url("/api/samples"))[0] == 401  # a real app behind a login, not a stub
    assert (tmp_path / "data" / "marrowscope.db").is_file()  # SQLite in the data folder
    # no account yet: the start-up lines say how to make the first one
    assert "no account yet: create the first one" in _last_start(server.log_tail())

    assert server.kill() == -signal.SIGKILL
    with pytest.raises(urllib.error.URLError):
        _get(server.url("/api/health"))

    made = CliRunner().invoke(
        app,
        ["users", "create", "ada", "--role", "admin", "--password-stdin"]
        + ["--data-dir", str(tmp_path / "data")],
        input="a long enough password\n",
    )
    assert made.exit_code == 0, made.output
    again = app_server(tiny_bundle, data_dir=tmp_path / "data", port=server.port)
    assert again.base_url == server.base_url
    assert _get(again.url("/api/health"))[0] == 200
    started = _last_start(again.log_tail())
    assert "marrowscope review on" in started and "no account yet" not in started


def _last_start(log: str) -> str:
    """The log of the server's last start (the harness writes ``$ COMMAND`` before each)."""
    return log.rsplit("\n$ ", 1)[-1]


@pytest.mark.postgres
def test_serve_runs_on_postgresql(app_server, tiny_bundle: Path, fresh_postgres_url: str) -> None:
    import psycopg

    server = app_server(tiny_bundle, database_url=fresh_postgres_url)
    assert _get(server.url("/api/health"))[0] == 200
    with psycopg.connect(libpq_url(fresh_postgres_url)) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    assert "alembic_version" in tables  # the app migrated the PostgreSQL database it was given
    assert not (server.data_dir / "marrowscope.db").exists()

"""Fixtures for the review app's tests: tiny real models, a started app on a real database.

``database_url`` is the SQLite file URL, plus (as a second parameter) a fresh PostgreSQL database
when ``MARROWSCOPE_TEST_DATABASE_URL`` is set, so every DB-backed test runs on both.
"""

from __future__ import annotations

import html
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from harness.bundles import favoured_bundle

from marrowscope.data.sample import SAMPLE_ROOT
from marrowscope.inference.predictor import Predictor
from marrowscope.service.accounts import create_user, issue_token
from marrowscope.service.app import create_app
from marrowscope.service.settings import Settings

ENV_URL = "MARROWSCOPE_TEST_DATABASE_URL"
CLASSES = ["BLA", "HAC", "LYT"]
PASSWORD = "correct horse battery"


def build_bundle(directory: Path, favour: int | None, *, classes: list[str] = CLASSES) -> Path:
    """A 32-px paper_cnn bundle; ``favour``: a class whose logit gets +10 (called everywhere)."""
    return favoured_bundle(directory, classes, favour)


@pytest.fixture(scope="session")
def hac_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calls every cell HAC with ~100% confidence."""
    return build_bundle(tmp_path_factory.mktemp("hac") / "best", favour=1)


@pytest.fixture(scope="session")
def flat_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights: every call is near 1/3, i.e. unidentified at the 0.5 threshold."""
    return build_bundle(tmp_path_factory.mktemp("flat") / "best", favour=None)


@pytest.fixture(scope="session")
def hac_predictor(hac_bundle: Path) -> Predictor:
    return Predictor.from_checkpoint(hac_bundle, device="cpu", batch_size=16)


@pytest.fixture(scope="session")
def flat_predictor(flat_bundle: Path) -> Predictor:
    return Predictor.from_checkpoint(flat_bundle, device="cpu", batch_size=16)


def _db_params() -> list[Any]:
    params: list[Any] = ["sqlite"]
    if os.environ.get(ENV_URL):
        params.append(pytest.param("postgresql", marks=pytest.mark.postgres))
    return params


@pytest.fixture(params=_db_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file in ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'marrowscope.db'}"
    return request.getfixturevalue("fresh_postgres_url")


def sample_images(n: int, cls: str = "BLA") -> list[Path]:
    """``n`` real bone-marrow cell images shipped with the package."""
    return sorted((SAMPLE_ROOT / cls).glob("*.jpg"))[:n]


def flashed(service: Service, r: Any, back: str) -> str:
    """Follow a form's redirect to ``back``; the page text (unescaped)."""
    assert r.status_code == 303, r.text
    assert r.headers["location"] == back
    page = service.client.get(back)
    assert page.status_code == 200
    return html.unescape(page.text)


def files_of(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` for ``TestClient.post``."""
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


@dataclass
class Service:
    """A started app with its TestClient and helpers."""

    app: Any
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def user(self, name: str, role: str) -> dict[str, str]:
        """Create a user; returns bearer headers for it."""
        with self.app.state.db.write() as s:
            u = create_user(s, name, role, PASSWORD)
            self.tokens[name] = issue_token(s, u, "test")
        return self.auth(name)

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def login(self, name: str, password: str = PASSWORD) -> str:
        """Log the client in through the login form; returns the session's CSRF token."""
        page = self.client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = self.client.post(
            "/login",
            data={"username": name, "password": password, "csrf_token": token, "next": "/"},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        return self.client.get("/api/me").json()["csrf_token"]

    def new_sample(self, headers: dict[str, str], code: str = "BM-0001", **fields: Any) -> int:
        r = self.client.post("/api/samples", json={"code": code, **fields}, headers=headers)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def upload(self, sample_id: int, files: list[Any], headers: dict[str, str]) -> dict[str, Any]:
        r = self.client.post(f"/api/samples/{sample_id}/cells", files=files, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self) -> None:
        """Block until the background classifier has nothing pending."""
        assert self.app.state.worker.wait_idle(timeout=600), "classification did not finish"

    def cells(self, sample_id: int, headers: dict[str, str]) -> list[dict[str, Any]]:
        r = self.client.get(f"/api/samples/{sample_id}/cells", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def make_service(
    tmp_path: Path, database_url: str, hac_predictor: Predictor
) -> Iterator[Callable[..., Service]]:
    """``make_service(predictor=None, **settings)``: an app started on ``database_url``."""
    stack: list[TestClient] = []

    def make(predictor: Predictor | None = None, **overrides: Any) -> Service:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            secret_key="test-secret-key-" + "x" * 32,
            **overrides,
        )
        app = create_app(settings, predictor=predictor or hac_predictor)
        client = TestClient(app)
        client.__enter__()
        stack.append(client)
        return Service(app, client)

    try:
        yield make
    finally:
        for client in reversed(stack):
            client.__exit__(None, None, None)


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    """The app on the HAC-calling model, with users admin, signer and reviewer."""
    svc = make_service()
    svc.user("admin", "admin")
    svc.user("sig", "signer")
    svc.user("rev", "reviewer")
    return svc


@dataclass
class LiveService:
    """The app served by a real uvicorn server on 127.0.0.1 (in a thread of this process)."""

    app: Any
    base_url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def user(self, name: str, role: str) -> dict[str, str]:
        """Create a user; returns bearer headers for it."""
        with self.app.state.db.write() as s:
            u = create_user(s, name, role, PASSWORD)
            self.tokens[name] = issue_token(s, u, "test")
        return {"Authorization": f"Bearer {self.tokens[name]}"}


@pytest.fixture
def live_service(
    tmp_path: Path, database_url: str, hac_predictor: Predictor
) -> Iterator[Callable[..., LiveService]]:
    """``live_service(**settings)``: the app on ``database_url`` behind a real uvicorn server
    (real sockets, HTTP parsing and thread pool) listening on a free loopback port; stopped at
    teardown. Its log goes to pytest's captured output."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> LiveService:
        settings = Settings(
            data_dir=tmp_path / f"live-data-{len(servers)}",
            database_url=database_url,
            secret_key="test-secret-key-" + "x" * 32,
            **overrides,
        )
        app = create_app(settings, predictor=hac_predictor)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # bound here: no race for a free port
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        )
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="live-uvicorn", daemon=True
        )
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive(), "the live server exited at start (see the captured log)"
            assert time.monotonic() < deadline, "the live server did not start in 120 s"
            time.sleep(0.05)
        return LiveService(app, f"http://127.0.0.1:{port}")

    try:
        yield start
    finally:
        for server, thread in reversed(servers):
            server.should_exit = True
            thread.join(timeout=30)

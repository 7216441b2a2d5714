"""pytest fixtures for the review app's infrastructure tests (loaded by ``tests/conftest.py``).

Fixtures:
    postgres_url: the SQLAlchemy URL of the test PostgreSQL database (session).
    fresh_postgres_url: a new, empty database on that server, dropped afterwards (per test).
    browser: headless Debian Chromium through Playwright (per module).
    page: a Playwright page in a fresh browser context (per test); a failing test leaves a
        screenshot ``failure.png`` in its ``tmp_path``.
    app_server: ``app_server(checkpoint, data_dir=..., ...)`` starts ``marrowscope serve`` on a
        free port and waits for ``/api/health``; every server it started is stopped afterwards.

Without a database URL or a browser these fixtures skip the test, saying why; with
``MARROWSCOPE_REQUIRE_POSTGRES=1`` / ``MARROWSCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) the
session fails at start instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from harness.appserver import AppServer, start_app_server
from harness.browser import BrowserUnavailable, check_playwright, find_chromium, launch
from harness.postgres import (
    ENV_URL,
    PostgresUnavailable,
    check_postgres,
    configured_url,
    create_database,
    drop_database,
    redact,
)

if TYPE_CHECKING:  # pragma: no cover
    from playwright.sync_api import Browser, Page

REQUIRE_POSTGRES = "MARROWSCOPE_REQUIRE_POSTGRES"
REQUIRE_BROWSER = "MARROWSCOPE_REQUIRE_BROWSER"

_postgres_version = pytest.StashKey[str]()
_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


def _required(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes"}


def _unavailable(message: str, require_var: str) -> NoReturn:
    """Skip the test, or fail it when ``require_var`` says the thing must be there."""
    if _required(require_var):
        pytest.fail(f"{message} ({require_var}=1)", pytrace=False)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"postgres: needs a PostgreSQL database ({ENV_URL}; CI always has one)"
    )
    config.addinivalue_line("markers", "browser: drives Debian's Chromium through Playwright")

    problems = []
    if _required(REQUIRE_POSTGRES):
        url = configured_url()
        if not url:
            problems.append(
                f"{REQUIRE_POSTGRES}=1 but {ENV_URL} is not set: run the tests through "
                "scripts/with-postgres.sh (as `make test` does) or give a database URL"
            )
        else:
            try:
                config.stash[_postgres_version] = check_postgres(url)
            except PostgresUnavailable as err:
                problems.append(f"{REQUIRE_POSTGRES}=1 but {err}")
    if _required(REQUIRE_BROWSER):
        try:
            check_playwright()
            find_chromium()
        except BrowserUnavailable as err:
            problems.append(f"{REQUIRE_BROWSER}=1 but {err}")
    if problems:
        raise pytest.UsageError("\n".join(problems))


def pytest_report_header(config: pytest.Config) -> list[str]:
    url = configured_url()
    if url:
        version = config.stash.get(_postgres_version, None)
        pg = f"postgres: {redact(url)}" + (f" (server {version})" if version else "")
    else:
        pg = f"postgres: {ENV_URL} not set, the PostgreSQL tests skip"
    try:
        chromium = f"chromium: {find_chromium()}"
    except BrowserUnavailable:
        chromium = "chromium: not installed, the browser tests skip"
    return [pg, chromium]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(  # keeps each phase's report, for the `page` failure screenshot
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Any:
    report = yield
    item.stash.setdefault(_reports, {})[report.when] = report
    return report


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The SQLAlchemy URL of the test PostgreSQL database (``MARROWSCOPE_TEST_DATABASE_URL``)."""
    url = configured_url()
    if not url:
        _unavailable(
            f"no PostgreSQL: {ENV_URL} is not set (`make test` starts a throwaway server when "
            "Debian's postgresql package is installed)",
            REQUIRE_POSTGRES,
        )
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the test server (its SQLAlchemy URL), dropped after the test."""
    try:
        url = create_database(postgres_url)
    except PostgresUnavailable as err:
        _unavailable(str(err), REQUIRE_POSTGRES)
    try:
        yield url
    finally:
        drop_database(url)


# --- Chromium -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium (``/usr/bin/chromium``) driven by Playwright."""
    try:
        check_playwright()
        executable = find_chromium()
    except BrowserUnavailable as err:
        _unavailable(str(err), REQUIRE_BROWSER)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright, executable=executable)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A page in its own browser context (own cookies), 1280x900; screenshot on failure."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        report = request.node.stash.get(_reports, {}).get("call")
        if report is not None and report.failed:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failing page: {shot}")
            except Exception as err:  # noqa: BLE001 (a failed screenshot must not hide the failure)
                print(f"no screenshot of the failing page: {err}")
        context.close()


# --- the app server -----------------------------------------------------------------------------


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[Callable[..., AppServer]]:
    """Start ``marrowscope serve``: ``app_server(checkpoint, data_dir=None, **options)``.

    ``data_dir`` defaults to ``tmp_path / "data"``; pass the same folder again after
    ``server.kill()`` to restart on the same data. Other options as
    :func:`harness.appserver.start_app_server` (``port``, ``database_url``, ``extra_args``...).
    Each server's log is ``tmp_path / "serve-N.log"``. All servers are stopped at teardown.
    """
    servers: list[AppServer] = []

    def start(checkpoint: Path, *, data_dir: Path | None = None, **options: Any) -> AppServer:
        options.setdefault("log_path", tmp_path / f"serve-{len(servers)}.log")
        server = start_app_server(checkpoint, data_dir=data_dir or tmp_path / "data", **options)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()

"""Test infrastructure for the review app: PostgreSQL, Chromium (Playwright) and a live server.

Loaded into every test session by ``tests/conftest.py`` (``pytest_plugins``); the fixtures live in
:mod:`harness.plugin`, the parts that need no pytest in :mod:`harness.appserver` and
:mod:`harness.browser` (usable from a script too, e.g. to take the README's screenshots).

Environment variables:
    MARROWSCOPE_TEST_DATABASE_URL: a PostgreSQL database for the tests
        (``postgresql+psycopg://user:pw@host:port/db``); ``scripts/with-postgres.sh`` (run by
        ``make test``) starts a throwaway server and sets it. Unset: the PostgreSQL tests skip.
    MARROWSCOPE_REQUIRE_POSTGRES=1: a missing or unreachable database fails the session instead
        (``.ci/run`` sets it).
    MARROWSCOPE_REQUIRE_BROWSER=1: a missing Chromium or Playwright fails the session instead of
        skipping the browser tests (``.ci/run`` sets it).
    MARROWSCOPE_CHROMIUM: the Chromium executable (default ``/usr/bin/chromium``, Debian's
        ``chromium`` package). Playwright never downloads a browser here.
"""

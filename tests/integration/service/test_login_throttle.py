"""Brute-force protection: failed logins are limited per account name and per client address
(429 with Retry-After, no password check), audited once per burst, and a right password works
again once the window has passed; other accounts and addresses are not affected."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from marrowscope.service import accounts
from marrowscope.service.models import AuditEvent

from .conftest import PASSWORD, LiveService, Service

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttled(svc: Service | LiveService, **limits: Any) -> FakeClock:
    clock = FakeClock()
    svc.app.state.login_throttle.clock = clock
    return clock


def _try(client: TestClient, username: str, password: str) -> httpx.Response:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token},
        follow_redirects=False,
    )


def _events(svc: Service | LiveService, action: str) -> list[AuditEvent]:
    with svc.app.state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_failed_logins_are_limited_per_account(make_service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(
        login_window_seconds=60, login_failures_per_account=3, login_failures_per_address=100
    )
    svc.user("rev", "reviewer")
    svc.user("sig", "signer")
    clock = _throttled(svc)
    checks = Counter[str]()
    real_verify = accounts.verify_password

    def counting(stored: str | None, password: str) -> bool:
        checks["verify"] += 1
        return real_verify(stored, password)

    monkeypatch.setattr(accounts, "verify_password", counting)
    c = svc.client
    for _ in range(3):
        assert _try(c, "rev", "wrong password!").status_code == 401
    for _ in range(3):  # the account is locked now: refused without a password check
        r = _try(c, "rev", "wrong password!")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "60"
        assert "too many failed logins for this account; try again in 60 seconds" in r.text
    clock.now += 20
    r = _try(c, "rev", PASSWORD)  # even the right password waits for the window
    assert r.status_code == 429 and r.headers["retry-after"] == "40"
    assert checks["verify"] == 3
    # another account from the same address is not affected
    assert _try(c, "sig", PASSWORD).status_code == 303
    c.cookies.clear()
    # once the window has passed, the right password works (and clears the account's window)
    clock.now += 41
    assert _try(c, "rev", PASSWORD).status_code == 303
    c.cookies.clear()
    for _ in range(3):
        assert _try(c, "rev", "wrong password!").status_code == 401

    failed = _events(svc, "login.failed")
    assert [e.username for e in failed] == ["rev"] * 6
    assert failed[0].new_value == {"address": "testclient"}
    throttled = _events(svc, "login.throttled")  # one row for the burst of four refusals
    assert len(throttled) == 1 and throttled[0].username == "rev"
    assert throttled[0].new_value == {
        "username": "rev", "scope": "account", "address": "testclient", "failures": 3,
        "retry_after": 60,
    }  # fmt: skip


def test_failed_logins_are_limited_per_address(make_service) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(
        login_window_seconds=300, login_failures_per_account=100, login_failures_per_address=4
    )
    svc.user("rev", "reviewer")
    clock = _throttled(svc)
    attacker = svc.client  # address "testclient"
    for name in ["rev", "nobody", "admin", "x"]:  # a different name each time
        assert _try(attacker, name, "wrong password!").status_code == 401
    clock.now += 100
    r = _try(attacker, "someone-else", "wrong password!")
    assert r.status_code == 429 and r.headers["retry-after"] == "200"
    assert "too many failed logins for your address" in r.text
    assert _try(attacker, "rev", PASSWORD).status_code == 429
    # the same account from another address logs in
    other = TestClient(svc.app, client=("10.1.2.3", 50000))
    assert _try(other, "rev", PASSWORD).status_code == 303
    throttled = _events(svc, "login.throttled")
    assert len(throttled) == 1 and throttled[0].username == "anonymous"  # no such account
    assert throttled[0].new_value["scope"] == "address"
    assert throttled[0].new_value["address"] == "testclient"
    clock.now += 201
    assert _try(attacker, "rev", PASSWORD).status_code == 303


def test_a_parallel_burst_of_guesses_gets_no_more_tries_than_the_limit(
    live_service: Callable[..., LiveService],
) -> None:
    """The issue's attack: many wrong-password logins for one account at once, on a real server.
    Places are taken before the password check, so exactly the limit is checked (401) and the
    rest are refused at once (429), with one audit row for the whole burst."""
    srv = live_service(login_failures_per_account=5, login_failures_per_address=100)
    srv.user("victim", "reviewer")
    n = 12
    clients = [httpx.Client(base_url=srv.base_url, timeout=120) for _ in range(n)]
    tokens = [
        re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)  # type: ignore[union-attr]
        for c in clients
    ]
    start = threading.Barrier(n)
    statuses: list[int] = []

    def guess(i: int) -> None:
        start.wait()
        r = clients[i].post(
            "/login",
            data={"username": "victim", "password": "wrong password!", "csrf_token": tokens[i]},
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for c in clients:
        c.close()
    assert Counter(statuses) == {401: 5, 429: n - 5}
    assert len(_events(srv, "login.failed")) == 5
    assert len(_events(srv, "login.throttled")) == 1

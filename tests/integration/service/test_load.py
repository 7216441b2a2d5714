"""The review app under concurrent load, on a real server (uvicorn on 127.0.0.1).

Anonymous clients repeat wrong-password logins (each one an argon2 check and an audited
``login.failed``) while token clients keep re-classifying cells. No request may end in a server
error, and every acknowledged change must be in the database and in the audit trail exactly once.
The SQLite write lock is given a short timeout here (2 s instead of 30 s), so a write lock held
across a password check, or taken again after a commit, shows up within a few seconds.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import cycle
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from marrowscope.service import accounts
from marrowscope.service.models import AuditEvent, Cell, Sample

from .conftest import PASSWORD, LiveService, Service, files_of, sample_images

pytestmark = pytest.mark.integration

DURATION = 4.0  # seconds of load
LOGIN_CLIENTS = 4
EDIT_CLIENTS = 4
CELLS_PER_EDITOR = 3
LABELS = ("BLA", "LYT")


def _login_csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def _run_for(seconds: float, workers: list[Callable[[float], None]]) -> None:
    """Run each worker in its own thread until ``seconds`` from now; re-raise their errors."""
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def guarded(fn: Callable[[float], None]) -> None:
        try:
            fn(deadline)
        except BaseException as e:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


def test_login_flood_beside_reclassification_gives_no_server_error(
    live_service: Callable[..., LiveService],
) -> None:
    srv = live_service(  # login throttling off here: every guess is a real password check
        db_lock_timeout=2.0, login_failures_per_account=10**6, login_failures_per_address=10**6
    )
    rev = srv.user("rev", "reviewer")
    srv.user("victim", "reviewer")  # the account the anonymous clients guess at
    setup = httpx.Client(base_url=srv.base_url, timeout=60)
    r = setup.post("/api/samples", json={"code": "LOAD-1"}, headers=rev)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    n_cells = EDIT_CLIENTS * CELLS_PER_EDITOR
    r = setup.post(f"/api/samples/{sid}/cells", files=files_of(sample_images(n_cells)), headers=rev)
    assert r.status_code == 201 and len(r.json()["accepted"]) == n_cells, r.text
    assert srv.app.state.worker.wait_idle(timeout=600)
    cell_ids = sorted(c["id"] for c in setup.get(f"/api/samples/{sid}/cells", headers=rev).json())
    setup.close()

    statuses: Counter[tuple[str, int]] = Counter()
    acked: dict[int, list[str]] = {c: [] for c in cell_ids}  # labels the server acknowledged
    lock = threading.Lock()

    def call(kind: str, send: Callable[..., httpx.Response], *args: Any, **kw: Any) -> Any:
        """Send one request and count its status (0: the connection failed, no answer)."""
        try:
            r: httpx.Response | None = send(*args, **kw)
        except httpx.TransportError:
            r = None
        with lock:
            statuses[kind, r.status_code if r is not None else 0] += 1
        return r

    def guesser(deadline: float) -> None:
        with httpx.Client(base_url=srv.base_url, timeout=120) as c:
            token = _login_csrf(c.get("/login").text)
            while time.monotonic() < deadline:
                form = {"username": "victim", "password": "not the password", "csrf_token": token}
                r = call("login", c.post, "/login", data=form)
                if r is not None and r.status_code in (401, 429):
                    token = _login_csrf(r.text)
                else:
                    token = _login_csrf(c.get("/login").text)

    def editor(mine: list[int]) -> Callable[[float], None]:
        def work(deadline: float) -> None:
            current = {c: None for c in mine}
            url = f"/api/samples/{sid}/cells"
            with httpx.Client(base_url=srv.base_url, timeout=120, headers=rev) as c:
                for i in cycle(range(len(mine) + 1)):
                    if time.monotonic() >= deadline:
                        return
                    if i < len(mine):  # one cell at a time ...
                        cid = mine[i]
                        label = LABELS[1] if current[cid] == LABELS[0] else LABELS[0]
                        body = {"label": label}
                        r = call("relabel", c.patch, f"{url}/{cid}", json=body)
                        if r is not None and r.status_code == 200:
                            assert r.json()["reviewed_label"] == label
                            current[cid] = label
                            acked[cid].append(label)
                    else:  # ... or all of them at once, each to its other label
                        label = LABELS[0] if current[mine[0]] == LABELS[1] else LABELS[1]
                        todo = [x for x in mine if current[x] != label]
                        body = {"cell_ids": todo, "label": label}
                        r = call("reclassify", c.post, f"{url}/reclassify", json=body)
                        if r is not None and r.status_code == 200:
                            assert r.json()["changed"] == len(todo)
                            for x in todo:
                                current[x] = label
                                acked[x].append(label)

        return work

    groups = [cell_ids[i::EDIT_CLIENTS] for i in range(EDIT_CLIENTS)]
    _run_for(DURATION, [guesser] * LOGIN_CLIENTS + [editor(g) for g in groups])

    server_errors = {k: n for k, n in statuses.items() if k[1] >= 500 or k[1] == 0}
    assert not server_errors, f"server errors under load: {dict(statuses)}"
    assert {k for k in statuses if k[0] == "login"} == {("login", 401)}, dict(statuses)
    n_logins = statuses["login", 401]
    n_changes = sum(len(v) for v in acked.values())
    assert n_logins >= LOGIN_CLIENTS and n_changes >= 20, dict(statuses)  # real load happened

    with srv.app.state.db.read() as s:
        failed = s.scalars(
            select(AuditEvent.id).where(
                AuditEvent.username == "victim", AuditEvent.action == "login.failed"
            )
        ).all()
        trail: dict[int, list[str]] = {c: [] for c in cell_ids}
        for cid, new in s.execute(
            select(AuditEvent.cell_id, AuditEvent.new_value)
            .where(AuditEvent.sample_id == sid, AuditEvent.action == "cell.reclassify")
            .order_by(AuditEvent.id)
        ):
            trail[cid].append(new["label"])
        final: dict[int, Any] = dict(
            s.execute(select(Cell.id, Cell.reviewed_label).where(Cell.sample_id == sid)).all()
        )
    assert len(failed) == n_logins  # each answered failed login audited exactly once
    assert trail == acked  # each acknowledged change audited exactly once, in order
    assert final == {c: (v[-1] if v else None) for c, v in acked.items()}


def test_no_database_connection_is_held_while_a_password_is_checked(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The argon2 check and hash (~0.1-1 s of CPU each) run outside any transaction, so a flood
    of logins never holds the SQLite write lock (or a PostgreSQL connection) while hashing."""
    pool = service.app.state.db.engine.pool
    seen: list[tuple[str, int]] = []

    def checking(real: Callable[..., Any], name: str) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            seen.append((name, pool.checkedout()))
            return real(*args)

        return wrapper

    monkeypatch.setattr(accounts, "verify_password", checking(accounts.verify_password, "verify"))
    monkeypatch.setattr(accounts, "hash_password", checking(accounts.hash_password, "hash"))
    c = service.client
    token = _login_csrf(c.get("/login").text)
    for who, password in [("rev", "wrong password!"), ("nobody", "wrong password!")]:
        r = c.post("/login", data={"username": who, "password": password, "csrf_token": token})
        assert r.status_code == 401
        token = _login_csrf(r.text)
    csrf = service.login("admin")
    r = c.post(
        "/admin/users",
        data={"username": "new", "role": "reviewer", "password": PASSWORD, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert seen == [("verify", 0), ("verify", 0), ("verify", 0), ("hash", 0)]
    with service.app.state.db.read() as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["login.failed", "login", "user.create"]


def test_a_lock_not_granted_in_time_is_a_503_and_changes_nothing(make_service) -> None:  # type: ignore[no-untyped-def]
    """When another transaction holds the lock past ``db_lock_timeout`` the request is answered
    503 with Retry-After (the database was busy, nothing changed), never a bare 500."""
    svc = make_service(db_lock_timeout=0.5)
    rev = svc.user("rev", "reviewer")
    sid = svc.new_sample(rev, notes="before")
    db = svc.app.state.db
    with db.engine.connect() as other:  # SQLite: BEGIN IMMEDIATE; PostgreSQL: the row lock
        other.execute(select(Sample.id).where(Sample.id == sid).with_for_update())
        t0 = time.monotonic()
        r = svc.client.patch(f"/api/samples/{sid}", json={"notes": "after"}, headers=rev)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5" and "busy" in r.json()["detail"]
        assert time.monotonic() - t0 < 20
        other.rollback()
    assert svc.client.get(f"/api/samples/{sid}", headers=rev).json()["notes"] == "before"
    r = svc.client.patch(f"/api/samples/{sid}", json={"notes": "after"}, headers=rev)
    assert r.status_code == 200 and r.json()["notes"] == "after"

"""``marrowscope users disable / enable / revoke-token / list`` against a running app's database:
a disabled account's login session, API tokens and password stop working at once; a revoked
token stops working for good; the listing never shows a secret."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from marrowscope.cli.main import app as cli
from marrowscope.service.models import ApiToken, AuditEvent, User

from .conftest import PASSWORD, Service

pytestmark = pytest.mark.integration
runner = CliRunner()


def _users(service: Service, *args: str) -> Any:
    """``marrowscope users ARGS`` on the app's database."""
    settings = service.app.state.settings
    return runner.invoke(
        cli,
        ["users", *args, "--data-dir", str(settings.data_dir), "--database-url", settings.url],
        catch_exceptions=False,
    )


def _try_login(service: Service, name: str) -> int:
    """Post the login form (with its CSRF token); the status code, redirects not followed."""
    c = service.client
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post(
        "/login",
        data={"username": name, "password": PASSWORD, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    return r.status_code


def _cli_actions(service: Service) -> list[tuple[str, Any]]:
    with service.app.state.db.read() as s:
        return [
            (e.action, e.new_value)
            for e in s.scalars(
                select(AuditEvent).where(AuditEvent.username == "cli").order_by(AuditEvent.id)
            )
        ]


def _token_ids(service: Service, username: str) -> dict[str, int]:
    with service.app.state.db.read() as s:
        rows = s.execute(
            select(ApiToken.name, ApiToken.id).join(User).where(User.username == username)
        ).all()
    return {name: tid for name, tid in rows}


def test_disable_ends_session_token_and_login_and_enable_restores(service: Service) -> None:
    c = service.client
    rev, sig = service.auth("rev"), service.auth("sig")
    service.login("rev")
    cookie = c.cookies.get("marrowscope_session")
    assert c.get("/api/me").json()["via"] == "session"
    assert c.get("/api/me", headers=rev).status_code == 200

    res = _users(service, "disable", "rev")
    assert res.exit_code == 0, res.output
    assert "disabled reviewer rev" in res.output and "1 login session" in res.output

    r = c.get("/api/me")  # the open login session
    assert r.status_code == 401 and r.json()["detail"].startswith("login required")
    assert c.get("/", follow_redirects=False).headers["location"].startswith("/login")
    r = c.get("/api/me", headers=rev)  # the API token
    assert r.status_code == 401 and r.json()["detail"].startswith("invalid or revoked API token")
    assert _try_login(service, "rev") == 401  # the password
    assert c.get("/api/me", headers=sig).status_code == 200  # nobody else is affected
    again = _users(service, "disable", "rev")
    assert again.exit_code == 0 and "disabled already" in again.output

    res = _users(service, "enable", "rev")
    assert res.exit_code == 0, res.output
    assert "enabled reviewer rev" in res.output
    assert c.get("/api/me", headers=rev).json()["username"] == "rev"  # the token works again
    c.cookies.clear()
    c.cookies.set("marrowscope_session", cookie)
    assert c.get("/api/me").status_code == 401  # the ended session stays ended ...
    c.cookies.clear()
    assert _try_login(service, "rev") == 303  # ... a new login works
    assert c.get("/api/me").json() == {
        "username": "rev",
        "role": "reviewer",
        "via": "session",
        "csrf_token": c.get("/api/me").json()["csrf_token"],
    }
    actions = [a for a, _ in _cli_actions(service)]
    assert actions == ["user.disable", "user.enable"]


def test_revoke_token_one_or_all_and_other_users_keep_theirs(service: Service) -> None:
    c = service.client
    rev, sig = service.auth("rev"), service.auth("sig")
    res = _users(service, "token", "rev", "--name", "laptop")
    assert res.exit_code == 0, res.output
    laptop = {"Authorization": f"Bearer {res.stdout.strip()}"}
    assert c.get("/api/me", headers=laptop).status_code == 200
    ids = _token_ids(service, "rev")

    res = _users(service, "revoke-token", "rev", "--token-id", str(ids["laptop"]))
    assert res.exit_code == 0, res.output
    assert f"revoked 1 API token of rev: {ids['laptop']} ('laptop')" in res.output
    r = c.get("/api/me", headers=laptop)
    assert r.status_code == 401 and r.json()["detail"].startswith("invalid or revoked API token")
    assert c.get("/api/me", headers=rev).status_code == 200  # rev's other token still works
    res = _users(service, "revoke-token", "rev", "--token-id", str(ids["laptop"]))
    assert res.exit_code == 2 and "revoked already" in res.output

    res = _users(service, "revoke-token", "rev")  # every token of rev
    assert res.exit_code == 0, res.output
    assert f"revoked 1 API token of rev: {ids['test']} ('test')" in res.output
    assert c.get("/api/me", headers=rev).status_code == 401
    assert c.get("/api/me", headers=laptop).status_code == 401
    assert c.get("/api/me", headers=sig).json()["username"] == "sig"  # another user's token
    res = _users(service, "revoke-token", "rev")
    assert res.exit_code == 0 and "rev has no active API token" in res.output

    # another user's token cannot be revoked under this name
    sig_token = _token_ids(service, "sig")["test"]
    res = _users(service, "revoke-token", "rev", "--token-id", str(sig_token))
    assert res.exit_code == 2 and f"user 'rev' has no API token {sig_token}" in res.output
    assert c.get("/api/me", headers=sig).status_code == 200
    revoked = [(a, v) for a, v in _cli_actions(service) if a == "token.revoke"]
    assert [v["token_id"] for _, v in revoked] == [ids["laptop"], ids["test"]]


@pytest.mark.parametrize("command", ["disable", "enable", "revoke-token"])
def test_unknown_user_is_one_clear_line_and_exit_code_2(service: Service, command: str) -> None:
    res = _users(service, command, "nobody")
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no user 'nobody'"), res.output
    assert "Traceback" not in res.output


def test_list_shows_users_roles_and_tokens_but_never_a_secret(service: Service) -> None:
    made = _users(service, "token", "sig", "--name", "lab pc")
    secret = made.stdout.strip()
    _users(service, "revoke-token", "sig", "--token-id", str(_token_ids(service, "sig")["test"]))
    _users(service, "disable", "rev")
    res = _users(service, "list")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert re.search(r"^admin +admin +active +created \d{4}-\d\d-\d\d \d\d:\d\d UTC$", out, re.M)
    assert re.search(r"^rev +reviewer +disabled +created ", out, re.M)
    ids = _token_ids(service, "sig")
    assert re.search(
        rf"^  token {ids['test']} 'test' +created \d{{4}}-[-\d: ]+ UTC, "
        rf"revoked \d{{4}}-[-\d: ]+ UTC$",
        out,
        re.M,
    ), out
    assert re.search(
        rf"^  token {ids['lab pc']} 'lab pc' +created [-\d: ]+ UTC, active$", out, re.M
    )
    assert re.search(
        r"^  token \d+ 'test' +created [-\d: ]+ UTC, not revoked \(refused while the account is "
        r"disabled\)$",
        out[out.index("\nrev ") :],
        re.M,
    ), out  # rev's token: suspended with the account
    assert out.index("admin") < out.index("rev") < out.index("sig")  # by name
    with service.app.state.db.read() as s:
        hashes = (
            s.scalars(select(ApiToken.token_hash)).all()
            + s.scalars(select(User.password_hash)).all()
        )
    for value in [secret, *service.tokens.values(), *hashes]:
        assert value not in out

"""Durability: ``marrowscope serve`` is SIGKILLed in the middle of a review session; after a
restart on the same data every committed re-classification and audit row is still there, the
login still works, and the cells that were waiting for the model get classified."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import PASSWORD, sample_images

pytestmark = pytest.mark.integration


def _cli(*args: str, stdin: str = "") -> str:
    r = subprocess.run(
        [sys.executable, "-m", "marrowscope", *args],
        input=stdin, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _wait_classified(client: httpx.Client, sid: int, total: int, timeout: float = 600) -> dict:
    """Poll the sample until ``total`` cells are classified (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.get(f"/api/samples/{sid}").json()["summary"]
        if s["progress"]["total"] == total and s["progress"]["pending"] == 0:
            return s
        assert time.monotonic() < deadline, f"not classified in {timeout} s: {s['progress']}"
        time.sleep(0.2)


def test_committed_work_survives_sigkill(
    app_server, hac_bundle: Path, tmp_path: Path, database_url: str
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    db_args = [] if database_url.startswith("sqlite") else ["--database-url", database_url]
    db_kw = {} if database_url.startswith("sqlite") else {"database_url": database_url}
    out = _cli("users", "create", "sig", "--role", "signer", "--password-stdin",
               "--data-dir", str(data), *db_args, stdin=PASSWORD + "\n")  # fmt: skip
    assert "created signer sig" in out

    server = app_server(hac_bundle, data_dir=data, **db_kw)
    client = httpx.Client(base_url=server.base_url, timeout=300)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"username": "sig", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 303
    csrf = client.get("/api/me").json()["csrf_token"]
    h = {"X-CSRF-Token": csrf}

    sid = client.post("/api/samples", json={"code": "DUR-1"}, headers=h).json()["id"]
    first = sample_images(4, "LYT")
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in first]
    assert client.post(f"/api/samples/{sid}/cells", files=files, headers=h).status_code == 201
    _wait_classified(client, sid, 4)
    ids = sorted(c["id"] for c in client.get(f"/api/samples/{sid}/cells").json())
    committed = {ids[0]: "BLA", ids[1]: "LYT", ids[2]: "BLA"}
    for cid, label in committed.items():
        r = client.patch(f"/api/samples/{sid}/cells/{cid}", json={"label": label}, headers=h)
        assert r.status_code == 200 and r.json()["reviewed_label"] == label
    audit_before = client.get(f"/api/samples/{sid}/audit").json()
    # More cells arrive; the server dies at once, before (or while) the model classifies them.
    more = sample_images(5, "EOS")
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in more]
    assert client.post(f"/api/samples/{sid}/cells", files=files, headers=h).status_code == 201
    cookies = dict(client.cookies)
    assert server.kill() == -9
    client.close()

    again = app_server(hac_bundle, data_dir=data, **db_kw)
    client = httpx.Client(base_url=again.base_url, timeout=300, cookies=cookies)
    me = client.get("/api/me")  # the login survived: sessions live in the database
    assert me.status_code == 200 and me.json()["username"] == "sig"
    cells = {c["id"]: c for c in client.get(f"/api/samples/{sid}/cells").json()}
    for cid, label in committed.items():
        assert cells[cid]["reviewed_label"] == label and cells[cid]["reviewed_by"] == "sig"
    assert cells[ids[3]]["reviewed_label"] is None
    audit_after = client.get(f"/api/samples/{sid}/audit").json()
    assert audit_after[: len(audit_before)] == audit_before  # nothing lost or changed
    assert [e["action"] for e in audit_after].count("cell.reclassify") == 3
    assert [e["action"] for e in audit_after].count("cells.upload") == 2
    summary = _wait_classified(client, sid, 9)  # the pending cells are picked up again
    assert summary["progress"]["classified"] == 9
    assert summary["progress"]["reviewed"] == 3
    client.close()

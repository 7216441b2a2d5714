"""Security of the review app: logins, CSRF, roles, signed samples and hostile uploads."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import socket
import sqlite3
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bomb_images import png_header_only
from fastapi.routing import APIRoute
from PIL import Image
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select, text

from marrowscope.service.models import AuditEvent, LoginSession, User

from .conftest import PASSWORD, Service, files_of, sample_images

pytestmark = pytest.mark.integration

PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/api/health")}


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute of the app, also inside included routers (FastAPI nests them lazily)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # fastapi.routing._IncludedRouter
            yield from _api_routes(route.original_router.routes)


def test_every_route_needs_a_login(service: Service) -> None:
    """Walk the route table: 401 for the API, a redirect to the login page for pages."""
    c = service.client
    checked = 0
    seen = set()
    for route in _api_routes(service.app.routes):
        seen.add(route.path)
        for method in sorted(route.methods - {"HEAD"}):
            if (method, route.path) in PUBLIC:
                continue
            url = re.sub(r"\{[^}]+\}", "1", route.path)
            r = c.request(method, url, follow_redirects=False)
            if route.path.startswith("/api/"):
                assert r.status_code == 401, (method, route.path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
            else:
                assert r.status_code == 303, (method, route.path, r.status_code)
                assert r.headers["location"].startswith("/login?next="), (method, route.path)
            checked += 1
    assert checked >= 30
    assert {"/api/samples/{sample_id}/signoff", "/samples/{sample_id}/report", "/logout"} <= seen
    # a wrong or revoked token is no better than none
    assert c.get("/api/samples", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/api/health").status_code == 200
    assert c.get("/login").status_code == 200
    assert c.get("/static/app.js").status_code == 200


def test_cookie_login_needs_csrf_for_every_change(service: Service) -> None:
    c = service.client
    csrf = service.login("rev")
    cookie = c.cookies.get("marrowscope_session")
    assert cookie
    # reads need no token
    assert c.get("/api/samples").status_code == 200
    # changes without the token, or with a wrong one, are refused: API and forms alike
    assert c.post("/api/samples", json={"code": "S-1"}).status_code == 403
    r = c.post("/api/samples", json={"code": "S-1"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = c.post("/samples", data={"code": "S-1"}, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post("/samples", data={"code": "S-1", "csrf_token": "wrong"}, follow_redirects=False)
    assert r.status_code == 403
    assert c.post("/logout", follow_redirects=False).status_code == 403
    assert c.get("/api/samples").json() == []  # nothing was created
    # with the token both work
    r = c.post("/api/samples", json={"code": "S-1"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201
    r = c.post("/samples", data={"code": "S-2", "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/samples/")
    sid = r.headers["location"].rsplit("/", 1)[1]
    page = c.get(f"/samples/{sid}")
    assert page.status_code == 200 and f'value="{csrf}"' in page.text  # every form carries it
    assert page.text.count('name="csrf_token"') >= 4
    # bearer-token requests need no CSRF token (browsers never send them by themselves)
    c.cookies.clear()
    r = c.post("/api/samples", json={"code": "S-3"}, headers=service.auth("rev"))
    assert r.status_code == 201


def test_login_cookie_flags_failed_login_and_logout(service: Service) -> None:
    c = service.client
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post(
        "/login", data={"username": "rev", "password": "wrong password!", "csrf_token": token}
    )
    assert r.status_code == 401 and "wrong user name or password" in r.text
    r = c.post("/login", data={"username": "rev", "password": PASSWORD})  # no login CSRF token
    assert r.status_code == 403
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post(
        "/login",
        data={
            "username": "rev",
            "password": PASSWORD,
            "csrf_token": token,
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    stolen = c.cookies.get("marrowscope_session")
    csrf = c.get("/api/me").json()["csrf_token"]
    assert c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    # the old cookie is dead on the server side too
    c.cookies.set("marrowscope_session", stolen)
    assert c.get("/api/samples").status_code == 401
    with service.app.state.db.read() as s:
        actions = s.scalars(
            select(AuditEvent.action).where(AuditEvent.username == "rev").order_by(AuditEvent.id)
        ).all()
        ended = s.scalars(select(LoginSession.ended_at)).all()
    assert actions == ["login.failed", "login", "logout"]
    assert len(ended) == 1 and ended[0] is not None


def test_roles_reviewer_cannot_sign_or_manage_users(service: Service) -> None:
    c = service.client
    csrf = service.login("rev")
    r = c.get("/admin/users")
    assert r.status_code == 403 and "needs the admin role" in r.text
    sid = service.new_sample(service.auth("sig"))
    service.upload(sid, files_of(sample_images(1)), service.auth("sig"))
    service.wait()
    ids = [x["id"] for x in service.cells(sid, service.auth("sig"))]
    c.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": ids},
        headers={"X-CSRF-Token": csrf},
    )
    r = c.post(f"/api/samples/{sid}/signoff", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403
    r = c.post(f"/samples/{sid}/signoff", data={"csrf_token": csrf}, follow_redirects=True)
    assert "only a signer" in r.text  # shown as a message on the sample page
    assert not c.get(f"/api/samples/{sid}").json()["signed"]


def test_html_escapes_file_names_and_notes(service: Service) -> None:
    c = service.client
    csrf = service.login("rev")
    sid = service.new_sample(service.auth("rev"), notes="<script>alert(1)</script>")
    data = sample_images(1)[0].read_bytes()
    service.upload(
        sid,
        [("files", ("<img src=x onerror=alert(1)>.jpg", data, "image/jpeg"))],
        service.auth("rev"),
    )
    page = c.get(f"/samples/{sid}").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x onerror" not in page
    assert "script-src 'self'" in c.get(f"/samples/{sid}").headers["content-security-policy"]
    assert csrf


# ------------------------------------------------------------------------------ hostile uploads


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def test_hostile_files_are_refused_by_name_and_the_rest_go_through(make_service) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(max_file_bytes=200_000, max_pixels=1_000_000, max_zip_members=20)
    rev = svc.user("rev", "reviewer")
    sid = svc.new_sample(rev)
    good = sample_images(3)
    g = [p.read_bytes() for p in good]
    bomb_zip = _zip({"cells/zeros.png": b"\0" * 5_000_000})  # ~5000:1
    many_zip = _zip({f"c{i}.jpg": g[0] for i in range(25)})
    files = [
        ("files", (good[0].name, g[0], "image/jpeg")),
        ("files", ("../../etc/passwd.jpg", g[1], "image/jpeg")),
        ("files", ("/abs/path.jpg", g[1], "image/jpeg")),
        ("files", ("..\\win.jpg", g[1], "image/jpeg")),
        ("files", ("notes.txt", b"clinical notes", "text/plain")),
        ("files", ("fake.jpg", b"%PDF-1.4 not really an image", "image/jpeg")),
        ("files", ("huge.png", _png(10, 10) + b"\0" * 250_000, "image/png")),
        ("files", ("bomb.png", png_header_only(50_000, 50_000), "image/png")),
        ("files", ("big.png", _png(1200, 1000), "image/png")),
        ("files", ("bomb.zip", bomb_zip, "application/zip")),
        ("files", ("many.zip", many_zip, "application/zip")),
        ("files", ("broken.zip", b"PK\x03\x04 nope", "application/zip")),
        (
            "files",
            (
                "cells.zip",
                _zip(
                    {
                        "slide/" + good[1].name: g[1],
                        "../escape.jpg": g[2],
                        "inner.zip": _zip({"x.jpg": g[2]}),
                        "__MACOSX/._junk.jpg": b"junk",
                        "readme.md": b"hello",
                    }
                ),
                "application/zip",
            ),
        ),
        ("files", (good[2].name, g[2], "image/jpeg")),
    ]
    r = svc.client.post(f"/api/samples/{sid}/cells", files=files, headers=rev)
    assert r.status_code == 201, r.text
    body = r.json()
    accepted = sorted(a["name"] for a in body["accepted"])
    assert accepted == sorted([good[0].name, good[2].name, f"cells.zip:slide/{good[1].name}"])
    why = {x["name"]: x["reason"] for x in body["rejected"]}
    assert "path traversal" in why["../../etc/passwd.jpg"]
    assert "absolute path" in why["/abs/path.jpg"]
    assert "Windows path" in why["..\\win.jpg"]
    assert "not an accepted file type" in why["notes.txt"]
    assert "not an image" in why["fake.jpg"]
    assert "above the 200,000 bytes limit" in why["huge.png"]
    assert "decompression bomb" in why["bomb.png"] and "2500000000 pixels" in why["bomb.png"]
    assert "1,200,000 pixels, above the 1,000,000 limit" in why["big.png"]
    assert "zip bomb" in why["bomb.zip"]
    assert "25 entries, above the 20 limit" in why["many.zip"]
    assert "not a valid zip file" in why["broken.zip"]
    assert "path traversal" in why["cells.zip:../escape.jpg"]
    assert "nested zip" in why["cells.zip:inner.zip"]
    assert "only images" in why["cells.zip:readme.md"]
    assert not any("__MACOSX" in n for n in why)
    for item in body["rejected"]:
        assert item["message"].startswith(item["name"] + ": ")
    assert len(body["rejected"]) == 14
    svc.wait()
    assert len(svc.cells(sid, rev)) == 3
    written = [p.name for p in (svc.app.state.settings.data_dir).rglob("*") if p.is_file()]
    assert not any("passwd" in n or "escape" in n for n in written)


def test_oversized_request_is_refused_before_reading(make_service) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(max_request_bytes=100_000)
    rev = svc.user("rev", "reviewer")
    sid = svc.new_sample(rev)
    big = [("files", ("a.png", _png(10, 10) + b"\0" * 150_000, "image/png"))]
    r = svc.client.post(f"/api/samples/{sid}/cells", files=big, headers=rev)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert svc.cells(sid, rev) == []


def _chunked(body: bytes, size: int = 16_384) -> Iterator[bytes]:
    """``body`` as a stream without a length: httpx sends it chunked, no Content-Length."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_chunked_body_over_the_limit_is_a_413_naming_the_limit(make_service) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(max_request_bytes=100_000)
    rev = svc.user("rev", "reviewer")
    sid = svc.new_sample(rev)
    big = [("files", ("a.png", _png(10, 10) + b"\0" * 150_000, "image/png"))]
    encoded = httpx.Request("POST", "http://x/", files=big)
    body, ctype = encoded.read(), encoded.headers["content-type"]
    r = svc.client.post(
        f"/api/samples/{sid}/cells",
        content=_chunked(body),
        headers={**rev, "Content-Type": ctype},
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert r.json()["detail"].startswith("request body above the 100,000-byte limit")
    r = svc.client.post(  # a JSON route: the same answer
        "/api/samples",
        content=_chunked(b'{"code": "S-1", "notes": "' + b"x" * 120_000 + b'"}'),
        headers={**rev, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "100,000-byte limit" in r.json()["detail"]
    csrf = svc.login("rev")  # the page's form upload: an error page naming the limit
    r = svc.client.post(
        f"/samples/{sid}/upload",
        content=_chunked(body.replace(b"--" + ctype.split("boundary=")[1].encode(), b"--B")),
        headers={"Content-Type": "multipart/form-data; boundary=B", "X-CSRF-Token": csrf},
    )
    assert r.status_code == 413 and "100,000-byte limit" in r.text
    assert svc.cells(sid, rev) == []
    assert [x["code"] for x in svc.client.get("/api/samples", headers=rev).json()] == ["BM-0001"]


def test_chunked_body_over_the_limit_is_a_413_on_a_real_server(live_service) -> None:  # type: ignore[no-untyped-def]
    srv = live_service(max_request_bytes=100_000)
    rev = srv.user("rev", "reviewer")
    with httpx.Client(base_url=srv.base_url, timeout=60, headers=rev) as c:
        sid = c.post("/api/samples", json={"code": "S-1"}).json()["id"]
        for size in (150_000, 3_000_000):
            encoded = httpx.Request("POST", "http://x/", files=[("files", ("a.png", b"\0" * size))])
            r = c.post(
                f"/api/samples/{sid}/cells",
                content=_chunked(encoded.read()),
                headers={"Content-Type": encoded.headers["content-type"]},
            )
            assert r.status_code == 413, r.text
            assert r.json()["detail"].startswith("request body above the 100,000-byte limit")
        assert c.get(f"/api/samples/{sid}/cells").json() == []


def _rss_bytes() -> int:
    """This process's resident memory (``VmRSS`` of ``/proc/self/status``)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _bytes_on_disk(*folders: Path) -> int:
    """Bytes of the files under ``folders``, plus those of files this process holds open there
    (anonymous temporaries, unlinked at creation, are counted through ``/proc/self/fd``)."""
    total = 0
    for folder in folders:
        total += sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file())
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            inside = any(target.startswith(f"{folder}/") for folder in folders)
            if inside and (" (deleted)" in target or not Path(target).exists()):
                total += os.stat(f"/proc/self/fd/{fd}").st_size
    return total


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_a_logged_in_oversized_chunked_upload_is_bounded_in_memory_and_disk(  # type: ignore[no-untyped-def]
    live_service, tmp_path, monkeypatch
) -> None:
    """On a real server (in a thread of this process): a logged-in upload of 24 MiB sent
    chunked against a 2 MiB limit is answered 413; sampled every few milliseconds while it is
    sent, the server's temporary files (the framework's spooled upload files, redirected to a
    test folder) and the image store never hold more than the limit plus one chunk, nothing is
    left behind, and the process's memory grows by less than a few times the limit."""
    limit, chunk, total = 2 * 1024 * 1024, 64 * 1024, 24 * 1024 * 1024
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where starlette spools file parts
    srv = live_service(max_request_bytes=limit)
    rev = srv.user("rev", "reviewer")
    store = srv.app.state.store.root
    head = (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(total // chunk):
            yield b"\0" * chunk
        yield b"\r\n--B--\r\n"

    peak_disk, peak_rss, samples, stop = [0], [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples[0] += 1
            peak_disk[0] = max(peak_disk[0], _bytes_on_disk(spool, store))
            peak_rss[0] = max(peak_rss[0], _rss_bytes())
            time.sleep(0.002)

    with httpx.Client(base_url=srv.base_url, timeout=60, headers=rev) as c:
        sid = c.post("/api/samples", json={"code": "S-1"}).json()["id"]
        gc.collect()
        rss_before = _rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            r = c.post(
                f"/api/samples/{sid}/cells",
                content=body(),
                headers={"Content-Type": "multipart/form-data; boundary=B"},
            )
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            sampler.join()
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("request body above the 2,097,152-byte limit")
        assert c.get(f"/api/samples/{sid}/cells").json() == []
    print(
        f"peak disk {peak_disk[0]:,} B, RSS growth {peak_rss[0] - rss_before:,} B, {elapsed:.2f} s"
    )
    assert elapsed < 10
    assert samples[0] >= 2  # the sampler ran while the body was sent
    # a sampled peak: the spool file may come and go between two samples on a fast machine, so
    # only the upper bound is certain
    assert peak_disk[0] <= limit + chunk, peak_disk[0]
    assert peak_rss[0] - rss_before < 3 * limit, peak_rss[0] - rss_before
    deadline = time.monotonic() + 5
    while _bytes_on_disk(spool, store) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert _bytes_on_disk(spool, store) == 0  # no spooled or .upload-* file left
    assert not list(store.rglob(".upload-*"))


def test_bodies_are_limited_per_route_and_tiny_without_a_login(make_service) -> None:  # type: ignore[no-untyped-def]
    """Without a valid login a body over 16 KiB is refused (413) before it is read; with one, a
    JSON or form route takes at most 1 MiB and only the upload routes take large bodies."""
    svc = make_service()
    rev = svc.user("rev", "reviewer")
    sid = svc.new_sample(rev)
    c = svc.client
    json_type = {"Content-Type": "application/json"}
    big_json = b'{"code": "S-2",' + b" " * 20_000 + b'"notes": "n"}'  # 20 kB, valid
    for headers in [{}, {"Authorization": "Bearer made-up"}, {"Authorization": "Basic cmV2"}]:
        r = c.post("/api/samples", content=big_json, headers={**json_type, **headers})
        assert r.status_code == 413, (headers, r.text)
        detail = r.json()["detail"]
        assert "16,384-byte limit for requests without a login" in detail, detail
    r = c.post("/api/samples", content=b'{"code": "S-2"}', headers=json_type)
    assert r.status_code == 401  # a small anonymous body gets the ordinary answer
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post(
        "/login",
        data={
            "username": "rev",
            "password": "p" * 1000,
            "csrf_token": token,
            "next": "/" + "n" * 20_000,
        },
    )
    assert r.status_code == 413 and "16,384-byte limit" in r.json()["detail"]
    # logged in: a JSON route takes up to 1 MiB ...
    r = c.post("/api/samples", content=big_json, headers={**json_type, **rev})
    assert r.status_code == 201, r.text
    huge = b'{"code": "S-3",' + b" " * 1_100_000 + b'"notes": "n"}'
    r = c.post("/api/samples", content=huge, headers={**json_type, **rev})
    assert r.status_code == 413 and "1,048,576-byte limit" in r.json()["detail"]
    # ... and an upload route far more
    image = sample_images(1)[0].read_bytes()
    padded = [("files", ("a.jpg", image, "image/jpeg")), ("files", ("pad.txt", b"x" * 2_000_000))]
    r = c.post(f"/api/samples/{sid}/cells", files=padded, headers=rev)
    assert r.status_code == 201 and len(r.json()["accepted"]) == 1
    assert [x["code"] for x in c.get("/api/samples", headers=rev).json()] == ["S-2", "BM-0001"]


def _first_answer(base_url: str, request: bytes, timeout: float = 15) -> bytes:
    """Send ``request`` (head and part of a body), never the rest, and return the start of what
    the server answers (an answer before the body is complete means it was not read)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while True:
            block = s.recv(65536)
            answer += block
            head, sep, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if not block or (sep and len(body) >= int(length.group(1) if length else 0)):
                return answer


def test_an_anonymous_large_body_is_refused_before_it_is_sent(live_service) -> None:  # type: ignore[no-untyped-def]
    """On a real server: an anonymous upload declaring 500 MB, and an anonymous chunked body
    past 16 KiB, are answered 413 while the client has not even sent the rest; the server
    cannot have read or buffered it."""
    srv = live_service()
    srv.user("rev", "reviewer")
    head = (
        b"POST /api/samples/1/cells HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 500000000\r\n\r\n"
    )
    t0 = time.monotonic()
    answer = _first_answer(srv.base_url, head + b"--B\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"16,384-byte limit for requests without a login" in answer
    chunk = b"x" * 20_000
    head = (
        b"POST /api/samples HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer made-up\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer = _first_answer(srv.base_url, head + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert time.monotonic() - t0 < 10


def test_uploads_in_flight_are_capped_server_wide(live_service) -> None:  # type: ignore[no-untyped-def]
    """On a real server with ``max_uploads_in_flight=2``: while two logged-in uploads are still
    sending their (chunked) bodies, a third upload, API or page, is answered 503 at once with
    ``Retry-After`` and a message naming the cap, before its body is read; a read route still
    answers; once the two finish, an upload is accepted again."""
    srv = live_service(max_uploads_in_flight=2)
    rev = srv.user("rev", "reviewer")
    image = sample_images(1)[0]
    head = (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    ctype = {"Content-Type": "multipart/form-data; boundary=B"}
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield head
        release.wait(30)  # the body stays unfinished until the test lets it go
        yield image.read_bytes() + b"\r\n--B--\r\n"

    with httpx.Client(base_url=srv.base_url, timeout=30, headers=rev) as c:
        sid = c.post("/api/samples", json={"code": "S-1"}).json()["id"]
        answers: list[int] = []

        def upload() -> None:
            with httpx.Client(base_url=srv.base_url, timeout=30, headers=rev) as own:
                r = own.post(f"/api/samples/{sid}/cells", content=slow_body(), headers=ctype)
                answers.append(r.status_code)

        threads = [threading.Thread(target=upload, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 20  # generous: a loaded 2-core machine is slow to start
            while True:  # until the server has taken both slow uploads in
                r = c.post(f"/api/samples/{sid}/cells", content=head, headers=ctype)
                if r.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "5"
            assert r.json()["detail"] == (
                "2 uploads are already in progress on this server; try again in 5 s"
            )
            page = c.post(f"/samples/{sid}/upload", content=head, headers=ctype)
            assert page.status_code == 503 and page.headers["Retry-After"] == "5"
            assert "text/html" in page.headers["content-type"]
            assert "2 uploads are already in progress on this server" in page.text
            assert c.get("/api/health").status_code == 200
            assert c.get(f"/api/samples/{sid}/cells").status_code == 200
        finally:
            release.set()
            for t in threads:
                t.join(30)
        assert answers == [201, 201]
        files = [("files", (image.name, image.read_bytes(), "image/jpeg"))]
        r = c.post(f"/api/samples/{sid}/cells", files=files)
        assert r.status_code == 201, r.text


def test_form_upload_reports_refused_files_on_the_page(service: Service) -> None:
    c = service.client
    csrf = service.login("rev")
    sid = service.new_sample(service.auth("rev"))
    files = files_of(sample_images(2)) + [
        ("files", ("evil.exe", b"MZ", "application/octet-stream"))
    ]
    r = c.post(
        f"/samples/{sid}/upload", data={"csrf_token": csrf}, files=files, follow_redirects=True
    )
    assert r.status_code == 200
    assert "2 cell image(s) added" in r.text
    assert "refused evil.exe: not an accepted file type" in r.text


def test_many_refused_files_keep_the_cookie_small_and_are_shown(service: Service) -> None:
    """50 refused files with long names on the no-JavaScript upload path: the messages stay on
    the server (keyed by the login session), the cookie stays far under the 4,096 bytes a
    browser keeps, and the next page still lists every refused file."""
    c = service.client
    csrf = service.login("rev")
    sid = service.new_sample(service.auth("rev"))
    names = [f"{i:02d}-{'long-scanner-export-name-' * 9}.txt" for i in range(50)]
    assert all(230 < len(n) < 256 for n in names)
    files = files_of(sample_images(1)) + [
        ("files", (name, b"not an image", "text/plain")) for name in names
    ]
    r = c.post(
        f"/samples/{sid}/upload", data={"csrf_token": csrf}, files=files, follow_redirects=False
    )
    assert r.status_code == 303
    for header in r.headers.get_list("set-cookie"):
        assert len(header) < 1024, len(header)
    page = c.get(r.headers["location"])
    assert page.status_code == 200
    assert "1 cell image(s) added" in page.text
    for name in names:
        assert f"refused {name}: not an accepted file type" in page.text
    # shown once: the next page has no messages left, and another user never sees them
    assert "refused" not in c.get(r.headers["location"]).text
    c.cookies.clear()
    service.login("sig")
    assert "refused" not in c.get(r.headers["location"]).text


def test_account_audit_page_lists_logins_for_admins(service: Service) -> None:
    c = service.client
    service.login("admin")
    page = c.get("/admin/audit")
    assert page.status_code == 200
    assert re.search(r"<td>admin</td><td>login</td>", page.text)
    c.cookies.clear()
    service.login("rev")
    assert c.get("/admin/audit").status_code == 403


# ----------------------------------------------------------------------- tokens and deleted users


def _delete_user_row(service: Service, username: str) -> None:
    """Delete a user's row behind the app's back (as a database administrator might), leaving
    its API tokens and login sessions pointing at nobody: the foreign keys are bypassed."""
    engine = service.app.state.db.engine
    if engine.dialect.name == "sqlite":
        raw = sqlite3.connect(engine.url.database)  # foreign keys are off on a plain connection
        try:
            with raw:
                raw.execute("DELETE FROM users WHERE username = ?", (username,))
        finally:
            raw.close()
        return
    with engine.begin() as conn:
        inspector = sa_inspect(conn)
        for table in inspector.get_table_names():
            for fk in inspector.get_foreign_keys(table):
                if fk["referred_table"] == "users":
                    conn.execute(text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{fk["name"]}"'))
        conn.execute(text("DELETE FROM users WHERE username = :u"), {"u": username})


def test_token_or_login_of_a_deleted_user_is_a_401_not_a_crash(service: Service) -> None:
    c = service.client
    gone = service.user("gone", "reviewer")
    service.login("gone")
    assert c.get("/api/me", headers=gone).json()["username"] == "gone"
    assert c.get("/api/me").json()["via"] == "session"
    _delete_user_row(service, "gone")
    with service.app.state.db.read() as s:
        assert s.scalar(select(User).where(User.username == "gone")) is None
    r = c.get("/api/samples", headers=gone)  # the token
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"].startswith("invalid or revoked API token: ")
    r = c.get("/api/samples")  # the login cookie
    assert r.status_code == 401 and r.json()["detail"].startswith("login required: ")
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


def test_only_a_bearer_authorization_header_is_read_as_a_token(service: Service) -> None:
    c = service.client
    rev = service.auth("rev")
    token = rev["Authorization"].split(" ", 1)[1]
    assert c.get("/api/me", headers={"Authorization": f"bearer   {token}  "}).status_code == 200
    for header in ["Basic cmV2OnB3", "Bearer ", "Bearer", token]:  # not a bearer token
        r = c.get("/api/me", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["detail"].startswith("login required: ")  # as if no header was sent
    csrf = service.login("sig")  # ... so the login cookie still counts next to such a header
    r = c.get("/api/me", headers={"Authorization": "Basic cmV2OnB3"})
    assert r.status_code == 200 and r.json() == {
        "username": "sig", "role": "signer", "via": "session", "csrf_token": csrf,
    }  # fmt: skip
    r = c.get("/api/me", headers={"Authorization": "Bearer wrong"})  # a bearer token wins
    assert r.status_code == 401 and r.json()["detail"].startswith("invalid or revoked API token")


def test_openapi_schema_offers_the_bearer_token_or_the_login_cookie(service: Service) -> None:
    schema = service.client.get("/api/openapi.json", headers=service.auth("rev")).json()
    schemes = schema["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert schemes["cookie"]["in"] == "cookie"
    assert schema["paths"]["/api/health"]["get"]["security"] == []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if path != "/api/health":
                security = op.get("security", schema["security"])
                assert security == [{"bearer": []}, {"cookie": []}], (method, path)

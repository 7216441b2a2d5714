"""The API's contract: named response shapes in the OpenAPI schema, the JSON field names,
pagination of the list routes and the report download's file name."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import pytest
from sqlalchemy import event

from marrowscope.service import review
from marrowscope.service.accounts import find_user
from marrowscope.service.models import Sample

from .conftest import Service, files_of, sample_images

pytestmark = pytest.mark.integration


def _signed_sample(service: Service, code: str = "BM-0001", n: int = 1) -> tuple[int, list[int]]:
    """A sample with ``n`` cells, every one confirmed, signed off by ``sig``; (id, cell ids)."""
    rev, sig = service.auth("rev"), service.auth("sig")
    sid = service.new_sample(rev, code)
    service.upload(sid, files_of(sample_images(n)), rev)
    service.wait()
    ids = [c["id"] for c in service.cells(sid, rev)]
    r = service.client.post(
        f"/api/samples/{sid}/cells/reclassify", json={"cell_ids": ids, "label": None}, headers=rev
    )
    assert r.status_code == 200, r.text
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 200, r.text
    return sid, ids


# ------------------------------------------------------------------------ response shapes


def test_every_json_route_has_a_named_response_model(service: Service) -> None:
    schema = service.client.get("/api/openapi.json", headers=service.auth("rev")).json()
    components = schema["components"]["schemas"]
    checked = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            assert ok, (method, path)
            for code, response in ok.items():
                if code == "204":
                    assert "content" not in response, (method, path)
                    continue
                body = response["content"]["application/json"]["schema"]
                target = body.get("items", body)  # a list route: its items
                ref = target.get("$ref", "")
                assert ref.startswith("#/components/schemas/"), (method, path, body)
                name = ref.rsplit("/", 1)[1]
                assert components[name]["properties"], (method, path, name)
                checked.append((method.upper(), path, name, "items" in body))
    routes = {(m, p): (n, is_list) for m, p, n, is_list in checked}
    assert routes[("GET", "/api/health")] == ("Health", False)
    assert routes[("GET", "/api/samples")] == ("SamplePublic", True)
    assert routes[("GET", "/api/samples/{sample_id}")] == ("SamplePublic", False)
    assert routes[("GET", "/api/samples/{sample_id}/cells")] == ("CellPublic", True)
    assert routes[("PATCH", "/api/samples/{sample_id}/cells/{cell_id}")] == ("CellPublic", False)
    assert routes[("GET", "/api/samples/{sample_id}/audit")] == ("AuditEventPublic", True)
    assert routes[("GET", "/api/samples/{sample_id}/report")] == ("ReportPublic", False)
    assert routes[("POST", "/api/predict")] == ("Prediction", False)
    fields, field = "/api/samples/{sample_id}/fields", "/api/samples/{sample_id}/fields/{field_id}"
    assert routes[("POST", fields)] == ("UploadResult", False)
    assert routes[("GET", fields)] == ("FieldPublic", True)
    assert routes[("GET", field)] == ("FieldPublic", False)
    assert routes[("POST", field + "/cells")] == ("CellPublic", False)
    for action in ("reject", "restore"):
        assert routes[("POST", f"/api/samples/{{sample_id}}/cells/{{cell_id}}/{action}")] == (
            "CellPublic",
            False,
        )
    assert len(routes) >= 14
    # nested shapes are named too (no free-form objects where the app returns a fixed shape)
    summary = components["SummaryPublic"]["properties"]
    assert summary["flag"]["$ref"].endswith("/FlagPublic")
    assert components["DifferentialRow"]["properties"].keys() >= {"class", "reviewed_percent"}
    # the report's CSV form is documented next to the JSON one
    report = schema["paths"]["/api/samples/{sample_id}/report"]["get"]["responses"]["200"]
    assert "text/csv" in report["content"]


# The JSON field names every route answers with (clients depend on them: never rename one).
SAMPLE = {
    "id", "code", "collected_on", "age_band", "referral_question", "notes", "created_at",
    "created_by", "signed", "signed_at", "signed_by", "cells", "pending", "unreviewed", "summary",
}  # fmt: skip
SUMMARY = {
    "sample_id", "code", "signed", "progress", "blocking", "can_sign", "threshold",
    "differential", "totals", "flag", "signoff_message",
}  # fmt: skip
FLAG = {
    "basis", "status", "message", "hac_class", "count", "percent", "min_percent", "min_count",
    "evidence", "model_status",
}  # fmt: skip
DIFFERENTIAL = {
    "class", "name", "model_count", "model_percent", "reviewed_count", "reviewed_percent",
}  # fmt: skip
CELL = {
    "id", "name", "sha256", "width", "height", "status", "predicted", "confidence", "identified",
    "top3", "reviewed_label", "reviewed_by", "reviewed_at", "label", "model_version", "error",
    "field_id", "box", "detection_score", "origin", "rejected", "rejected_reason",
}  # fmt: skip
MODEL_INFO = {
    "name", "arch", "version", "marrowscope_version", "classes", "input_size", "backend",
    "checkpoint",
}  # fmt: skip


def _check_summary(summary: dict[str, Any]) -> None:
    assert set(summary) == SUMMARY
    assert set(summary["progress"]) == {
        "total", "pending", "classified", "failed", "reviewed", "rejected", "fields",
        "fields_pending", "fields_failed",
    }  # fmt: skip
    assert set(summary["blocking"]) == {"unreviewed", "unidentified", "pending", "failed"}
    assert set(summary["totals"]) == {"model", "reviewed"}
    assert set(summary["flag"]) == FLAG
    assert all(set(e) == {"id", "name", "probability"} for e in summary["flag"]["evidence"])
    assert summary["flag"]["evidence"]  # the HAC model's cells are evidence
    assert all(set(d) == DIFFERENTIAL for d in summary["differential"])


def test_json_field_names_are_the_documented_contract(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    assert set(c.get("/api/model", headers=rev).json()) == MODEL_INFO | {
        "threshold",
        "app_version",
    }
    assert c.get("/api/me", headers=rev).json() == {
        "username": "rev",
        "role": "reviewer",
        "via": "token",
    }  # no csrf_token key for a token login
    sid, ids = _signed_sample(service, n=2)
    listed = c.get("/api/samples", headers=rev).json()
    assert [set(s) for s in listed] == [SAMPLE] and listed[0]["summary"] is None
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert set(one) == SAMPLE
    _check_summary(one["summary"])
    cells = c.get(f"/api/samples/{sid}/cells", headers=rev).json()
    assert [set(x) for x in cells] == [CELL, CELL]
    assert all(set(t) == {"class", "probability"} for t in cells[0]["top3"])
    assert set(c.get(f"/api/samples/{sid}/cells/{ids[0]}", headers=rev).json()) == CELL
    trail = c.get(f"/api/samples/{sid}/audit", headers=rev).json()
    assert all(set(e) == {"id", "at", "user", "action", "cell_id", "old", "new"} for e in trail)
    report = c.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert set(report) == {
        "sample", "signed_at", "signed_by", "reviewers", "model", "settings", "cells",
        "differential", "totals", "flag", "changed_by_review", "rejected", "rejected_cells",
        "fields", "fields_not_searched",
    }  # fmt: skip
    assert (report["rejected"], report["rejected_cells"]) == (0, [])
    assert set(report["sample"]) == {
        "id", "code", "collected_on", "age_band", "referral_question", "notes", "created_at",
    }  # fmt: skip
    assert set(report["model"]) == MODEL_INFO | {"versions_used"}
    assert set(report["settings"]) == {"threshold", "hac_min_percent", "hac_min_count"}
    assert set(report["flag"]) == FLAG
    other = service.new_sample(rev, "BM-0002")
    up = service.upload(
        other,
        files_of(sample_images(1)) + [("files", ("x.txt", b"no", "text/plain"))],
        rev,
    )
    assert [set(a) for a in up["accepted"]] == [{"id", "name"}]
    assert [set(r) for r in up["rejected"]] == [{"name", "reason", "message"}]
    service.wait()
    new_ids = [x["id"] for x in service.cells(other, rev)]
    r = c.post(
        f"/api/samples/{other}/cells/reclassify",
        json={"cell_ids": new_ids, "label": "LYT"},
        headers=rev,
    )
    assert set(r.json()) == {"changed", "summary"}
    assert set(r.json()["summary"]) == SUMMARY
    path = sample_images(1, "LYT")[0]
    p = c.post(
        "/api/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, headers=rev
    ).json()
    assert set(p) == {
        "name", "model", "predicted", "confidence", "identified", "probabilities", "top3",
    }  # fmt: skip
    assert all(set(t) == {"class", "probability"} for t in p["top3"])


# ------------------------------------------------------------------------------ pagination


@contextmanager
def _statements(service: Service) -> Iterator[list[str]]:
    """The SQL statements the app sends while the block runs."""
    seen: list[str] = []
    engine = service.app.state.db.engine

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _paged_in_sql(statements: list[str], table: str) -> bool:
    return any(re.search(rf"FROM {table}\b.*\bLIMIT\b.*\bOFFSET\b", s) for s in statements)


def test_samples_list_is_paginated_in_sql_with_a_default_limit(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    with service.app.state.db.write() as s:
        user = find_user(s, "rev")
        for i in range(102):
            review.create_sample(s, user, review.SampleFields(code=f"S-{i:03d}"))
    newest_first = [f"S-{i:03d}" for i in reversed(range(102))]
    default = c.get("/api/samples", headers=rev).json()
    assert [s["code"] for s in default] == newest_first[:100]  # limit defaults to 100
    everything = c.get("/api/samples", params={"limit": 1000}, headers=rev).json()
    assert [s["code"] for s in everything] == newest_first
    with _statements(service) as statements:
        page = c.get("/api/samples", params={"skip": 3, "limit": 2}, headers=rev)
    assert [s["code"] for s in page.json()] == newest_first[3:5]
    assert _paged_in_sql(statements, "samples")
    tail = c.get("/api/samples", params={"skip": 100, "limit": 50}, headers=rev).json()
    assert [s["code"] for s in tail] == newest_first[100:]
    assert c.get("/api/samples", params={"skip": 500}, headers=rev).json() == []


def test_paged_samples_keep_their_cell_counts(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    a = service.new_sample(rev, "A-1")
    service.new_sample(rev, "B-1")
    service.upload(a, files_of(sample_images(3)), rev)
    service.wait()
    page = c.get("/api/samples", params={"skip": 1, "limit": 1}, headers=rev).json()
    assert [(s["code"], s["cells"], s["unreviewed"]) for s in page] == [("A-1", 3, 3)]
    page = c.get("/api/samples", params={"skip": 0, "limit": 1}, headers=rev).json()
    assert [(s["code"], s["cells"]) for s in page] == [("B-1", 0)]


def test_cells_and_audit_lists_are_paginated_in_sql(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev)
    service.upload(sid, files_of(sample_images(5)), rev)
    service.wait()
    cells = c.get(f"/api/samples/{sid}/cells", headers=rev).json()
    assert len(cells) == 5
    with _statements(service) as statements:
        page = c.get(f"/api/samples/{sid}/cells", params={"skip": 1, "limit": 3}, headers=rev)
    assert [x["id"] for x in page.json()] == [x["id"] for x in cells[1:4]]
    assert _paged_in_sql(statements, "cells")
    for cell in cells:
        c.patch(f"/api/samples/{sid}/cells/{cell['id']}", json={"label": "LYT"}, headers=rev)
    trail = c.get(f"/api/samples/{sid}/audit", headers=rev).json()
    assert len(trail) >= 2 + 1 + 5  # create, upload, classified, 5 re-classifications
    with _statements(service) as statements:
        page = c.get(f"/api/samples/{sid}/audit", params={"skip": 2, "limit": 4}, headers=rev)
    assert page.json() == trail[2:6]
    assert _paged_in_sql(statements, "audit_events")
    past = {"skip": len(trail)}
    assert c.get(f"/api/samples/{sid}/audit", params=past, headers=rev).json() == []


def test_bad_skip_or_limit_is_a_422_naming_the_parameter(service: Service) -> None:
    rev = service.auth("rev")
    sid = service.new_sample(rev)
    bad = [{"skip": -1}, {"limit": 0}, {"limit": 1001}, {"skip": "x"}, {"skip": 2**31}]
    for route in ["/api/samples", f"/api/samples/{sid}/cells", f"/api/samples/{sid}/audit"]:
        for params in bad:
            r = service.client.get(route, params=params, headers=rev)
            assert r.status_code == 422, (route, params)
            assert [e["loc"] for e in r.json()["detail"]] == [["query", next(iter(params))]]
        assert service.client.get(route, params={"limit": 1000}, headers=rev).status_code == 200


def test_list_routes_document_skip_and_limit(service: Service) -> None:
    schema = service.client.get("/api/openapi.json", headers=service.auth("rev")).json()
    for path in [
        "/api/samples",
        "/api/samples/{sample_id}/cells",
        "/api/samples/{sample_id}/audit",
    ]:
        params = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"]}
        assert params["skip"]["schema"]["minimum"] == 0 and params["skip"]["schema"]["default"] == 0
        limit = params["limit"]["schema"]
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 100)


# ------------------------------------------------------------------------ report download


def _saved_as(content_disposition: str) -> str:
    """The file name a browser saves the download as (RFC 6266: ``filename*`` wins)."""
    params = dict(
        (m.group(1).lower(), m.group(2))
        for m in re.finditer(r';\s*([\w*]+)=("(?:[^"\\]|\\.)*"|[^;]*)', content_disposition)
    )
    assert content_disposition.startswith("attachment;"), content_disposition
    if "filename*" in params:
        charset, _, encoded = params["filename*"].partition("''")
        assert charset.lower() == "utf-8", content_disposition
        return unquote(encoded, encoding="utf-8", errors="strict")
    value = params["filename"]
    assert value.startswith('"') and value.endswith('"'), content_disposition
    return re.sub(r"\\(.)", r"\1", value[1:-1])


# A sample id from before the id rule (or a database import): a quote, a comma, non-ASCII.
ODD_CODE = 'BM "7", Zürich-€'


def test_report_csv_download_is_named_after_any_sample_id(service: Service) -> None:
    rev = service.auth("rev")
    sid, _ = _signed_sample(service)
    with service.app.state.db.write() as s:
        s.get(Sample, sid).code = ODD_CODE
    bodies = []
    for url in [f"/samples/{sid}/report.csv", f"/api/samples/{sid}/report?format=csv"]:
        r = service.client.get(url, headers=rev)
        assert r.status_code == 200, url
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        header = r.headers["content-disposition"]
        assert header.isascii() and "\r" not in header and "\n" not in header
        assert _saved_as(header) == f"{ODD_CODE}-report.csv", (url, header)
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert {row["sample_id"] for row in rows} == {ODD_CODE}
        bodies.append(r.text)
    assert bodies[0] == bodies[1]  # one CSV, two URLs


def test_report_csv_download_of_a_plain_sample_id_keeps_the_simple_header(
    service: Service,
) -> None:
    sid, _ = _signed_sample(service, "BM-2025-0001")
    for url in [f"/samples/{sid}/report.csv", f"/api/samples/{sid}/report?format=csv"]:
        r = service.client.get(url, headers=service.auth("rev"))
        assert r.headers["content-disposition"] == 'attachment; filename="BM-2025-0001-report.csv"'

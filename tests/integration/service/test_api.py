"""The review app's JSON API end to end on a real database (SQLite; PostgreSQL when configured)."""

from __future__ import annotations

import csv
import hashlib
import io

import numpy as np
import pytest
from sqlalchemy import select

from marrowscope.service.models import AuditEvent

from .conftest import CLASSES, Service, files_of, sample_images

pytestmark = pytest.mark.integration


def test_health_is_public_and_model_describes_the_bundle(service: Service) -> None:
    c = service.client
    assert c.get("/api/health").json() == {"status": "ok"}
    assert c.get("/api/model").status_code == 401
    info = c.get("/api/model", headers=service.auth("rev")).json()
    assert info["classes"] == CLASSES
    assert info["version"].startswith("paper_cnn:") and len(info["version"]) == 10 + 12
    assert info["threshold"] == 0.5


def _actions(service: Service, sid: int) -> list[str]:
    r = service.client.get(f"/api/samples/{sid}/audit", headers=service.auth("rev"))
    assert r.status_code == 200
    return [e["action"] for e in r.json()]


def test_review_workflow_from_upload_to_signed_report(service: Service) -> None:
    c, sig, rev = service.client, service.auth("sig"), service.auth("rev")
    sid = service.new_sample(
        rev, "BM-2025-0001", collected_on="2025-03-01", age_band="60-79",
        referral_question="suspected hairy-cell leukaemia", notes="splenomegaly",
    )  # fmt: skip
    paths = sample_images(4)
    up = service.upload(sid, files_of(paths), rev)
    assert [a["name"] for a in up["accepted"]] == [p.name for p in paths] and up["rejected"] == []
    service.wait()

    cells = service.cells(sid, rev)
    version = c.get("/api/model", headers=rev).json()["version"]
    assert len(cells) == 4
    for cell in cells:
        assert cell["status"] == "done" and cell["predicted"] == "HAC" and cell["identified"]
        assert cell["model_version"] == version
        assert sum(t["probability"] for t in cell["top3"]) == pytest.approx(1.0, abs=1e-4)
    # The one Predictor path: the stored confidence is predict_proba on the uploaded file.
    direct = service.app.state.model.predictor.predict_proba([paths[0]])[0]
    first = next(x for x in cells if x["name"] == paths[0].name)
    assert first["confidence"] == pytest.approx(float(np.max(direct)), abs=1e-5)

    summary = c.get(f"/api/samples/{sid}", headers=rev).json()["summary"]
    assert summary["progress"] == {
        "total": 4, "pending": 0, "classified": 4, "failed": 0, "reviewed": 0, "rejected": 0,
        "fields": 0, "fields_pending": 0, "fields_failed": 0,
    }  # fmt: skip
    model_counts = {r["class"]: r["model_count"] for r in summary["differential"]}
    assert model_counts == {"BLA": 0, "HAC": 4, "LYT": 0}

    # Sign-off is refused while cells are unreviewed, with how many.
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409
    assert "4 of 4 cells are not reviewed yet" in r.json()["detail"]

    # Re-classify one cell, confirm the rest in bulk (label null = keep the current label).
    ids = sorted(x["id"] for x in cells)
    r = c.patch(f"/api/samples/{sid}/cells/{ids[0]}", json={"label": "LYT"}, headers=rev)
    assert r.status_code == 200 and r.json()["reviewed_label"] == "LYT"
    assert r.json()["reviewed_by"] == "rev"
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify", json={"cell_ids": ids, "label": None}, headers=rev
    )
    assert r.status_code == 200 and r.json()["changed"] == 3  # the LYT cell stays LYT
    reviewed = {x["class"]: x["reviewed_count"] for x in r.json()["summary"]["differential"]}
    assert reviewed == {"BLA": 0, "HAC": 3, "LYT": 1}
    bad = c.patch(f"/api/samples/{sid}/cells/{ids[0]}", json={"label": "XYZ"}, headers=rev)
    assert bad.status_code == 422 and "not a class of the model" in bad.json()["detail"]

    # A reviewer cannot sign off; a signer can, once everything is reviewed.
    r = c.post(f"/api/samples/{sid}/signoff", headers=rev)
    assert r.status_code == 403 and "only a signer" in r.json()["detail"]
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 200 and r.json()["signed"] and r.json()["signed_by"] == "sig"

    # The report: JSON, CSV and print-ready HTML.
    rep = c.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert rep["signed_by"] == "sig" and rep["reviewers"] == ["rev"]
    assert rep["sample"]["code"] == "BM-2025-0001" and rep["sample"]["age_band"] == "60-79"
    assert rep["model"]["version"] == version and rep["changed_by_review"] == 1
    assert rep["flag"]["status"] == "flagged" and rep["flag"]["basis"] == "reviewed"
    assert {d["class"]: d["reviewed_percent"] for d in rep["differential"]} == {
        "BLA": 0.0, "HAC": 75.0, "LYT": 25.0,
    }  # fmt: skip
    text = c.get(f"/api/samples/{sid}/report", params={"format": "csv"}, headers=rev).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["class"], r["count"], r["percent"]) for r in rows] == [
        ("BLA", "0", "0.00"), ("HAC", "3", "75.00"), ("LYT", "1", "25.00"),
    ]  # fmt: skip
    assert {r["signed_by"] for r in rows} == {"sig"} and {r["hac_flag"] for r in rows} == {
        "flagged"
    }
    assert {r["model_version"] for r in rows} == {version}
    assert {r["referral_question"] for r in rows} == {"suspected hairy-cell leukaemia"}
    html = c.get(f"/samples/{sid}/report", headers=rev)
    assert html.status_code == 200 and "Signed off by" in html.text and "75.0%" in html.text

    # Afterwards the sample is read-only, for everyone (and an upload to it stores nothing).
    images = service.app.state.store.images
    stored_before = sorted(images.rglob("*"))
    admin = service.auth("admin")
    for method, url, kwargs in [
        ("patch", f"/api/samples/{sid}/cells/{ids[1]}", {"json": {"label": "BLA"}}),
        (
            "post",
            f"/api/samples/{sid}/cells/reclassify",
            {"json": {"cell_ids": ids, "label": "BLA"}},
        ),
        ("post", f"/api/samples/{sid}/cells", {"files": files_of(sample_images(1, "LYT"))}),
        ("patch", f"/api/samples/{sid}", {"json": {"notes": "changed"}}),
        ("delete", f"/api/samples/{sid}", {}),
        ("post", f"/api/samples/{sid}/signoff", {}),
    ]:
        r = getattr(c, method)(url, headers=admin, **kwargs)
        assert r.status_code == 409, (method, url, r.text)
        assert "read-only" in r.json()["detail"]
    r = c.post(f"/api/samples/{sid}/fields", headers=admin, files=files_of(sample_images(1, "MON")))
    assert r.status_code == 409 and "read-only" in r.json()["detail"]
    assert sorted(images.rglob("*")) == stored_before
    after = c.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert after["differential"] == rep["differential"]

    # Every change is in the audit trail with user, old and new value.
    actions = _actions(service, sid)
    assert actions[:2] == ["sample.create", "cells.upload"]
    assert "cells.classified" in actions and actions[-1] == "sample.signoff"
    assert actions.count("cell.reclassify") == 4
    trail = c.get(f"/api/samples/{sid}/audit", headers=rev).json()
    first_change = next(e for e in trail if e["action"] == "cell.reclassify")
    assert first_change["user"] == "rev" and first_change["cell_id"] == ids[0]
    assert first_change["old"] == {"label": None, "model": "HAC"}
    assert first_change["new"] == {"label": "LYT"}


def test_unidentified_cells_block_signoff_until_reviewed(make_service, flat_predictor) -> None:  # type: ignore[no-untyped-def]
    svc = make_service(predictor=flat_predictor)
    sig = svc.user("sig", "signer")
    sid = svc.new_sample(sig)
    svc.upload(sid, files_of(sample_images(3)), sig)
    svc.wait()
    cells = svc.cells(sid, sig)
    assert all(not c["identified"] and c["label"] is None for c in cells)  # ~1/3 < 0.5
    s = svc.client.get(f"/api/samples/{sid}", headers=sig).json()["summary"]
    assert s["blocking"]["unidentified"] == 3 and s["totals"]["model"] == 0
    r = svc.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "3 unidentified" in r.json()["detail"]
    ids = [c["id"] for c in cells]
    # an unidentified cell has no call to confirm, one by one or in bulk: a class must be chosen
    for url, body in (
        (f"/api/samples/{sid}/cells/{ids[0]}", {"label": None}),
        (f"/api/samples/{sid}/cells/reclassify", {"cell_ids": ids, "label": None}),
    ):
        r = svc.client.request("PATCH" if "reclassify" not in url else "POST", url, json=body,
                               headers=sig)  # fmt: skip
        assert r.status_code == 422, r.text
        assert f"cell {ids[0]} (" in r.json()["detail"]
        assert "is unidentified: the model's call" in r.json()["detail"]
        assert "below the 50% threshold; choose a class for it" in r.json()["detail"]
    assert all(c["reviewed_label"] is None for c in svc.cells(sid, sig))  # nothing half-done
    svc.login("sig")
    page = svc.client.get(f"/samples/{sid}").text
    unidentified = page[page.index('data-group="unidentified"') :].split("</section>")[0]
    assert "select-group" in unidentified and "confirm-group" not in unidentified
    panel = svc.client.get(f"/samples/{sid}/cells/{ids[0]}/panel").text
    assert 'data-label="BLA"' in panel and "cls confirm" not in panel  # classes, no "Confirm"
    svc.client.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": ids[:2], "label": "BLA"},
        headers=sig,
    )
    r = svc.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert (
        r.status_code == 409
        and "1 of 3 cells is not reviewed yet (1 unidentified)" in r.json()["detail"]
    )
    assert "Confirm BLA" in svc.client.get(f"/samples/{sid}/cells/{ids[0]}/panel").text
    svc.client.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": ids[2:], "label": "LYT"},
        headers=sig,
    )
    assert svc.client.post(f"/api/samples/{sid}/signoff", headers=sig).status_code == 200


def test_hac_flag_evidence_and_gradcam(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev)
    service.upload(sid, files_of(sample_images(3)), rev)
    service.wait()
    flag = c.get(f"/api/samples/{sid}", headers=rev).json()["summary"]["flag"]
    assert flag["status"] == "flagged" and flag["basis"] == "model"
    assert "3 of 3 identified cells (100.0%) are called HAC" in flag["message"]
    assert len(flag["evidence"]) == 3
    probs = [e["probability"] for e in flag["evidence"]]
    assert probs == sorted(probs, reverse=True)
    cam = c.get(f"/samples/{sid}/cells/{flag['evidence'][0]['id']}/gradcam.png", headers=rev)
    assert cam.status_code == 200 and cam.content.startswith(b"\x89PNG")
    # Reviewing the HAC cells away clears the flag (now based on the reviewed count).
    ids = [e["id"] for e in flag["evidence"]]
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify", json={"cell_ids": ids, "label": "LYT"}, headers=rev
    )
    assert r.json()["summary"]["flag"]["status"] == "not flagged"
    assert r.json()["summary"]["flag"]["basis"] == "reviewed"


def test_images_are_content_addressed_and_never_duplicated(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    a, b = service.new_sample(rev, "A-1"), service.new_sample(rev, "B-1")
    path = sample_images(1)[0]
    data = path.read_bytes()
    first = service.upload(a, files_of([path]), rev)
    again = service.upload(a, [("files", ("copy.jpg", data, "image/jpeg"))], rev)
    assert again["accepted"] == []
    assert again["rejected"][0]["name"] == "copy.jpg"
    assert "already in this sample as " + path.name in again["rejected"][0]["reason"]
    other = service.upload(b, files_of([path]), rev)
    assert len(first["accepted"]) == len(other["accepted"]) == 1
    sha = hashlib.sha256(data).hexdigest()
    stored = list((service.app.state.settings.data_dir / "images").rglob("*.jpg"))
    assert [p.name for p in stored] == [f"{sha}.jpg"]  # one file for both samples
    assert stored[0].read_bytes() == data
    assert {x["sha256"] for x in service.cells(a, rev)} == {sha}
    img = c.get(f"/samples/{a}/cells/{first['accepted'][0]['id']}/image", headers=rev)
    assert img.status_code == 200 and img.content == data


def test_sample_crud_and_validation(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev, "BM-7")
    assert c.post("/api/samples", json={"code": "BM-7"}, headers=rev).status_code == 409
    r = c.post("/api/samples", json={"code": "John Smith"}, headers=rev)
    assert r.status_code == 422  # a pseudonymous id: no spaces, no names
    r = c.post("/api/samples", json={"code": "X", "age_band": "old"}, headers=rev)
    assert r.status_code == 422
    r = c.patch(
        f"/api/samples/{sid}", json={"notes": "new notes", "age_band": "18-39"}, headers=rev
    )
    assert r.status_code == 200 and r.json()["notes"] == "new notes"
    listed = c.get("/api/samples", headers=rev).json()
    assert [(s["code"], s["cells"]) for s in listed] == [("BM-7", 0)]
    update = c.get(f"/api/samples/{sid}/audit", headers=rev).json()[-1]
    assert update["action"] == "sample.update"
    assert update["old"] == {"age_band": "unknown", "notes": ""}
    assert update["new"] == {"age_band": "18-39", "notes": "new notes"}
    assert c.delete(f"/api/samples/{sid}", headers=rev).status_code == 204
    assert c.get(f"/api/samples/{sid}", headers=rev).status_code == 404
    assert c.get("/api/samples", headers=rev).json() == []
    with service.app.state.db.read() as s:  # deleted = hidden; its audit trail is kept
        kept = s.scalars(
            select(AuditEvent.action).where(AuditEvent.sample_id == sid).order_by(AuditEvent.id)
        ).all()
    assert kept == ["sample.create", "sample.update", "sample.delete"]


def test_audit_rows_cannot_be_changed_or_deleted(service: Service) -> None:
    service.new_sample(service.auth("rev"))
    db = service.app.state.db
    with db.session() as s:
        event = s.scalars(select(AuditEvent)).first()
        event.action = "tampered"
        with pytest.raises(PermissionError, match="append-only"):
            s.commit()
        s.rollback()
        s.delete(s.scalars(select(AuditEvent)).first())
        with pytest.raises(PermissionError, match="append-only"):
            s.commit()
    with db.read() as s:
        assert s.scalars(select(AuditEvent.action)).all() == ["sample.create"]


def test_predict_is_stateless_and_uses_the_predictor(service: Service) -> None:
    path = sample_images(1, "LYT")[0]
    r = service.client.post(
        "/api/predict",
        files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        headers=service.auth("rev"),
    )
    assert r.status_code == 200
    body = r.json()
    direct = service.app.state.model.predictor.predict_proba([path])[0]
    assert list(body["probabilities"]) == CLASSES
    assert list(body["probabilities"].values()) == pytest.approx(direct.tolist(), abs=1e-5)
    assert body["predicted"] == "HAC" and [t["class"] for t in body["top3"]][0] == "HAC"
    assert service.client.get("/api/samples", headers=service.auth("rev")).json() == []
    bad = service.client.post(
        "/api/predict",
        files={"file": ("x.jpg", b"not an image", "image/jpeg")},
        headers=service.auth("rev"),
    )
    assert bad.status_code == 422 and bad.json()["detail"].startswith("x.jpg: ")

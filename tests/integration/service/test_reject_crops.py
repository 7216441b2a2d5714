"""An uploaded single-cell crop that is no cell to count (debris, a smudge, a red cell, an
unusable image) is rejected as "not a countable cell", exactly as a field's detection is
rejected as "not a white cell": it leaves every count, the sign-off check, the report and its
CSV; audited with its reason; restorable; refused on a signed sample; through the API and the
gallery's forms alike. Crops only (no detector), on the tiny HAC-calling model.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from marrowscope.inference.predictor import Predictor
from marrowscope.service.review import REPORT_COLUMNS

from .conftest import Service, files_of, flashed, sample_images

pytestmark = pytest.mark.integration

CROP_REASON = "not a countable cell"


def _crops(service: Service, n: int, code: str = "CROPS-1") -> tuple[int, list[int]]:
    rev = service.auth("rev")
    sid = service.new_sample(rev, code)
    service.upload(sid, files_of(sample_images(n)), rev)
    service.wait()
    ids = sorted(c["id"] for c in service.cells(sid, rev))
    assert len(ids) == n
    return sid, ids


def _summary(service: Service, sid: int) -> dict[str, Any]:
    r = service.client.get(f"/api/samples/{sid}", headers=service.auth("rev"))
    assert r.status_code == 200, r.text
    return r.json()["summary"]


def _events(service: Service, sid: int, action: str) -> list[dict[str, Any]]:
    r = service.client.get(f"/api/samples/{sid}/audit", headers=service.auth("rev"))
    assert r.status_code == 200, r.text
    return [e for e in r.json() if e["action"] == action]


REJECTED_CELL = {
    "id", "name", "reason", "field_id", "field", "box", "predicted", "confidence", "rejected_by",
    "rejected_at",
}  # fmt: skip


def test_a_crop_is_rejected_and_restored_through_the_api_and_leaves_count_and_report(
    service: Service,
) -> None:
    c, rev, sig = service.client, service.auth("rev"), service.auth("sig")
    sid, (bad, *others) = _crops(service, 3)
    bad_name = next(x["name"] for x in service.cells(sid, rev) if x["id"] == bad)
    assert _summary(service, sid)["totals"]["model"] == 3

    r = c.post(f"/api/samples/{sid}/cells/{bad}/reject", headers=rev)
    assert r.status_code == 200, r.text
    cell = r.json()
    assert cell["rejected"] is True and cell["rejected_reason"] == CROP_REASON
    assert cell["field_id"] is None
    s = _summary(service, sid)
    assert s["progress"]["total"] == 2 and s["progress"]["rejected"] == 1
    assert s["totals"]["model"] == 2
    assert {d["class"]: d["model_count"] for d in s["differential"]}["HAC"] == 2
    listed = c.get("/api/samples", headers=rev).json()
    assert [(x["cells"], x["unreviewed"]) for x in listed if x["id"] == sid] == [(2, 2)]
    (event,) = _events(service, sid, "cell.reject")
    assert event["user"] == "rev" and event["cell_id"] == bad
    assert event["old"] == {"rejected": False, "label": None, "model": "HAC"}
    assert event["new"] == {"rejected": True, "reason": CROP_REASON}
    # rejecting it again changes nothing and writes no second audit row
    assert c.post(f"/api/samples/{sid}/cells/{bad}/reject", headers=rev).status_code == 200
    assert len(_events(service, sid, "cell.reject")) == 1

    # a rejected crop is labelled neither alone nor in bulk (confirm all / re-classify)
    r = c.patch(f"/api/samples/{sid}/cells/{bad}", json={"label": "LYT"}, headers=rev)
    assert r.status_code == 409
    assert f"rejected as {CROP_REASON}; restore it first" in r.json()["detail"]
    for label in (None, "LYT"):
        r = c.post(
            f"/api/samples/{sid}/cells/reclassify",
            json={"cell_ids": [bad, *others], "label": label},
            headers=rev,
        )
        assert r.status_code == 409 and "restore it first" in r.json()["detail"]
    assert all(x["reviewed_label"] is None for x in service.cells(sid, rev))

    # restored: it counts again (audited), then rejected again for the sign-off
    r = c.post(f"/api/samples/{sid}/cells/{bad}/restore", headers=rev)
    assert r.status_code == 200 and r.json()["rejected"] is False
    assert r.json()["rejected_reason"] is None
    s = _summary(service, sid)
    assert s["progress"]["total"] == 3 and s["progress"]["rejected"] == 0
    assert s["totals"]["model"] == 3
    (restored,) = _events(service, sid, "cell.restore")
    assert restored["cell_id"] == bad and restored["new"] == {"rejected": False}
    assert c.post(f"/api/samples/{sid}/cells/{bad}/reject", headers=rev).status_code == 200

    # sign-off: the rejected crop needs no review, the counted ones do
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "2 of 2 cells are not reviewed yet" in r.json()["detail"]
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": others, "label": None},
        headers=rev,
    )
    assert r.status_code == 200 and r.json()["changed"] == 2
    assert c.post(f"/api/samples/{sid}/signoff", headers=sig).status_code == 200
    (signed,) = _events(service, sid, "sample.signoff")
    assert signed["new"]["cells"] == 2 and signed["new"]["rejected"] == 1
    assert signed["new"]["rejected_cells"] == [bad]
    assert signed["new"]["counts"] == {"HAC": 2}

    # the report and its CSV count the two others only, and name the rejected crop: how many,
    # which file, why, the model's call, who rejected it (the same number as the sign-off's)
    report = c.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert report["cells"] == 2 and report["totals"] == {"model": 2, "reviewed": 2}
    assert report["rejected"] == signed["new"]["rejected"] == 1
    (named,) = report["rejected_cells"]
    assert set(named) == REJECTED_CELL
    assert named["rejected_at"] and named["confidence"] > 0.9
    assert {k: named[k] for k in REJECTED_CELL - {"rejected_at", "confidence"}} == {
        "id": bad, "name": bad_name, "reason": CROP_REASON, "field_id": None, "field": None,
        "box": None, "predicted": "HAC", "rejected_by": "rev",
    }  # fmt: skip
    text = c.get(f"/api/samples/{sid}/report", params={"format": "csv"}, headers=rev).text
    header = next(csv.reader(io.StringIO(text)))
    assert header == REPORT_COLUMNS and header[-2:] == ["rejected_count", "rejected_cells"]
    rows = {row["class"]: row for row in csv.DictReader(io.StringIO(text))}
    assert (rows["HAC"]["count"], rows["HAC"]["percent"]) == ("2", "100.00")
    assert rows["HAC"]["model_count"] == "2"
    assert sum(int(row["count"]) for row in rows.values()) == 2
    for row in rows.values():  # sample-wide, on every row, as fields_not_searched
        assert row["rejected_count"] == "1"
        assert json.loads(row["rejected_cells"]) == report["rejected_cells"]
    page = html.unescape(c.get(f"/samples/{sid}/report", headers=rev).text)
    assert (
        "2 reviewed (0 re-classified from the model's call); 1 rejected and not in the count"
        in (re.sub(r"<[^>]+>", "", page))
    )
    m = re.search(rf'<tr data-cell="{bad}">(.*?)</tr>', page, re.S)
    assert m, "the rejected crop is not listed in the report"
    row_text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", m.group(1)))
    for said in (bad_name, CROP_REASON, "uploaded crop", "rev"):
        assert said in row_text, (said, row_text)
    assert re.search(r"HAC (99|100)%", row_text), row_text  # the model's call

    # a signed sample refuses both, and nothing changes
    for cell_id, action in ((others[0], "reject"), (bad, "restore")):
        r = c.post(f"/api/samples/{sid}/cells/{cell_id}/{action}", headers=rev)
        assert r.status_code == 409 and "read-only" in r.json()["detail"]
    assert len(_events(service, sid, "cell.reject")) == 2
    assert len(_events(service, sid, "cell.restore")) == 1


def test_an_unidentified_crop_can_be_rejected_and_then_no_longer_blocks_the_sign_off(
    make_service: Callable[..., Service], flat_predictor: Predictor
) -> None:
    service = make_service(predictor=flat_predictor)
    rev, sig = service.user("rev", "reviewer"), service.user("sig", "signer")
    sid, (smudge, cell) = _crops(service, 2, "CROPS-2")
    assert not any(x["identified"] for x in service.cells(sid, rev))
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "(2 unidentified)" in r.json()["detail"]

    r = service.client.post(f"/api/samples/{sid}/cells/{smudge}/reject", headers=rev)
    assert r.status_code == 200 and r.json()["rejected_reason"] == CROP_REASON
    assert _summary(service, sid)["blocking"] == {
        "unreviewed": 1, "unidentified": 1, "pending": 0, "failed": 0,
    }  # fmt: skip
    r = service.client.patch(f"/api/samples/{sid}/cells/{cell}", json={"label": "LYT"}, headers=rev)
    assert r.status_code == 200, r.text
    assert service.client.post(f"/api/samples/{sid}/signoff", headers=sig).status_code == 200
    report = service.client.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert report["cells"] == 1
    assert {d["class"]: d["reviewed_count"] for d in report["differential"]}["LYT"] == 1


def test_a_sample_whose_every_cell_is_rejected_says_so_and_how_to_go_on(
    service: Service,
) -> None:
    """Not "has no cells yet": the cells are there, rejected; the sign-off box and the refused
    sign-off say the same sentence, and restoring one makes it a sample to review again."""
    c, rev, sig = service.client, service.auth("rev"), service.auth("sig")
    sid, ids = _crops(service, 2, "CROPS-ALL")
    for cell_id in ids:
        assert c.post(f"/api/samples/{sid}/cells/{cell_id}/reject", headers=rev).status_code == 200
    why = (
        "cannot sign off CROPS-ALL: all 2 of its cells are rejected (not counted), so there is "
        "nothing to count; restore a cell that should count, or upload more cells"
    )
    s = _summary(service, sid)
    assert s["can_sign"] is False and s["progress"]["rejected"] == 2
    assert s["signoff_message"] == f"C{why[1:]}."
    assert "no cells yet" not in s["signoff_message"]
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and r.json()["detail"] == why
    service.login("rev")
    assert f"C{why[1:]}." in html.unescape(c.get(f"/samples/{sid}").text)

    assert c.post(f"/api/samples/{sid}/cells/{ids[0]}/restore", headers=rev).status_code == 200
    r = c.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "1 of 1 cell is not reviewed yet" in r.json()["detail"]
    empty = service.new_sample(rev, "CROPS-NONE")  # no cell at all: the old sentence
    assert _summary(service, empty)["signoff_message"] == (
        "Sample CROPS-NONE has no cells yet; upload and review its cells first."
    )


def _group(page: str, key: str) -> str:
    """The gallery group ``key`` of the sample page."""
    m = re.search(rf'<section class="group[^"]*" data-group="{key}">(.*?)</section>', page, re.S)
    assert m, key
    return m.group(1)


def test_a_crop_is_rejected_and_restored_through_the_gallery_forms(service: Service) -> None:
    c, rev, sig = service.client, service.auth("rev"), service.auth("sig")
    sid, (bad, other) = _crops(service, 2, "CROPS-3")
    csrf = service.login("rev")
    back = f"/samples/{sid}"

    # a counted crop's panel offers the reject action, worded for a crop
    panel = c.get(f"/samples/{sid}/cells/{bad}/panel").text
    assert f'action="/samples/{sid}/cells/{bad}/reject"' in panel
    assert "Not a countable cell" in panel and "Not a white cell" not in panel

    r = c.post(f"{back}/cells/{bad}/reject", data={"csrf_token": csrf}, follow_redirects=False)
    page = flashed(service, r, back)
    assert f"cell {bad} rejected as {CROP_REASON}; it is not counted" in page
    assert "not a white cell" not in page
    rejected = _group(page, "rejected")
    assert f'data-id="{bad}"' in rejected and f'data-id="{other}"' not in rejected
    assert f"(rejected: {CROP_REASON})" in rejected
    assert f'name="cell_ids" value="{bad}"' not in page  # no checkbox: not in bulk actions
    assert f'data-id="{bad}"' not in _group(page, "HAC")
    assert _summary(service, sid)["totals"]["model"] == 1
    (event,) = _events(service, sid, "cell.reject")
    assert event["new"] == {"rejected": True, "reason": CROP_REASON}
    audit = html.unescape(c.get(f"/samples/{sid}/audit").text)
    assert "cell.reject" in audit and CROP_REASON in audit

    # the rejected crop's panel says why and offers only the restore action
    panel = html.unescape(c.get(f"/samples/{sid}/cells/{bad}/panel").text)
    assert f"rejected: {CROP_REASON}" in panel
    assert f'action="/samples/{sid}/cells/{bad}/restore"' in panel
    assert 'class="cls"' not in panel  # no class buttons until it is restored

    r = c.post(f"{back}/cells/{bad}/restore", data={"csrf_token": csrf}, follow_redirects=False)
    page = flashed(service, r, back)
    assert f"cell {bad} restored; it counts again" in page
    assert f'data-id="{bad}"' in _group(page, "HAC")
    assert _summary(service, sid)["totals"]["model"] == 2
    assert len(_events(service, sid, "cell.restore")) == 1

    # signed: the form is refused with a message on the page, and the panel offers no action
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": [bad, other], "label": None},
        headers=rev,
    )
    assert r.status_code == 200, r.text
    assert c.post(f"/api/samples/{sid}/signoff", headers=sig).status_code == 200
    r = c.post(f"{back}/cells/{bad}/reject", data={"csrf_token": csrf}, follow_redirects=False)
    assert "read-only" in flashed(service, r, back)
    assert not _events(service, sid, "cell.reject")[1:]
    panel = c.get(f"/samples/{sid}/cells/{bad}/panel").text
    assert "/reject" not in panel and "/restore" not in panel

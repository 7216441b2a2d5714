"""Whole fields of view in the review app: upload as fields, the detector's cells pre-classified
and linked to their field, reject a detection as "not a white cell" (it leaves the count,
audited, reversible), add a missed cell by clicking on the field, and bad fields.

Real field-dev fields shipped in ``tests/data/fields`` and the shipped ``wbc2`` detector (the default); the
classifier is the tiny HAC-calling bundle, so every classified cell is HAC at ~100%.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import cv2
import numpy as np
import pytest
from field_samples import BCCD, EMPTY, PBC
from PIL import Image

from marrowscope.utils.image import read_image

from .conftest import Service, files_of, sample_images

pytestmark = pytest.mark.integration


def _field_files(*paths: Any) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _png(name: str, image: Image.Image) -> tuple[str, tuple[str, bytes, str]]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ("files", (name, buf.getvalue(), "image/png"))


def _upload_fields(service: Service, sid: int, files: list[Any], headers: dict[str, str]) -> Any:
    r = service.client.post(f"/api/samples/{sid}/fields", files=files, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def _fields(service: Service, sid: int, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    r = service.client.get(f"/api/samples/{sid}/fields", headers=headers)
    assert r.status_code == 200, r.text
    return {f["name"]: f for f in r.json()}


def _summary(service: Service, sid: int, headers: dict[str, str]) -> dict[str, Any]:
    r = service.client.get(f"/api/samples/{sid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["summary"]


def _audit(service: Service, sid: int, headers: dict[str, str], action: str) -> list[Any]:
    r = service.client.get(f"/api/samples/{sid}/audit", headers=headers)
    assert r.status_code == 200, r.text
    return [e for e in r.json() if e["action"] == action]


def _sample_with_fields(service: Service) -> tuple[int, dict[str, dict[str, Any]]]:
    rev = service.auth("rev")
    sid = service.new_sample(rev, "FIELDS-1")
    result = _upload_fields(service, sid, _field_files(BCCD, PBC, EMPTY), rev)
    assert [a["name"] for a in result["accepted"]] == [BCCD.name, PBC.name, EMPTY.name]
    assert result["rejected"] == []
    service.wait()
    return sid, _fields(service, sid, rev)


def test_fields_are_searched_and_their_cells_classified_and_linked(service: Service) -> None:
    rev = service.auth("rev")
    sid, fields = _sample_with_fields(service)
    bccd, pbc, empty = fields[BCCD.name], fields[PBC.name], fields[EMPTY.name]
    for f in (bccd, pbc, empty):
        assert f["status"] == "done" and f["detector"] == "wbc2", f
        assert f["scale_source"] == "ruler" and 0.05 < f["um_per_px"] < 0.09
    assert (bccd["width"], bccd["height"]) == (640, 480)
    # each annotated field has one white cell near its centre; the empty one has none
    for f in (bccd, pbc):
        assert f["found"] == 1 and len(f["cells"]) == 1
        x0, y0, x1, y1 = f["cells"][0]["box"]
        assert x0 < f["width"] / 2 < x1 and y0 < f["height"] / 2 < y1
        assert f["cells"][0]["origin"] == "detected" and f["cells"][0]["score"] > 0.3
    assert empty["found"] == 0 and empty["cells"] == []
    assert "no white cell was found in this field: it adds 0 cells to the count" in empty["message"]

    # the detected cells are ordinary cells: classified by the app's model, linked to the field
    cells = service.cells(sid, rev)
    assert len(cells) == 2
    by_field = {c["field_id"]: c for c in cells}
    assert set(by_field) == {bccd["id"], pbc["id"]}
    for c in cells:
        assert c["status"] == "done" and c["predicted"] == "HAC" and c["identified"]
        assert c["origin"] == "detected" and c["rejected"] is False
        assert c["width"] == c["height"] == 250  # the classifier's crop side (Matek, assumed)
    assert by_field[bccd["id"]]["box"] == bccd["cells"][0]["box"]
    summary = _summary(service, sid, rev)
    assert summary["progress"]["fields"] == 3 and summary["progress"]["fields_pending"] == 0
    assert summary["totals"]["model"] == 2

    # audited: the upload and what the detector found in each field
    (upload,) = _audit(service, sid, rev, "fields.upload")
    assert upload["user"] == "rev" and upload["new"]["count"] == 3
    detected = {e["new"]["name"]: e for e in _audit(service, sid, rev, "field.detected")}
    assert detected[EMPTY.name]["new"]["cells"] == 0 and detected[BCCD.name]["new"]["cells"] == 1
    assert all(e["user"] == "detector" for e in detected.values())

    # the pages: the gallery links each cell to its field, the field page draws the boxes
    service.login("rev")
    page = service.client.get(f"/samples/{sid}").text
    cell = by_field[bccd["id"]]
    assert f'href="/samples/{sid}/fields/{bccd["id"]}#cell-{cell["id"]}"' in page
    assert "no white cell was found in this field" in page
    field_page = service.client.get(f"/samples/{sid}/fields/{bccd['id']}")
    assert field_page.status_code == 200
    assert len(re.findall(r'<rect id="box-\d+" class="box detected', field_page.text)) == 1
    image = service.client.get(f"/samples/{sid}/fields/{bccd['id']}/image")
    assert image.status_code == 200 and image.content == BCCD.read_bytes()


def test_reject_leaves_the_count_is_audited_and_can_be_taken_back(service: Service) -> None:
    rev, sig = service.auth("rev"), service.auth("sig")
    sid, fields = _sample_with_fields(service)
    service.upload(sid, files_of(sample_images(1)), rev)  # one ordinary crop too
    service.wait()
    cells = service.cells(sid, rev)
    assert _summary(service, sid, rev)["totals"]["model"] == 3
    bad = next(c for c in cells if c["field_id"] == fields[PBC.name]["id"])

    r = service.client.post(f"/api/samples/{sid}/cells/{bad['id']}/reject", headers=rev)
    assert r.status_code == 200, r.text
    assert r.json()["rejected"] is True and r.json()["rejected_reason"] == "not a white cell"
    s = _summary(service, sid, rev)
    assert s["totals"]["model"] == 2 and s["progress"]["rejected"] == 1
    assert s["progress"]["total"] == 2  # the rejected cell is not a cell of the count
    listed = service.client.get("/api/samples", headers=rev).json()
    assert [(x["cells"], x["unreviewed"]) for x in listed if x["id"] == sid] == [(2, 2)]
    assert next(c for c in _fields(service, sid, rev)[PBC.name]["cells"])["rejected"] is True
    (event,) = _audit(service, sid, rev, "cell.reject")
    assert event["user"] == "rev" and event["cell_id"] == bad["id"]
    assert event["old"] == {"rejected": False, "label": None, "model": "HAC"}
    assert event["new"] == {"rejected": True, "reason": "not a white cell"}

    # a rejected cell cannot be labelled (uploaded crops: see test_reject_crops.py)
    r = service.client.patch(
        f"/api/samples/{sid}/cells/{bad['id']}", json={"label": "LYT"}, headers=rev
    )
    assert r.status_code == 409 and "rejected as not a white cell" in r.json()["detail"]
    assert "restore it first" in r.json()["detail"]

    # taken back: it counts again (audited), then rejected again for the sign-off
    r = service.client.post(f"/api/samples/{sid}/cells/{bad['id']}/restore", headers=rev)
    assert r.status_code == 200 and r.json()["rejected"] is False
    assert _summary(service, sid, rev)["totals"]["model"] == 3
    assert len(_audit(service, sid, rev, "cell.restore")) == 1
    r = service.client.post(f"/api/samples/{sid}/cells/{bad['id']}/reject", headers=rev)
    assert r.status_code == 200

    # sign-off rules unchanged: every counted cell reviewed; the rejected one needs no review
    others = [c["id"] for c in cells if c["id"] != bad["id"]]
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409 and "2 of 2 cells are not reviewed yet" in r.json()["detail"]
    r = service.client.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": others, "label": None},
        headers=rev,
    )
    assert r.status_code == 200, r.text
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 200, r.text
    (signed,) = _audit(service, sid, rev, "sample.signoff")
    assert signed["new"]["cells"] == 2 and signed["new"]["rejected"] == 1
    assert signed["new"]["rejected_cells"] == [bad["id"]]
    report = service.client.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert report["cells"] == 2 and report["totals"]["reviewed"] == 2
    # ... and the report names the rejected detection: its field, its box, why, by whom
    assert report["rejected"] == 1
    (named,) = report["rejected_cells"]
    assert (named["id"], named["name"]) == (bad["id"], bad["name"])
    assert (named["field_id"], named["field"]) == (fields[PBC.name]["id"], PBC.name)
    assert named["box"] == pytest.approx(bad["box"], abs=0.05)
    assert (named["reason"], named["rejected_by"]) == ("not a white cell", "rev")
    page = service.client.get(f"/samples/{sid}/report", headers=rev).text
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "1 rejected and not in the count" in page
    box = ", ".join(str(round(v)) for v in named["box"])
    assert f"field {PBC.name}, box {box}" in page and "not a white cell" in page
    # a signed sample stays immutable
    for action in ("restore", "reject"):
        r = service.client.post(f"/api/samples/{sid}/cells/{others[0]}/{action}", headers=rev)
        assert r.status_code == 409
    r = service.client.post(
        f"/api/samples/{sid}/fields/{fields[EMPTY.name]['id']}/cells", json={"x": 5, "y": 5},
        headers=rev,
    )  # fmt: skip
    assert r.status_code == 409 and "read-only" in r.json()["detail"]


def test_a_missed_cell_is_added_by_a_click_and_classified(service: Service) -> None:
    rev = service.auth("rev")
    sid, fields = _sample_with_fields(service)
    empty = fields[EMPTY.name]
    url = f"/api/samples/{sid}/fields/{empty['id']}/cells"
    r = service.client.post(url, json={"x": 170, "y": 240}, headers=rev)
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["field_id"] == empty["id"] and added["origin"] == "added"
    assert added["status"] == "pending"
    x0, y0, x1, y1 = added["box"]
    assert x0 < 170 < x1 and y0 < 240 < y1
    # 14 um across at the field's measured scale
    assert x1 - x0 == pytest.approx(14 / empty["um_per_px"], rel=0.01)
    service.wait()
    cell = service.client.get(f"/api/samples/{sid}/cells/{added['id']}", headers=rev).json()
    assert cell["status"] == "done" and cell["predicted"] == "HAC"
    assert _summary(service, sid, rev)["totals"]["model"] == 3
    (event,) = _audit(service, sid, rev, "cell.add")
    assert event["user"] == "rev" and event["cell_id"] == added["id"]
    assert event["new"]["field"] == empty["id"] and event["new"]["point"] == [170, 240]
    field = _fields(service, sid, rev)[EMPTY.name]
    assert [c["origin"] for c in field["cells"]] == ["added"]
    assert "1 added by a reviewer" in field["message"]

    # the same point twice, a point outside the field, no body: refused with the reason
    r = service.client.post(url, json={"x": 170, "y": 240}, headers=rev)
    assert r.status_code == 409 and "in the sample already" in r.json()["detail"]
    # a click a few pixels off is another crop of the same cell: refused, naming the cell
    r = service.client.post(url, json={"x": 174, "y": 237}, headers=rev)
    assert r.status_code == 409, r.text
    assert f"there is a cell here already: cell {added['id']}" in r.json()["detail"]
    # so is a click on the centre of a cell the detector found
    bccd = fields[BCCD.name]
    (found,) = bccd["cells"]
    x0, y0, x1, y1 = found["box"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bccd_url = f"/api/samples/{sid}/fields/{bccd['id']}/cells"
    r = service.client.post(bccd_url, json={"x": cx + 2, "y": cy - 2}, headers=rev)
    assert r.status_code == 409, r.text
    assert f"cell {found['id']}" in r.json()["detail"]
    assert "click on the missed cell's own centre" in r.json()["detail"]
    # a click 45% of the box off its centre is a neighbour it may have merged: added
    beside = {"x": cx + (x1 - x0) * 0.45, "y": cy}
    r = service.client.post(bccd_url, json=beside, headers=rev)
    assert r.status_code == 201, r.text
    # a rejected box does not stand in the way of the cell it hid
    r = service.client.post(f"/api/samples/{sid}/cells/{found['id']}/reject", headers=rev)
    assert r.status_code == 200, r.text
    r = service.client.post(bccd_url, json={"x": cx - 2, "y": cy + 2}, headers=rev)
    assert r.status_code == 201, r.text
    r = service.client.post(url, json={"x": 5000, "y": 10}, headers=rev)
    assert r.status_code == 422 and "outside the 352x480 field" in r.json()["detail"]
    r = service.client.post(url, json={"x": 1}, headers=rev)
    assert r.status_code == 422

    # the page form (cookie login + CSRF) does the same, and the new box is drawn
    csrf = service.login("rev")
    page_url = f"/samples/{sid}/fields/{empty['id']}"
    r = service.client.post(
        f"{page_url}/add", data={"x": "60", "y": "100", "csrf_token": csrf}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == page_url
    page = service.client.get(page_url).text
    assert len(re.findall(r'class="box added', page)) == 2
    r = service.client.post(f"{page_url}/add", data={"x": "60", "y": "100"})
    assert r.status_code == 403  # no CSRF token


def test_bad_fields_are_refused_by_name_or_converted_and_lose_nothing(
    make_service: Any,
) -> None:
    service = make_service(max_field_pixels=200_000)
    rev = service.user("rev", "reviewer")
    sid = service.new_sample(rev, "FIELDS-BAD")
    rgb = read_image(PBC)  # 360 x 363 = 130,680 pixels: under the limit
    gray = Image.fromarray(rgb).convert("L")
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    deep = Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257)  # 16-bit grayscale PNG
    assert deep.mode == "I;16"
    ok, colour16 = cv2.imencode(
        ".png", rgb[:, ::-1, ::-1].astype(np.uint16) * 257
    )  # 16-bit RGB (mirrored)
    assert ok
    files = [
        *_field_files(BCCD),  # 640 x 480 = 307,200 pixels: over the limit
        _png("gray.png", gray),
        _png("rgba.png", rgba),
        _png("deep16.png", deep),
        ("files", ("colour16.png", colour16.tobytes(), "image/png")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
    ]
    result = _upload_fields(service, sid, files, rev)
    assert sorted(a["name"] for a in result["accepted"]) == [
        "colour16.png", "deep16.png", "gray.png", "rgba.png",
    ]  # fmt: skip
    refused = {r["name"]: r["reason"] for r in result["rejected"]}
    assert set(refused) == {BCCD.name, "notes.txt"}
    assert (
        "640x480 = 307,200 pixels, above the 200,000-pixel limit of a field" in refused[BCCD.name]
    )
    assert "cut it into smaller fields" in refused[BCCD.name]
    service.wait()
    fields = _fields(service, sid, rev)
    for name in ("gray.png", "rgba.png", "deep16.png", "colour16.png"):
        assert fields[name]["status"] == "done", fields[name]
    assert any("grayscale" in w for w in fields["gray.png"]["warnings"])
    assert any("grayscale" in w for w in fields["deep16.png"]["warnings"])
    assert fields["rgba.png"]["found"] == 1  # the colour field, alpha dropped
    assert fields["colour16.png"]["found"] == 1  # the colour field, scaled to 8 bits
    assert fields["colour16.png"]["warnings"] == []
    # the same field again is not added twice
    again = _upload_fields(service, sid, [_png("rgba-again.png", rgba)], rev)
    assert (
        again["accepted"] == []
        and "already in this sample as rgba.png" in (again["rejected"][0]["reason"])
    )


def test_pending_fields_block_sign_off_and_an_unusable_detector_is_said_on_the_field(
    make_service: Any, tmp_path: Any
) -> None:
    """While a field waits for the detector the sample cannot be signed off (the message says
    why); a field the detector cannot search gets the reason on its row and in the audit trail;
    the page's upload form (no script) takes fields too."""
    service = make_service(detector=str(tmp_path / "no-such-detector"))
    rev = service.user("rev", "reviewer")
    sig = service.user("sig", "signer")
    sid = service.new_sample(rev, "FIELDS-WAIT")
    service.upload(sid, files_of(sample_images(1)), rev)
    service.wait()
    cell = service.cells(sid, rev)[0]
    r = service.client.patch(f"/api/samples/{sid}/cells/{cell['id']}", json={}, headers=rev)
    assert r.status_code == 200, r.text

    worker = service.app.state.worker
    worker.stop()  # the field stays pending
    _upload_fields(service, sid, _field_files(PBC), rev)
    summary = _summary(service, sid, rev)
    assert summary["progress"]["fields_pending"] == 1 and summary["can_sign"] is False
    # a bulk re-classification answers with the same summary (the page shows it as is)
    r = service.client.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": [cell["id"]], "label": "LYT"},
        headers=rev,
    )
    assert r.status_code == 200, r.text
    bulk = r.json()["summary"]
    assert bulk["progress"]["fields_pending"] == 1 and bulk["can_sign"] is False
    assert "1 field(s) still being searched" in bulk["signoff_message"]
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 409
    assert "1 field(s) still being searched for white cells" in r.json()["detail"]
    field = next(iter(_fields(service, sid, rev).values()))
    r = service.client.post(
        f"/api/samples/{sid}/fields/{field['id']}/cells", json={"x": 10, "y": 10}, headers=rev
    )
    assert r.status_code == 409 and "still being searched" in r.json()["detail"]

    assert worker.process_field() is True  # what the worker does next: the detector fails
    field = _fields(service, sid, rev)[PBC.name]
    assert field["status"] == "error" and "no-such-detector" in field["error"]
    assert field["message"].startswith("the field could not be searched: ")
    (event,) = _audit(service, sid, rev, "field.error")
    assert event["user"] == "detector" and event["new"]["field"] == field["id"]
    assert "upload the field again to retry" in field["message"]
    # uploading it again puts it back in the detector's queue (audited with the old error) ...
    result = _upload_fields(service, sid, _field_files(PBC), rev)
    assert [a["id"] for a in result["accepted"]] == [field["id"]] and not result["rejected"]
    again = _fields(service, sid, rev)[PBC.name]
    assert again["status"] == "pending" and again["error"] is None
    (event,) = _audit(service, sid, rev, "field.retry")
    assert event["old"] == [{"field": field["id"], "name": PBC.name, "error": field["error"]}]
    assert _summary(service, sid, rev)["can_sign"] is False  # searched again before sign-off
    # ... and a third upload while it waits is a duplicate, not a second retry
    result = _upload_fields(service, sid, _field_files(PBC), rev)
    assert result["accepted"] == [] and "already in this sample" in result["rejected"][0]["message"]
    assert worker.process_field() is True  # the detector still cannot load: an error again
    failed = _fields(service, sid, rev)[PBC.name]
    assert failed["status"] == "error"
    # a failed field does not block the sign-off, but it is said before, at and after it
    summary = _summary(service, sid, rev)
    assert summary["can_sign"] is True and summary["progress"]["fields_failed"] == 1
    assert summary["signoff_message"].startswith("Every cell is reviewed")
    said = summary["signoff_message"]
    assert f"1 field could not be searched for white cells ({PBC.name})" in said
    assert "its cells are not in the count" in said
    service.login("rev")
    assert "its cells are not in the count" in service.client.get(f"/samples/{sid}").text
    r = service.client.post(f"/api/samples/{sid}/signoff", headers=sig)
    assert r.status_code == 200, r.text
    (signed,) = _audit(service, sid, rev, "sample.signoff")
    left_out = [{"id": failed["id"], "name": PBC.name, "error": failed["error"]}]
    assert signed["new"]["fields_not_searched"] == left_out
    report = service.client.get(f"/api/samples/{sid}/report", headers=rev).json()
    assert report["fields"] == 1 and report["fields_not_searched"] == left_out
    html = service.client.get(f"/samples/{sid}/report").text
    assert "1 could not be searched for white cells" in html and PBC.name in html
    csv_text = service.client.get(f"/samples/{sid}/report.csv").text
    header, first = list(csv.reader(io.StringIO(csv_text)))[:2]
    at = header.index("fields_not_searched")
    assert json.loads(first[at]) == [PBC.name]
    assert first[header.index("rejected_count")] == "0"

    # the page form without a script: kind=fields goes to the detector's queue
    other = service.new_sample(rev, "FIELDS-FORM")
    csrf = service.login("rev")
    r = service.client.post(
        f"/samples/{other}/upload",
        data={"kind": "fields", "csrf_token": csrf},
        files=_field_files(EMPTY),
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert [f["status"] for f in _fields(service, other, rev).values()] == ["pending"]
    assert service.cells(other, rev) == []
    page = service.client.get(f"/samples/{other}").text
    assert "1 field(s) added; their white cells are found and classified" in page


def test_a_classifier_without_a_usable_crop_scale_fails_the_field_not_the_worker(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crop scale that cannot be worked out (e.g. a bad ``crop`` entry in the bundle's
    metadata) is said on the field; the worker does not raise, so it does not pick the same
    field again and again while the uploaded cells wait."""
    rev = service.auth("rev")
    sid = service.new_sample(rev, "FIELDS-SPEC")
    worker = service.app.state.worker
    worker.stop()
    _upload_fields(service, sid, _field_files(PBC), rev)

    def bad_spec() -> Any:
        raise ValueError("crop side_px 'x' in metadata.json is not a number")

    monkeypatch.setattr(worker, "crop_spec", bad_spec)
    assert worker.process_field() is True
    field = _fields(service, sid, rev)[PBC.name]
    assert field["status"] == "error" and "side_px 'x'" in field["error"]
    assert worker.process_field() is False  # nothing pending: cells are classified next


def test_an_image_store_that_cannot_write_fails_the_field_not_the_worker(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crops of the cells found are stored inside the step that can fail: a full or
    read-only store is said on the field, and the worker moves on to the cells."""
    rev = service.auth("rev")
    sid = service.new_sample(rev, "FIELDS-DISK")
    worker = service.app.state.worker
    worker.stop()
    _upload_fields(service, sid, _field_files(PBC), rev)

    def full(data: bytes, ext: str) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker.store, "put", full)
    assert worker.process_field() is True
    field = _fields(service, sid, rev)[PBC.name]
    assert field["status"] == "error"
    assert "the crops of the cells found could not be stored" in field["error"]
    assert "No space left on device" in field["error"]
    assert worker.process_field() is False


def test_the_work_of_a_deleted_sample_is_not_done(service: Service) -> None:
    """Fields and cells of a deleted sample are not searched or classified (they can no
    longer be reviewed); a live sample's work goes ahead."""
    rev = service.auth("rev")
    gone = service.new_sample(rev, "FIELDS-GONE")
    live = service.new_sample(rev, "FIELDS-LIVE")
    worker = service.app.state.worker
    worker.stop()
    _upload_fields(service, gone, _field_files(PBC), rev)
    service.upload(gone, files_of(sample_images(1)), rev)
    r = service.client.delete(f"/api/samples/{gone}", headers=rev)
    assert r.status_code in (200, 204), r.text
    assert worker.process_field() is False and worker.process_batch() is False
    service.upload(live, files_of(sample_images(1)), rev)
    assert worker.process_batch() is True
    assert [c["status"] for c in service.cells(live, rev)] == ["done"]

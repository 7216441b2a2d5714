"""The HTML forms and the JSON API judge the same fields with the same pydantic models
(:mod:`marrowscope.service.schemas`): what the API refuses with a 422, the form refuses with a
message on the page (a redirect, never a server error), and nothing is changed."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from sqlalchemy import select

from marrowscope.service.models import AuditEvent, Sample

from .conftest import Service, files_of, flashed, sample_images

pytestmark = pytest.mark.integration

HUGE = "1180591620717411303424"  # 2**70: no database integer holds it
CONTROL = "splenomegaly\x1b[31m red\x07"  # ESC and BEL


def _api_refusal(r: Any) -> str:
    """The API's 422 message (the first error), as the form shows it."""
    assert r.status_code == 422, r.text
    return str(r.json()["detail"][0]["msg"]).removeprefix("Value error, ")


def _audit(service: Service) -> list[str]:
    with service.app.state.db.read() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_huge_cell_id_in_the_form_is_refused_like_the_api(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev, "G-1")
    service.upload(sid, files_of(sample_images(1)), rev)
    service.wait()
    r = c.post(
        f"/api/samples/{sid}/cells/reclassify",
        json={"cell_ids": [int(HUGE)], "label": "LYT"},
        headers=rev,
    )
    api = _api_refusal(r)
    assert "2147483647" in api
    before = _audit(service)
    csrf = service.login("rev")
    r = c.post(
        f"/samples/{sid}/reclassify",
        data={"csrf_token": csrf, "cell_ids": HUGE, "label": "LYT"},
        follow_redirects=False,
    )
    page = flashed(service, r, f"/samples/{sid}")
    assert api in page and "cell ids" in page
    # a cell id that is not a number at all, or none: a message too, never an error page
    r = c.post(
        f"/samples/{sid}/reclassify",
        data={"csrf_token": csrf, "cell_ids": "12abc", "label": "LYT"},
        follow_redirects=False,
    )
    assert "valid integer" in flashed(service, r, f"/samples/{sid}")
    r = c.post(
        f"/samples/{sid}/reclassify",
        data={"csrf_token": csrf, "label": "LYT"},
        follow_redirects=False,
    )
    assert "at least 1 item" in flashed(service, r, f"/samples/{sid}")
    assert _audit(service)[len(before) :] == ["login"]  # nothing was re-classified
    # and a good form post still works
    cell = service.cells(sid, rev)[0]["id"]
    r = c.post(
        f"/samples/{sid}/reclassify",
        data={"csrf_token": csrf, "cell_ids": str(cell), "label": "LYT"},
        follow_redirects=False,
    )
    assert "1 cell(s) re-classified" in flashed(service, r, f"/samples/{sid}")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("collected_on", "0001-01-01", "1900-01-01"),
        ("collected_on", "3000-01-01", "2999-12-31"),
        ("collected_on", "yesterday", "valid date"),
        ("notes", CONTROL, "control characters"),
        ("notes", "x" * 10_001, "at most 10000"),
        ("code", "John Smith", "pattern"),
        ("age_band", "old", "unknown"),
        ("referral_question", "curiosity", "cytopenia"),
    ],
)
def test_new_sample_form_refuses_what_the_api_refuses(
    service: Service, field: str, value: str, expected: str
) -> None:
    c, rev = service.client, service.auth("rev")
    body = {"code": "H-1", field: value}
    api = _api_refusal(c.post("/api/samples", json=body, headers=rev))
    assert expected in api
    csrf = service.login("rev")
    r = c.post("/samples", data={"csrf_token": csrf, **body}, follow_redirects=False)
    page = flashed(service, r, "/")
    assert api in page and field.replace("_", " ") in page
    with service.app.state.db.read() as s:
        assert s.scalars(select(Sample)).all() == []  # nothing was created


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("collected_on", "0001-01-01", "1900-01-01"),
        ("notes", CONTROL, "control characters"),
        ("notes", "tab\tand\nnew line\r\nare fine\x00", "control characters"),
        ("age_band", "old", "unknown"),
    ],
)
def test_edit_sample_form_refuses_what_the_api_refuses(
    service: Service, field: str, value: str, expected: str
) -> None:
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev, "H-2", notes="kept", collected_on="2025-01-02")
    api = _api_refusal(c.patch(f"/api/samples/{sid}", json={field: value}, headers=rev))
    assert expected in api
    csrf = service.login("rev")
    form = {"collected_on": "2025-01-02", "age_band": "unknown", "notes": "kept", field: value}
    r = c.post(f"/samples/{sid}/edit", data={"csrf_token": csrf, **form}, follow_redirects=False)
    page = flashed(service, r, f"/samples/{sid}")
    assert api in page and field.replace("_", " ") in page
    after = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (after["notes"], after["collected_on"], after["age_band"]) == (
        "kept",
        "2025-01-02",
        "unknown",
    )


def test_forms_still_accept_good_values(service: Service) -> None:
    c, rev = service.client, service.auth("rev")
    csrf = service.login("rev")
    r = c.post(
        "/samples",
        data={
            "csrf_token": csrf, "code": " BM-9 ", "collected_on": "", "age_band": "60-79",
            "referral_question": "", "notes": "tab\there\r\nnext line",
        },
        follow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303 and r.headers["location"].startswith("/samples/")
    sid = int(r.headers["location"].rsplit("/", 1)[1])
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["code"], one["collected_on"], one["age_band"], one["referral_question"]) == (
        "BM-9",
        None,
        "60-79",
        None,
    )
    assert one["notes"] == "tab\there\r\nnext line"
    r = c.post(
        f"/samples/{sid}/edit",
        data={
            "csrf_token": csrf, "collected_on": "2025-03-01", "age_band": "80+",
            "referral_question": "cytopenia", "notes": "changed",
        },
        follow_redirects=False,
    )  # fmt: skip
    assert "sample details saved" in flashed(service, r, f"/samples/{sid}")
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["collected_on"], one["age_band"], one["referral_question"], one["notes"]) == (
        "2025-03-01",
        "80+",
        "cytopenia",
        "changed",
    )
    # an empty referral question in the edit form clears it; an empty date leaves it alone
    r = c.post(
        f"/samples/{sid}/edit",
        data={
            "csrf_token": csrf, "collected_on": "", "age_band": "80+",
            "referral_question": "", "notes": "changed",
        },
        follow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["collected_on"], one["referral_question"]) == ("2025-03-01", None)


def test_the_edit_form_saves_only_what_was_changed_and_never_over_a_colleagues_change(
    service: Service,
) -> None:
    """The edit form carries the details it was rendered with: only the fields the editor
    changed are saved (an emptied date is emptied), and a field someone else changed since the
    page was loaded is not overwritten: nothing is saved and the editor is told to reload. The
    API empties the date and the referral question with ``null``."""
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(
        rev, "H-3", notes="first", collected_on="2025-01-02", referral_question="cytopenia"
    )
    csrf = service.login("rev")
    page = c.get(f"/samples/{sid}").text
    was = html.unescape(re.search(r'name="was" value="([^"]*)"', page).group(1))  # type: ignore[union-attr]
    assert json.loads(was)["notes"] == "first"
    form = {
        "csrf_token": csrf, "was": was, "collected_on": "", "age_band": "unknown",
        "referral_question": "cytopenia", "notes": "first",
    }  # fmt: skip
    # a colleague changes the notes meanwhile (through the API)
    r = c.patch(f"/api/samples/{sid}", json={"notes": "colleague"}, headers=rev)
    assert r.status_code == 200, r.text
    # the editor only emptied the date: saved, and the colleague's notes stay
    r = c.post(f"/samples/{sid}/edit", data=form, follow_redirects=False)
    assert "sample details saved" in flashed(service, r, f"/samples/{sid}")
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["collected_on"], one["notes"]) == (None, "colleague")
    # the editor, on the stale page, now changes the notes too: refused, nothing saved
    r = c.post(
        f"/samples/{sid}/edit",
        data={**form, "notes": "mine", "age_band": "80+"},
        follow_redirects=False,
    )
    page = flashed(service, r, f"/samples/{sid}")
    assert "notes changed since you opened the page" in page and "reload the page" in page
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["notes"], one["age_band"]) == ("colleague", "unknown")
    # the API: null empties the referral question and the date, and cannot empty the id
    r = c.patch(
        f"/api/samples/{sid}",
        json={"referral_question": None, "collected_on": None},
        headers=rev,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["referral_question"], r.json()["collected_on"]) == (None, None)
    r = c.patch(f"/api/samples/{sid}", json={"code": None}, headers=rev)
    assert r.status_code == 422 and "code cannot be emptied" in r.json()["detail"]


def test_the_edit_form_reads_browser_line_breaks_and_a_repeated_save_as_no_change(
    service: Service,
) -> None:
    """Notes written with ``\n`` come back from a browser's textarea with ``\r\n``: that is
    not a change (only the date is saved and audited); saving the same change twice, or a
    change a colleague made identically meanwhile, is no conflict."""
    c, rev = service.client, service.auth("rev")
    sid = service.new_sample(rev, "H-4", notes="line one\nline two", collected_on="2025-01-02")
    csrf = service.login("rev")
    page = c.get(f"/samples/{sid}").text
    was = html.unescape(re.search(r'name="was" value="([^"]*)"', page).group(1))  # type: ignore[union-attr]
    form = {
        "csrf_token": csrf, "was": was, "collected_on": "2025-02-03", "age_band": "unknown",
        "referral_question": "", "notes": "line one\r\nline two",
    }  # fmt: skip
    for _ in range(2):  # a double click on Save
        r = c.post(f"/samples/{sid}/edit", data=form, follow_redirects=False)
        assert "sample details saved" in flashed(service, r, f"/samples/{sid}")
    one = c.get(f"/api/samples/{sid}", headers=rev).json()
    assert (one["collected_on"], one["notes"]) == ("2025-02-03", "line one\nline two")
    with service.app.state.db.read() as s:
        updates = s.scalars(
            select(AuditEvent).where(
                AuditEvent.sample_id == sid, AuditEvent.action == "sample.update"
            )
        ).all()
    assert [e.new_value for e in updates] == [{"collected_on": "2025-02-03"}]

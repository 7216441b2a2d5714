"""The download header and the report CSV shared by the API and the pages."""

from __future__ import annotations

import csv
import io
import json

import pytest

from marrowscope.service.review import REPORT_COLUMNS, report_csv
from marrowscope.service.web import FlashStore, attachment, report_download


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("BM-2025-0001-report.csv", 'attachment; filename="BM-2025-0001-report.csv"'),
        ("BM 7, left.csv", 'attachment; filename="BM 7, left.csv"'),  # a quoted-string holds both
        (
            'BM "7".csv',
            r"""attachment; filename="BM \"7\".csv"; filename*=UTF-8''BM%20%227%22.csv""",
        ),
        ("a\\b.csv", r"""attachment; filename="a\\b.csv"; filename*=UTF-8''a%5Cb.csv"""),
        (
            "Zürich-€.csv",
            "attachment; filename=\"Z_rich-_.csv\"; filename*=UTF-8''Z%C3%BCrich-%E2%82%AC.csv",
        ),
        ("100%.csv", "attachment; filename=\"100_.csv\"; filename*=UTF-8''100%25.csv"),
        (
            "x\r\nSet-Cookie: a=b.csv",
            'attachment; filename="x__Set-Cookie: a=b.csv"; '
            "filename*=UTF-8''x%0D%0ASet-Cookie%3A%20a%3Db.csv",
        ),
    ],
)
def test_attachment_header_follows_rfc_6266(name: str, header: str) -> None:
    """Plain names stay a plain quoted ``filename``; anything a browser could misread gets an
    ASCII fallback plus the exact name in ``filename*`` (UTF-8, percent-encoded)."""
    value = attachment(name)
    assert value == header
    assert value.isascii() and "\r" not in value and "\n" not in value


def _report(code: str) -> dict:  # type: ignore[type-arg]
    """The smallest report :func:`review.report_csv` reads."""
    return {
        "sample": {
            "code": code,
            "collected_on": "2025-03-01",
            "age_band": "60-79",
            "referral_question": None,
        },
        "model": {"name": "m", "version": "m:abc"},
        "flag": {"status": "flagged", "message": 'HAC, "high"'},
        "reviewers": ["a", "b"],
        "signed_by": "sig",
        "signed_at": "2025-03-02T10:00:00+00:00",
        "differential": [
            {
                "class": "HAC",
                "reviewed_count": 3,
                "reviewed_percent": 75.0,
                "model_count": 4,
                "model_percent": 100.0,
            },
            {
                "class": "XYZ",
                "reviewed_count": 1,
                "reviewed_percent": 25.0,
                "model_count": 0,
                "model_percent": 0.0,
            },
        ],
    }


FIRST_COLUMNS = [
    "sample_id", "collected_on", "age_band", "referral_question", "class", "cell_type",
    "count", "percent", "model_count", "model_percent", "hac_flag", "hac_flag_message",
    "model", "model_version", "reviewers", "signed_by", "signed_at", "fields_not_searched",
]  # fmt: skip
"""The report CSV's columns before the rejected cells were added: they keep their order, so a
reader that takes the columns by position keeps working."""


def test_report_csv_has_one_row_per_class_with_the_sample_on_every_row() -> None:
    rows = list(csv.reader(io.StringIO(report_csv(_report("BM-1")))))
    assert rows[0] == REPORT_COLUMNS
    assert rows[0] == [*FIRST_COLUMNS, "rejected_count", "rejected_cells"]
    assert rows[1] == [
        "BM-1", "2025-03-01", "60-79", "", "HAC", "Hairy cell", "3", "75.00", "4", "100.00",
        "flagged", 'HAC, "high"', "m", "m:abc", "a;b", "sig", "2025-03-02T10:00:00+00:00",
        "", "0", "",
    ]  # fmt: skip
    assert rows[2][4:6] == ["XYZ", ""]  # a class without a cell-type name


def test_report_download_is_the_csv_named_after_the_sample() -> None:
    data = _report("BM-1")
    response = report_download(data)
    assert response.body.decode("utf-8") == report_csv(data)
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == attachment("BM-1-report.csv")


def test_flash_store_is_per_session_shown_once_and_bounded() -> None:
    now = [0.0]
    store = FlashStore(max_sessions=2, max_messages=3, max_chars=10, ttl=60, clock=lambda: now[0])
    for i in range(5):
        store.add("a", f"message number {i}", "error")
    store.add("b", "for b")
    assert store.pop("a") == [
        ["error", "message nu"], ["error", "message nu"], ["error", "message nu"],
        ["error", "... and 2 more message(s)"],
    ]  # fmt: skip
    assert store.pop("a") == []  # shown once
    store.add("c", "for c")
    store.add("d", "for d")  # a third session: the least recently used (b) is dropped
    assert store.pop("b") == []
    assert store.pop("c") == [["info", "for c"]]
    now[0] = 61  # not shown within the ttl: dropped
    assert store.pop("d") == []


def test_report_csv_names_the_fields_left_out_of_the_count() -> None:
    data = _report("BM-2")
    names = ["f1.jpg", '=HYPERLINK("http://x.example","y");2.jpg']  # a formula, a ';'
    data["fields_not_searched"] = [{"id": i, "name": n, "error": "x"} for i, n in enumerate(names)]
    rows = list(csv.reader(io.StringIO(report_csv(data))))
    at = REPORT_COLUMNS.index("fields_not_searched")
    assert all(json.loads(row[at]) == names and row[at].startswith("[") for row in rows[1:])


def test_report_csv_names_the_cells_rejected_from_the_count() -> None:
    data = _report("BM-3")
    rejected = [
        {"id": 4, "name": "=cmd|' /C calc'!A0.jpg", "reason": "not a countable cell",
         "field_id": None, "field": None, "box": None, "predicted": "BLA", "confidence": 0.97,
         "rejected_by": "rev", "rejected_at": "2025-03-02T09:00:00+00:00"},
        {"id": 9, "name": "f.jpg · cell 2", "reason": "not a white cell", "field_id": 1,
         "field": "f.jpg", "box": [10.0, 20.5, 90.0, 100.0], "predicted": None,
         "confidence": None, "rejected_by": None, "rejected_at": None},
    ]  # fmt: skip
    data["rejected"], data["rejected_cells"] = len(rejected), rejected
    rows = list(csv.DictReader(io.StringIO(report_csv(data))))
    assert len(rows) == 2
    for row in rows:  # sample-wide: the same on every class row
        assert row["rejected_count"] == "2"
        assert row["rejected_cells"].startswith("[")  # never read as a formula
        assert json.loads(row["rejected_cells"]) == rejected
        assert row["fields_not_searched"] == ""


def test_the_sign_off_box_says_what_blocks_and_which_fields_are_left_out() -> None:
    """The blocking reason and the fields left out are both said, as sentences; a signed
    sample says so (no "can be signed off")."""
    from datetime import UTC, datetime

    from marrowscope.service.models import Cell, Sample
    from marrowscope.service.review import signoff_message

    sample = Sample(code="S-1")
    unsure = Cell(id=7, status="done", predicted_label="BLA", confidence=0.3)
    left_out = [
        {"id": 3, "name": "f1.jpg", "error": "x"},
        {"id": 4, "name": "f2.jpg", "error": "y"},
    ]
    said = signoff_message(sample, [unsure], 0.5, not_searched=left_out)
    assert said.startswith("Cannot sign off S-1: 1 of 1 cell is not reviewed yet (1 unidentified)")
    assert "review every cell first. 2 fields could not be searched for white cells" in said
    assert "(f1.jpg, f2.jpg): their cells are not in the count" in said
    unsure.reviewed_label = "BLA"
    said = signoff_message(sample, [unsure], 0.5, not_searched=left_out[:1])
    assert said.startswith("Every cell is reviewed: the sample can be signed off. 1 field could")
    assert "(f1.jpg): its cells are not in the count" in said
    sample.signed_at = datetime.now(UTC)
    assert signoff_message(sample, [unsure], 0.5) == "sample S-1 is signed off."


def test_a_sample_whose_every_cell_is_rejected_is_not_said_to_have_no_cells() -> None:
    """Its cells are there, all rejected: the sentence says how many and what to do."""
    from datetime import UTC, datetime

    from marrowscope.service.models import Cell, Sample
    from marrowscope.service.review import blocking_message, signoff_message

    sample = Sample(code="S-2")
    now = datetime.now(UTC)
    smudge = Cell(id=1, status="done", predicted_label="BLA", confidence=0.9, rejected_at=now)
    assert signoff_message(sample, [smudge], 0.5) == (
        "Cannot sign off S-2: its only cell is rejected (not counted), so there is nothing to "
        "count; restore a cell that should count, or upload more cells."
    )
    debris = Cell(id=2, status="pending", rejected_at=now)
    why = blocking_message(sample, [smudge, debris], 0.5)
    assert why is not None and why.startswith("cannot sign off S-2: all 2 of its cells are")
    assert signoff_message(sample, [smudge, debris], 0.5) == f"C{why[1:]}."
    assert blocking_message(sample, [], 0.5) == (
        "sample S-2 has no cells yet; upload and review its cells first"
    )

"""The review summary's evidence: cells passed to the counting rule by their database id."""

from __future__ import annotations

import pytest

from marrowscope.service.models import CELL_DONE, Cell, Sample
from marrowscope.service.review import summary
from marrowscope.service.settings import Settings

pytestmark = pytest.mark.integration

CLASSES = ["BLA", "HAC", "LYT"]


def _cell(cid: int, name: str, p_hac: float, reviewed: str | None = None) -> Cell:
    probs = [1.0 - p_hac, p_hac, 0.0]
    label = CLASSES[max(range(3), key=probs.__getitem__)]
    return Cell(
        id=cid,
        sample_id=1,
        sha256=f"{cid:064d}",
        stored_path=f"ab/{cid}.png",
        original_name=name,
        width=8,
        height=8,
        status=CELL_DONE,
        predicted_label=label,
        confidence=max(probs),
        probabilities=probs,
        reviewed_label=reviewed,
    )


def test_evidence_names_ids_and_ties_come_from_the_cells() -> None:
    cells = [
        _cell(10, "b#2.png", 1.0),  # a '#' in the name is just part of the name
        _cell(9, "z.png", 1.0),  # the same HAC probability: the lower id first
        _cell(11, "a.png", 0.9),
        _cell(12, "top.png", 0.99, reviewed="LYT"),  # reviewed away: not evidence
        _cell(13, "blast.png", 0.1),
    ]
    sample = Sample(id=1, code="BM-1")
    s = summary(sample, cells, CLASSES, Settings(evidence=3))
    flag = s["flag"]
    assert flag["basis"] == "reviewed" and flag["status"] == "not flagged"  # 0 of 1 reviewed
    assert flag["model_status"] == "flagged"  # 4 of 5 model calls are HAC
    assert [(e["id"], e["name"]) for e in flag["evidence"]] == [
        (9, "z.png"),
        (10, "b#2.png"),
        (11, "a.png"),
    ]
    assert [e["probability"] for e in flag["evidence"]] == pytest.approx([1.0, 1.0, 0.9])
    assert all(type(e["id"]) is int for e in flag["evidence"])
    assert s["totals"] == {"model": 5, "reviewed": 1}
    assert summary(sample, cells, CLASSES, Settings(evidence=0))["flag"]["evidence"] == []

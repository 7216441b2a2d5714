"""tally(): the one counting rule shared by `marrowscope count` and the review app."""

from __future__ import annotations

import numpy as np
import pytest

from marrowscope.engine.count import (
    FLAGGED,
    NOT_AVAILABLE,
    NOT_FLAGGED,
    CellCall,
    CountError,
    select_evidence,
    tally,
)


def test_counts_percentages_and_flag() -> None:
    t = tally(["BLA", "HAC", "BLA", "LYT"], ["BLA", "HAC", "LYT", "MON"])
    assert t.counts == {"BLA": 2, "HAC": 1, "LYT": 1, "MON": 0} and t.total == 4
    assert t.percents["HAC"] == pytest.approx(25.0)
    assert t.flag.status == FLAGGED and t.flag.by_percent and not t.flag.by_count
    quiet = tally(["BLA"] * 99 + ["HAC"], ["BLA", "HAC"], hac_min_percent=2, hac_min_count=5)
    assert quiet.flag.status == NOT_FLAGGED
    assert tally([], ["BLA", "LYT"]).flag.status == NOT_AVAILABLE
    with pytest.raises(CountError, match="'XYZ' is not a class of the model"):
        tally(["XYZ"], ["BLA", "HAC"])


def test_select_evidence_best_hac_cells_first() -> None:
    classes = ["BLA", "HAC"]

    def call(rel: str, label: str, p_hac: float, identified: bool = True) -> CellCall:
        probs = np.array([1 - p_hac, p_hac], np.float32)
        return CellCall(rel, rel, label, float(probs.max()), identified, probs)

    cells = [call("a", "HAC", 0.7), call("b", "HAC", 0.9), call("c", "BLA", 0.95),
             call("d", "HAC", 0.99, identified=False), call("e", "HAC", 0.7)]  # fmt: skip
    assert [c.rel for c in select_evidence(cells, "HAC", classes, 2)] == ["b", "a"]
    assert select_evidence(cells, "HAC", classes, 0) == []

"""The counting rule (tally, the hairy-cell flag, evidence) over cells with any key; no torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from marrowscope.metrics.counting import (
    DEFAULT_HAC_MIN_COUNT,
    DEFAULT_HAC_MIN_PERCENT,
    FLAGGED,
    NOT_AVAILABLE,
    NOT_FLAGGED,
    Call,
    CountError,
    check_settings,
    select_evidence,
    tally,
)
from marrowscope.reports.count_files import CellCall

CLASSES = ["BLA", "HAC", "LYT"]


def _probs(p_hac: float) -> np.ndarray:
    return np.array([1.0 - p_hac, p_hac, 0.0], np.float32)


def test_counts_percentages_and_flag() -> None:
    t = tally(["BLA", "HAC", "BLA", "LYT"], ["BLA", "HAC", "LYT", "MON"])
    assert t.counts == {"BLA": 2, "HAC": 1, "LYT": 1, "MON": 0} and t.total == 4
    assert list(t.counts) == ["BLA", "HAC", "LYT", "MON"]  # model order, zeros included
    assert t.percents == pytest.approx({"BLA": 50.0, "HAC": 25.0, "LYT": 25.0, "MON": 0.0})
    assert t.flag.status == FLAGGED and t.flag.by_percent and not t.flag.by_count
    assert t.flag.count == 1 and t.flag.percent == pytest.approx(25.0)
    quiet = tally(["BLA"] * 99 + ["HAC"], ["BLA", "HAC"], hac_min_percent=2, hac_min_count=5)
    assert quiet.flag.status == NOT_FLAGGED and not quiet.flag.flagged
    assert "1 of 100 identified cells (1.0%) are called HAC: below both rules" in quiet.flag.message
    with pytest.raises(CountError, match="'XYZ' is not a class of the model"):
        tally(["XYZ"], ["BLA", "HAC"])


def test_flag_rules_at_their_boundaries() -> None:
    # 1 HAC in 50 cells is exactly 2 %: "at least" fires; 1 in 51 does not.
    assert tally(["HAC"] + ["BLA"] * 49, CLASSES).flag.by_percent
    assert tally(["HAC"] + ["BLA"] * 50, CLASSES).flag.status == NOT_FLAGGED
    five = tally(["HAC"] * 5 + ["BLA"] * 995, CLASSES)  # 0.5 %, but 5 cells
    assert five.flag.flagged and five.flag.by_count and not five.flag.by_percent
    assert "at least 5 HAC cells" in five.flag.message
    both = tally(["HAC"] * 6, CLASSES, hac_min_percent=50, hac_min_count=6)
    assert both.flag.by_percent and both.flag.by_count
    assert both.flag.min_percent == 50.0 and both.flag.min_count == 6
    empty = tally([], CLASSES)
    assert empty.total == 0 and empty.percents == {"BLA": 0.0, "HAC": 0.0, "LYT": 0.0}
    assert empty.flag.status == NOT_FLAGGED and empty.flag.percent == 0.0
    assert empty.flag.min_percent == DEFAULT_HAC_MIN_PERCENT
    assert empty.flag.min_count == DEFAULT_HAC_MIN_COUNT


def test_hac_class_is_found_case_insensitively_or_not_available() -> None:
    lower = tally(["hac"] * 5, ["bla", "hac"])
    assert lower.flag.hac_class == "hac" and lower.flag.flagged
    none = tally(["BLA"], ["BLA", "LYT"])
    assert none.flag.status == NOT_AVAILABLE and none.flag.hac_class is None
    assert none.flag.message.startswith("The model has no HAC class")
    # Two case-insensitive matches are ambiguous: no guess.
    assert tally([], ["Hac", "hAC"]).flag.status == NOT_AVAILABLE
    assert tally([], ["BLA", "HAIRY"], hac_class="hairy").flag.hac_class == "HAIRY"


def test_select_evidence_over_integer_ids() -> None:
    """Database ids as keys: ties break on the number (9 before 10), no path anywhere."""
    cells = [
        Call(10, "HAC", True, _probs(0.8)),
        Call(9, "HAC", True, _probs(0.8)),
        Call(3, "HAC", True, _probs(0.95)),
        Call(1, "BLA", True, _probs(0.99)),  # called BLA: not evidence
        Call(2, "HAC", False, _probs(0.99)),  # not identified: not evidence
        Call(100, "HAC", True, _probs(0.6)),
    ]
    chosen = select_evidence(cells, "HAC", CLASSES, 3)
    assert [c.key for c in chosen] == [3, 9, 10]  # as strings "10" would sort before "9"
    assert chosen[0] is cells[2]  # the caller's own records come back
    assert [c.key for c in select_evidence(cells, "HAC", CLASSES, 99)] == [3, 9, 10, 100]
    assert select_evidence(cells, "HAC", CLASSES, 0) == []
    assert select_evidence(cells, "HAC", CLASSES, -1) == []
    assert select_evidence([], "HAC", CLASSES, 5) == []


def test_select_evidence_over_any_record_with_a_key() -> None:
    """The rule reads key, predicted, identified and probs of whatever record it is given."""

    @dataclass(frozen=True)
    class Row:
        key: tuple[str, int]
        predicted: str
        identified: bool
        probs: np.ndarray
        note: str

    rows = [
        Row(("slide", 2), "HAC", True, _probs(0.7), "b"),
        Row(("slide", 1), "HAC", True, _probs(0.7), "a"),
        Row(("other", 5), "HAC", True, _probs(0.9), "c"),
    ]
    assert [r.note for r in select_evidence(rows, "HAC", CLASSES, 3)] == ["c", "a", "b"]


def test_select_evidence_on_file_cells_breaks_ties_on_the_relative_path() -> None:
    def call(rel: str, label: str, p_hac: float, identified: bool = True) -> CellCall:
        probs = _probs(p_hac)
        return CellCall(f"/data/{rel}", rel, label, float(probs.max()), identified, probs)

    cells = [call("a", "HAC", 0.7), call("b", "HAC", 0.9), call("c", "BLA", 0.95),
             call("d", "HAC", 0.99, identified=False), call("e", "HAC", 0.7)]  # fmt: skip
    assert cells[0].key == "a"
    assert [c.rel for c in select_evidence(cells, "HAC", CLASSES, 2)] == ["b", "a"]
    assert [c.rel for c in select_evidence(cells, "HAC", CLASSES, 8)] == ["b", "a", "e"]


def test_check_settings_names_the_setting_and_its_default() -> None:
    check_settings(0.0, 100.0, 1, 0)  # the edges are allowed
    with pytest.raises(CountError, match=r"threshold must be a probability .* \(0.5 is the"):
        check_settings(1.5, 2.0, 5, 8)
    with pytest.raises(CountError, match=r"HAC percentage rule .* got 0 \(2.0 is the default\)"):
        check_settings(0.5, 0, 5, 8)
    with pytest.raises(CountError, match=r"HAC count rule .* got 2.5 \(5 is the default\)"):
        check_settings(0.5, 2.0, 2.5, 8)  # type: ignore[arg-type]
    with pytest.raises(CountError, match="evidence must be a whole number >= 0; got -1"):
        check_settings(0.5, 2.0, 5, -1)
    # a user error: the command line shows it as one line, no traceback
    from marrowscope.cli.main import _user_errors

    assert issubclass(CountError, ValueError) and CountError in _user_errors()


def test_importing_the_rule_loads_no_torch_image_or_sklearn_code() -> None:
    code = (
        "import sys, marrowscope.metrics.counting\n"
        "heavy = ('torch', 'torchvision', 'timm', 'sklearn', 'scipy', 'PIL', 'cv2', "
        "'matplotlib', 'numpy')\n"
        "print('LOADED:' + ','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "LOADED:\n" in out.stdout, out.stdout + out.stderr

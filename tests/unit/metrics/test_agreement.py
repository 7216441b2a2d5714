"""The int8 accuracy guard's numbers against hand-computed values, its verdicts and its dict form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from marrowscope.metrics.agreement import GuardReport, guard_report

CLASSES = ["A", "B", "C"]


def _onehot(idx: list[int], k: int = 3, p: float = 0.9) -> np.ndarray:
    out = np.full((len(idx), k), (1 - p) / (k - 1))
    out[np.arange(len(idx)), idx] = p
    return out


def test_identical_models_agree_completely_and_pass() -> None:
    y = [0, 0, 1, 1, 2, 2, 0, 1]
    probs = _onehot([0, 0, 1, 2, 2, 2, 0, 1])
    g = guard_report(y, probs, probs.copy(), CLASSES, n_boot=200)
    assert g.agreement == 1.0 and g.macro_f1_drop == 0.0 and g.max_prob_diff == 0.0
    assert g.macro_f1_drop_ci95 == (0.0, 0.0) and g.mcnemar_p == 1.0
    assert g.passed and g.failures == []


def test_hand_computed_disagreement_fails_both_checks_with_the_numbers() -> None:
    y = [0, 0, 1, 1, 2, 2, 0, 1, 2, 0]
    ref = _onehot(y)  # the reference is always right: macro-F1 1
    cand_idx = list(y)
    cand_idx[1] = 1  # one image changes class: 9/10 agree
    cand = _onehot(cand_idx, p=0.8)
    g = guard_report(y, ref, cand, CLASSES, n_boot=300)
    assert g.agreement == pytest.approx(0.9)
    # candidate: A has TP 3, FN 1 -> F1 6/7; B TP 3, FP 1 -> F1 6/7; C perfect -> macro 19/21
    assert g.macro_f1_reference == pytest.approx(1.0)
    assert g.macro_f1_candidate == pytest.approx((6 / 7 + 6 / 7 + 1) / 3)
    assert g.macro_f1_drop == pytest.approx(1 - (6 / 7 + 6 / 7 + 1) / 3)
    assert g.max_prob_diff == pytest.approx(0.9 - 0.1)  # class A of image 1: 0.9 -> 0.1
    assert g.reference_right_candidate_wrong == 1 and g.candidate_right_reference_wrong == 0
    lo, hi = g.macro_f1_drop_ci95
    assert 0.0 <= lo <= g.macro_f1_drop <= hi
    assert not g.passed
    text = " ".join(g.failures)
    assert "top-1 agreement 0.9000 < 0.99" in text and "macro-F1 drop 0.0952" in text


def test_thresholds_decide_and_a_better_candidate_passes_the_drop_check() -> None:
    y = [0, 1, 2, 0]
    ref = _onehot([0, 1, 1, 0])  # reference wrong on image 2
    cand = _onehot([0, 1, 2, 0])  # candidate right: negative drop
    g = guard_report(y, ref, cand, CLASSES, min_agreement=0.7, n_boot=100)
    assert g.macro_f1_drop < 0 and g.agreement == 0.75 and g.passed
    strict = guard_report(y, ref, cand, CLASSES, n_boot=100)
    assert strict.failures == ["top-1 agreement 0.7500 < 0.99"]


def test_non_finite_candidate_fails() -> None:
    y = [0, 1, 2]
    ref = _onehot(y)
    cand = ref.copy()
    cand[1] = np.nan
    g = guard_report(y, ref, cand, CLASSES, n_boot=50)
    assert not g.passed and g.agreement == pytest.approx(2 / 3)
    assert math.isinf(g.max_prob_diff)
    assert any("non-finite" in f for f in g.failures)


def test_dict_round_trip_through_json() -> None:
    y = [0, 0, 1, 2, 2, 1]
    g = guard_report(y, _onehot(y), _onehot([0, 1, 1, 2, 2, 1]), CLASSES, n_boot=100)
    d = json.loads(json.dumps(g.to_dict()))
    assert d["passed"] is False and len(d["macro_f1_drop_ci95"]) == 2
    assert GuardReport.from_dict(d) == g
    with pytest.raises(ValueError, match="agreement"):
        GuardReport.from_dict({k: v for k, v in d.items() if k != "agreement"})


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        guard_report([0, 1], np.zeros((2, 3)), np.zeros((2, 4)), CLASSES)
    with pytest.raises(ValueError, match="at least one"):
        guard_report([], np.zeros((0, 3)), np.zeros((0, 3)), CLASSES)

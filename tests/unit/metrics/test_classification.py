"""Metrics against hand-computed values; bootstrap, focus block, calibration, top-k."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from marrowscope.metrics import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    focus_class_block,
    top_k_accuracy,
)
from marrowscope.metrics.classification import _accuracy_macro_f1

# 3 classes, 10 samples. Confusion matrix (rows true, cols predicted):
#   A: [3, 1, 0]   B: [0, 2, 1]   C: [0, 1, 2]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 2, 2, 2, 1]
CLASSES = ["A", "B", "C"]
# precision A 3/3, B 2/4, C 2/3; recall A 3/4, B 2/3, C 2/3
# F1 A 6/7, B 4/7, C 2/3
MACRO_F1 = (6 / 7 + 4 / 7 + 2 / 3) / 3  # 44/63
WEIGHTED_F1 = (4 * 6 / 7 + 3 * 4 / 7 + 3 * 2 / 3) / 10  # 5/7
MACRO_PRECISION = (1 + 1 / 2 + 2 / 3) / 3  # 13/18
MACRO_RECALL = (3 / 4 + 2 / 3 + 2 / 3) / 3  # 25/36


def test_metrics_match_hand_computed_values() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["macro_f1"] == pytest.approx(44 / 63)
    assert m["macro_f1"] == pytest.approx(MACRO_F1)
    assert m["weighted_f1"] == pytest.approx(5 / 7)
    assert m["weighted_f1"] == pytest.approx(WEIGHTED_F1)
    assert m["macro_precision"] == pytest.approx(MACRO_PRECISION)
    assert m["macro_recall"] == pytest.approx(MACRO_RECALL)
    assert m["balanced_accuracy"] == pytest.approx(25 / 36)
    assert m["n"] == 10
    assert m["classes"] == CLASSES
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 1, 2]]
    assert m["per_class"]["A"] == pytest.approx(
        {"precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4}
    )
    assert m["per_class"]["B"] == pytest.approx(
        {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3}
    )
    assert m["per_class"]["C"]["f1"] == pytest.approx(2 / 3)


def test_metrics_are_plain_python_and_json_serialisable() -> None:
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED, dtype=np.int32), CLASSES)
    assert json.loads(json.dumps(m)) == m
    assert type(m["accuracy"]) is float
    assert type(m["n"]) is int
    assert type(m["per_class"]["A"]["support"]) is int
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)


def test_zero_support_class_still_appears() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, [*CLASSES, "D"])
    assert m["per_class"]["D"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[3, 1, 0, 0], [0, 2, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    # the headline macro-F1, like balanced accuracy, averages over the classes present (A, B,
    # C): the absent D changes nothing; the all-classes value counts D as F1 = 0
    assert m["macro_f1"] == pytest.approx(MACRO_F1)
    assert m["macro_f1"] == pytest.approx(
        f1_score(Y_TRUE, Y_PRED, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert m["macro_f1_all_classes"] == pytest.approx(MACRO_F1 * 3 / 4)
    assert m["present_classes"] == 3
    assert m["balanced_accuracy"] == pytest.approx(25 / 36)
    assert m["accuracy"] == pytest.approx(0.7)


def test_macro_f1_with_every_class_present_is_the_all_classes_value_exactly() -> None:
    rng = np.random.default_rng(5)
    y, p = rng.permutation(np.arange(300) % 6), rng.integers(0, 6, 300)
    m = classification_metrics(y, p, list("abcdef"))
    assert m["macro_f1"] == m["macro_f1_all_classes"]  # bit for bit: published numbers stay
    assert m["macro_f1"] == f1_score(y, p, average="macro")
    ci = bootstrap_ci(y, p, 6, n_boot=200, seed=1)
    assert ci["macro_f1"] == ci["macro_f1_all_classes"]


def test_a_model_class_absent_from_the_data_is_left_out_of_the_ci_and_the_comparison() -> None:
    from marrowscope.metrics.classification import paired_comparison

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 400)  # a 4th model class, D, has no sample
    a = np.where(rng.random(400) < 0.7, y, rng.integers(0, 4, 400))
    b = np.where(rng.random(400) < 0.8, y, rng.integers(0, 4, 400))
    classes = ["A", "B", "C", "D"]
    m = classification_metrics(y, a, classes)
    assert m["macro_f1"] > m["macro_f1_all_classes"] + 0.15  # D's F1 = 0 no longer drags it
    ci = bootstrap_ci(y, a, 4, n_boot=500, seed=0)
    lo, hi = ci["macro_f1"]
    assert lo < m["macro_f1"] < hi
    lo, hi = ci["macro_f1_all_classes"]
    assert lo < m["macro_f1_all_classes"] < hi < m["macro_f1"]
    r = paired_comparison(y, a, b, classes, n_boot=500)
    assert r["macro_f1_a"] == m["macro_f1"]
    lo, hi = r["difference_ci95"]
    assert lo <= r["difference"] <= hi


def _naive_macro_f1(t: np.ndarray, p: np.ndarray, k: int) -> float:
    """classification_metrics' macro_f1 (over the classes present in ``t``), in numpy."""
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    den = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, den, out=np.zeros(k), where=den > 0)
    return float(f1[cm.sum(1) > 0].mean())


def test_a_resample_that_misses_a_rare_class_leaves_it_out_not_scores_it_zero() -> None:
    """Classes of 150, 150 and 2 images, the rare one always right: a resample without it
    scored its F1 as 0, so the interval fell to [0.52, 0.90] around 0.867; each resample is now
    scored as classification_metrics scores data, like resampling the images."""
    from marrowscope.metrics.classification import paired_comparison

    y = np.repeat([0, 1, 2], [150, 150, 2])
    p = y.copy()
    p[:30], p[150:180] = 1, 0
    point = classification_metrics(y, p, list("abc"))["macro_f1"]
    assert point == pytest.approx(13 / 15)
    ci = bootstrap_ci(y, p, 3, n_boot=4000, seed=0)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, y.size, (4000, y.size))
    naive = [_naive_macro_f1(y[i], p[i], 3) for i in idx]
    lo, hi = ci["macro_f1"]
    assert lo == pytest.approx(np.quantile(naive, 0.025), abs=0.01)
    assert hi == pytest.approx(np.quantile(naive, 0.975), abs=0.01)
    assert 0.75 < lo < point < hi
    # paired: B right on 20 more images; the rare class is in both or in neither
    b = p.copy()
    b[:10], b[150:160] = 0, 1
    r = paired_comparison(y, p, b, list("abc"), n_boot=4000)
    diffs = [_naive_macro_f1(y[i], b[i], 3) - _naive_macro_f1(y[i], p[i], 3) for i in idx]
    lo, hi = r["difference_ci95"]
    assert lo == pytest.approx(np.percentile(diffs, 2.5), abs=0.006)
    assert hi == pytest.approx(np.percentile(diffs, 97.5), abs=0.006)


# docs/results/bm-dev-final.json, evaluation_val: confusion matrix and its published interval
_BM_DEV_CM = [
    [13, 2, 0, 1, 1, 3, 3, 0], [1, 23, 0, 1, 5, 0, 0, 0], [0, 0, 29, 0, 0, 1, 0, 0],
    [0, 0, 0, 29, 0, 1, 0, 0], [0, 0, 0, 2, 27, 0, 0, 1], [0, 0, 0, 1, 1, 28, 0, 0],
    [1, 3, 0, 3, 3, 1, 18, 1], [0, 1, 0, 0, 1, 0, 1, 27],
]  # fmt: skip
_BM_DEV_CI = {
    "accuracy": [0.7854077253218884, 0.8798283261802575],
    "macro_f1": [0.7712247632927444, 0.8701627235395923],
}


def test_published_intervals_with_every_class_in_every_resample_are_unchanged() -> None:
    """Scoring each resample over its own classes changes nothing, bit for bit, where every
    class is in every resample (8 classes: numpy sums 8 floats in another order than fewer)."""
    cm = np.array(_BM_DEV_CM)
    cells = np.repeat(np.arange(64), cm.ravel())
    ci = bootstrap_ci(cells // 8, cells % 8, 8, n_boot=1000, seed=0)
    assert ci["accuracy"] == _BM_DEV_CI["accuracy"]
    assert ci["macro_f1"] == _BM_DEV_CI["macro_f1"]


def test_zero_support_class_that_is_predicted_has_zero_precision() -> None:
    pred = [*Y_PRED[:-1], 3]  # last C sample predicted as D
    m = classification_metrics(Y_TRUE, pred, [*CLASSES, "D"])
    assert m["per_class"]["D"]["precision"] == 0.0
    assert m["per_class"]["D"]["support"] == 0
    assert m["confusion_matrix"][2] == [0, 0, 2, 1]


def test_balanced_accuracy_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
    m = classification_metrics(y, p, list("abcdef"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        ([0, 1], [0], "must match"),
        ([], [], "no sample"),
        ([0, 3], [0, 1], "class index 3"),
        ([0, -1], [0, 1], "class index -1"),
        (["A", "B"], [0, 1], "integer class indices"),
        ([0.5, 1.0], [0, 1], "integer class indices"),
    ],
)
def test_bad_labels_raise_clear_errors(y_true, y_pred, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, CLASSES)


def test_vectorised_macro_f1_equals_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        k = int(rng.integers(2, 8))
        n = int(rng.integers(1, 60))
        y, p = rng.integers(0, k, n), rng.integers(0, k, n)
        counts = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
        acc, f1 = _accuracy_macro_f1(counts[None])
        expected = f1_score(y, p, labels=range(k), average="macro", zero_division=0)
        assert f1[0] == pytest.approx(expected), trial
        assert acc[0] == pytest.approx(np.mean(y == p))


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 4, 500))
    m = classification_metrics(y, p, list("abcd"))
    ci = bootstrap_ci(y, p, 4, n_boot=500, seed=7)
    assert ci["n_boot"] == 500 and ci["alpha"] == 0.05
    for key in ("accuracy", "macro_f1"):
        lo, hi = ci[key]
        assert lo < m[key] < hi
        assert hi - lo < 0.2
    assert bootstrap_ci(y, p, 4, n_boot=500, seed=7) == ci
    assert bootstrap_ci(y, p, 4, n_boot=500, seed=8) != ci
    narrow = bootstrap_ci(y, p, 4, n_boot=500, seed=7, alpha=0.5)
    assert narrow["accuracy"][1] - narrow["accuracy"][0] < ci["accuracy"][1] - ci["accuracy"][0]
    assert json.loads(json.dumps(ci)) == ci


def test_bootstrap_matches_resampling_the_samples() -> None:
    """Drawing confusion counts from a multinomial has the spread of resampling the samples."""
    rng = np.random.default_rng(2)
    n, k = 200, 3
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    idx = rng.integers(0, n, size=(4000, n))
    naive_acc = (y[idx] == p[idx]).mean(axis=1)
    naive = np.quantile(naive_acc, [0.025, 0.975])
    ci = bootstrap_ci(y, p, k, n_boot=4000, seed=0)
    assert ci["accuracy"] == pytest.approx(naive, abs=0.02)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(Y_TRUE, Y_PRED, 3, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(Y_TRUE, Y_PRED, 3, alpha=1.5)


def test_focus_block_by_hand() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    b = focus_class_block(m, "B")
    assert b is not None
    # B: TP 2, FN 1 (B->C), FP 2 (A->B, C->B), TN 10 - 5 = 5
    assert (b["tp"], b["fn"], b["fp"], b["tn"]) == (2, 1, 2, 5)
    assert b["specificity"] == pytest.approx(5 / 7)
    assert b["precision"] == pytest.approx(0.5)
    assert b["recall"] == b["sensitivity"] == pytest.approx(2 / 3)
    assert b["f1"] == pytest.approx(4 / 7)
    assert b["support"] == 3
    assert b["predicted"] == 4
    assert b["class"] == "B"
    assert b["confused_as"] == [{"class": "C", "count": 1}]
    assert b["confused_from"] == [{"class": "A", "count": 1}, {"class": "C", "count": 1}]
    a = focus_class_block(m, "A")
    assert a is not None and a["specificity"] == pytest.approx(
        1.0
    )  # nothing predicted as A wrongly
    assert a["confused_from"] == []


def test_focus_block_lists_top_three_most_frequent_first() -> None:
    # true class 0 predicted as 1 (x1), 2 (x4), 3 (x2), 4 (x3)
    y = [0] * 10 + [1, 2, 3, 4]
    p = [1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 1, 2, 3, 4]
    b = focus_class_block(classification_metrics(y, p, list("vwxyz")), "v")
    assert b is not None
    assert [(c["class"], c["count"]) for c in b["confused_as"]] == [("x", 4), ("z", 3), ("y", 2)]


def test_focus_block_absent_class_is_none() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert focus_class_block(m, "HAC") is None


def test_ece_of_perfectly_calibrated_one_hot_is_zero() -> None:
    y = np.array([0, 1, 2, 1, 0])
    probs = np.eye(3)[y]
    assert expected_calibration_error(probs, y) == 0.0


def test_ece_by_hand() -> None:
    # 5 samples at confidence 0.8 with 3 correct (gap 0.2), 5 at 0.6 with 3 correct (gap 0).
    probs = np.array([[0.8, 0.2]] * 5 + [[0.4, 0.6]] * 5)
    y = np.array([0, 0, 0, 1, 1] + [1, 1, 1, 0, 0])
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.5 * 0.2)
    # one bin: |accuracy 0.6 - mean confidence 0.7|
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.1)


def test_ece_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="rows"):
        expected_calibration_error(np.ones((3, 2)) / 2, [0, 1])


def test_top_k_accuracy_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    y = [0, 1, 0, 2]  # true class ranks: 1st, 2nd, 3rd, 3rd
    assert top_k_accuracy(probs, y, k=1) == pytest.approx(0.25)
    assert top_k_accuracy(probs, y, k=2) == pytest.approx(0.5)
    assert top_k_accuracy(probs, y, k=3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must"):
        top_k_accuracy(probs, y, k=0)


def test_fit_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    from marrowscope.metrics.classification import fit_temperature, negative_log_likelihood

    rng = np.random.default_rng(0)
    n, k = 4000, 5
    true_logits = rng.normal(0, 1.5, (n, k))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    # a model 3x overconfident: its logits are the calibrated ones times 3
    t = fit_temperature(true_logits * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    z = true_logits * 3.0
    before = negative_log_likelihood(np.exp(z) / np.exp(z).sum(1, keepdims=True), labels)
    zc = z / t
    after = negative_log_likelihood(np.exp(zc) / np.exp(zc).sum(1, keepdims=True), labels)
    assert after < before
    # TTA views (v, n, k) are accepted; identical views give the same temperature
    assert fit_temperature(np.stack([z, z]), labels) == pytest.approx(t, rel=1e-3)
    with pytest.raises(ValueError, match="rows"):
        fit_temperature(z, labels[:10])


def test_fit_temperature_is_not_fooled_by_a_few_confidently_wrong_cells() -> None:
    """1% of the cells wrong by a logit gap of 25: a loss that floors p(true class) goes flat
    for small T, and the search stopped at T = 0.16; the exact loss has its minimum near 1.4
    (a fine grid over T, in float64, is the reference); also with TTA views."""
    from scipy.special import log_softmax, logsumexp

    from marrowscope.metrics.classification import fit_temperature

    rng = np.random.default_rng(0)
    n, k = 1000, 8
    y = rng.integers(0, k, n)
    z = rng.normal(0, 1, (n, k))
    z[np.arange(n), y] += 8
    wrong = np.arange(n) < 10
    z[wrong, (y[wrong] + 1) % k] = z[wrong, y[wrong]] + 25
    views = np.stack([z, z + rng.normal(0, 0.5, z.shape)])
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))

    def exact(logits: np.ndarray, temp: float) -> float:
        lp = log_softmax(logits / temp, axis=-1)[:, np.arange(n), y]
        return float(-(logsumexp(lp, axis=0) - np.log(len(logits))).mean())

    for logits in (z[None], views):
        best = grid[np.argmin([exact(logits, g) for g in grid])]
        assert best > 1.0
        assert fit_temperature(logits if len(logits) > 1 else logits[0], y) == pytest.approx(
            best, rel=0.01
        )


def test_paired_comparison_counts_discordant_images_and_brackets_the_difference() -> None:
    from marrowscope.metrics.classification import paired_comparison

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.6, y, (y + 1) % 3)  # ~60% right
    b = np.where(rng.random(300) < 0.9, y, (y + 1) % 3)  # ~90% right
    r = paired_comparison(y, a, b, ["x", "y", "z"], n_boot=300)
    assert r["n"] == 300
    assert r["a_right_b_wrong"] == int(((a == y) & (b != y)).sum())
    assert r["b_right_a_wrong"] == int(((b == y) & (a != y)).sum())
    lo, hi = r["difference_ci95"]
    assert 0 < lo <= r["difference"] <= hi
    assert r["mcnemar_p"] < 1e-6
    same = paired_comparison(y, a, a, ["x", "y", "z"], n_boot=50)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0


def test_paired_comparison_shortcut_matches_resampling_the_images() -> None:
    """The multinomial draw of joint (true, A, B) tables has the distribution of the naive
    paired bootstrap (resample images, score A and B on the same resample)."""
    from marrowscope.metrics.classification import paired_comparison

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    a = np.where(rng.random(200) < 0.7, y, (y + 1) % 3)
    b = np.where(rng.random(200) < 0.8, y, (y + 2) % 3)
    classes = ["x", "y", "z"]

    def macro_f1(t: np.ndarray, p: np.ndarray) -> float:  # as classification_metrics
        return float(_accuracy_macro_f1(np.bincount(t * 3 + p, minlength=9).reshape(3, 3))[1])

    naive = np.empty(3000)
    for i in range(naive.size):
        idx = rng.integers(0, y.size, y.size)
        naive[i] = macro_f1(y[idx], b[idx]) - macro_f1(y[idx], a[idx])
    fast = paired_comparison(y, a, b, classes, n_boot=3000)
    lo, hi = fast["difference_ci95"]
    assert lo == pytest.approx(np.percentile(naive, 2.5), abs=0.012)
    assert hi == pytest.approx(np.percentile(naive, 97.5), abs=0.012)
    assert fast["difference"] == pytest.approx(
        classification_metrics(y, b, classes)["macro_f1"]
        - classification_metrics(y, a, classes)["macro_f1"]
    )

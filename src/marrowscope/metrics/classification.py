"""Classification metrics on integer labels: scores, bootstrap CIs, focus-class block, calibration.

Pure numpy / scikit-learn (no torch). Labels are integer indices into a ``classes`` list; every
function returns plain Python numbers so results go straight into ``metrics.json``.

Conventions (the same everywhere, so point estimates and their CIs agree):

* every class of ``classes`` is scored, also one with no sample (``labels=range(len(classes))``);
* a ratio with a zero denominator (precision of a never-predicted class, recall of a class with no
  sample) is 0, as scikit-learn's ``zero_division=0``;
* ``macro_f1`` (the headline) and ``balanced_accuracy`` are means over the classes that have
  samples in the labelled data (a model class absent from the data, e.g. after
  ``evaluate --drop-unknown``, is left out rather than counted as F1 = 0; scikit-learn's
  ``f1_score(average="macro", labels=<present classes>)``); ``macro_f1_all_classes``,
  ``macro_precision`` and ``macro_recall`` are plain means over all classes of ``classes``, an
  absent class counting 0. When every class has samples the two macro-F1 values are the same
  number. Bootstrap intervals and paired comparisons score each resample as these functions
  score data: its ``macro_f1`` averages over the classes present in that resample (a rare class
  a resample happens to miss is left out of it, not counted as F1 = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

__all__ = [
    "bootstrap_ci",
    "classification_metrics",
    "classification_metrics_from_confusion",
    "confusion_counts",
    "expected_calibration_error",
    "focus_class_block",
    "top_k_accuracy",
]


def _labels(y: ArrayLike, name: str, n_classes: int) -> NDArray[np.int64]:
    """``y`` as a 1-D int64 array whose values index ``n_classes`` classes; else a clear error."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        integral = True
    elif np.issubdtype(arr.dtype, np.floating):
        integral = bool(np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0))
    else:
        integral = arr.size == 0
    if not integral:
        raise ValueError(
            f"{name} must hold integer class indices (not names or scores), got dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        bad = arr[(arr < 0) | (arr >= n_classes)][0]
        raise ValueError(
            f"{name} holds class index {int(bad)}, outside 0..{n_classes - 1} for {n_classes} "
            "classes; pass the full class list in model order"
        )
    return arr


def _pair(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> tuple[NDArray, NDArray]:
    if n_classes < 1:
        raise ValueError("at least one class is needed to score predictions")
    t = _labels(y_true, "y_true", n_classes)
    p = _labels(y_pred, "y_pred", n_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}; they must match")
    if t.size == 0:
        raise ValueError("no sample to score: y_true and y_pred are empty")
    return t, p


def _safe_div(num: NDArray, den: NDArray) -> NDArray:
    """``num / den`` elementwise, 0 where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def classification_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class scores and the confusion matrix.

    Args:
        y_true: true class indices, shape (n,).
        y_pred: predicted class indices, shape (n,).
        classes: class names in index order (the model's order).

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1" (over the classes with samples),
        "macro_f1_all_classes" (over all ``classes``, absent ones as 0), "weighted_f1",
        "macro_precision", "macro_recall", "n", "present_classes", "per_class": {name:
        {"precision", "recall", "f1", "support"}},
        "confusion_matrix": [[...]] (rows = true, columns = predicted, in ``classes`` order),
        "classes": [...]}``; plain Python floats and ints.

    Raises:
        ValueError: empty input, mismatched lengths or an index outside ``classes``.
    """
    classes = [str(c) for c in classes]
    k = len(classes)
    t, p = _pair(y_true, y_pred, k)
    labels = np.arange(k)
    prec, rec, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, average=None, zero_division=0
    )
    cm = confusion_matrix(t, p, labels=labels)
    n = int(t.size)
    present = support > 0
    return {
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": float(rec[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "macro_f1_all_classes": float(f1.mean()),
        "weighted_f1": float(np.average(f1, weights=support)),
        "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()),
        "n": n,
        "present_classes": int(present.sum()),
        "per_class": {
            c: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "classes": classes,
    }


def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> NDArray[np.int64]:
    """The ``(K, K)`` confusion matrix (rows = true, columns = predicted) as int64 counts; all
    zeros for no sample (unlike :func:`classification_metrics`, which needs at least one).

    Counts add up: the matrix of a union of disjoint parts (the shards of a data-parallel
    evaluation) is the sum of the parts' matrices.
    """
    if n_classes < 1:
        raise ValueError("at least one class is needed to count predictions")
    t = _labels(y_true, "y_true", n_classes)
    p = _labels(y_pred, "y_pred", n_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}; they must match")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def classification_metrics_from_confusion(
    counts: ArrayLike, classes: Sequence[str]
) -> dict[str, Any]:
    """:func:`classification_metrics` of the (true, predicted) pairs a confusion matrix counts.

    Every score of :func:`classification_metrics` is a function of how often each (true,
    predicted) pair occurs, never of the order of the samples, so expanding ``counts`` back into
    pairs (sorted by true then predicted class) and scoring them gives exactly the numbers of the
    original samples. A data-parallel evaluation sums its shards' :func:`confusion_counts` and
    calls this, and so reports the same metrics as one process scoring every sample.

    Args:
        counts: ``(K, K)`` non-negative integer counts, rows = true class, columns = predicted.
        classes: class names in index order (``K`` of them).

    Raises:
        ValueError: a matrix of the wrong shape, negative or fractional counts, or no sample.
    """
    k = len(classes)
    cm = np.asarray(counts)
    if cm.shape != (k, k):
        raise ValueError(f"expected a {k}x{k} confusion matrix for {k} classes, got {cm.shape}")
    if cm.size and (cm.min() < 0 or not np.all(np.mod(cm, 1) == 0)):
        raise ValueError("a confusion matrix holds non-negative whole counts")
    reps = cm.astype(np.int64).ravel()
    cells = np.repeat(np.arange(k * k, dtype=np.int64), reps)
    return classification_metrics(cells // k, cells % k, classes)


def _accuracy_macro_f1(counts: NDArray, present: NDArray | None = None) -> tuple[NDArray, NDArray]:
    """Accuracy and macro-F1 of a stack of confusion matrices ``(..., k, k)`` (rows = true).

    Vectorised: ``F1_c = 2 TP / (2 TP + FP + FN)``, 0 when the denominator is 0, averaged over
    the classes where ``present`` is true, or over all k classes when it is ``None``
    (scikit-learn's ``f1_score(average="macro", labels=..., zero_division=0)``). ``present`` is a
    ``(k,)`` bool mask (one class set for every matrix) or a ``(..., k)`` one (a set per matrix:
    the classes with samples in each resample). With a per-matrix mask, the matrices that have
    every class of the union of the sets are averaged exactly as with that ``(k,)`` mask (the
    same floats, bit for bit: published intervals, where every class is in every resample, do
    not move); only the others are averaged over their own classes.
    """
    counts = np.asarray(counts)
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    fn = counts.sum(axis=-1) - tp
    fp = counts.sum(axis=-2) - tp
    n = counts.sum(axis=(-2, -1))
    acc = _safe_div(tp.sum(axis=-1), n)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    if present is None:
        return acc, f1.mean(axis=-1)
    mask = np.asarray(present, bool)
    if mask.ndim == 1:
        return acc, f1[..., mask].mean(axis=-1)
    mask = np.broadcast_to(mask, f1.shape)
    union = mask.reshape(-1, mask.shape[-1]).any(axis=0)
    macro_f1 = f1[..., union].mean(axis=-1)
    short = (mask != union).any(axis=-1)  # matrices missing a class of the union
    if short.any():
        m = mask[short]
        macro_f1[short] = np.where(m, f1[short], 0.0).sum(axis=-1) / m.sum(axis=-1)
    return acc, macro_f1


def bootstrap_ci(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    n_classes: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Percentile-bootstrap confidence intervals of accuracy and macro-F1.

    Resampling n samples with replacement only changes how many samples fall in each cell of the
    confusion matrix, and those counts are multinomial(n, cm / n). The resampled confusion
    matrices are therefore drawn directly (``numpy.random.Generator.multinomial``), which is the
    same distribution as resampling the samples and costs O(n_boot * n_classes**2), independent
    of n. Each resample is scored as :func:`classification_metrics` scores data: ``macro_f1``
    over the classes present in that resample (a row of its confusion matrix with a count; a
    rare class that a resample misses is left out of its mean, not counted as F1 = 0, which
    would drag the interval below the estimate), ``macro_f1_all_classes`` over all
    ``n_classes``; 0 for a zero denominator.

    Args:
        y_true: true class indices, shape (n,).
        y_pred: predicted class indices, shape (n,).
        n_classes: number of classes (the length of the model's class list).
        n_boot: number of bootstrap resamples.
        seed: seed of the resampling generator (same seed, same interval).
        alpha: 1 - confidence level (0.05 gives a 95% interval).

    Returns:
        ``{"accuracy": [lo, hi], "macro_f1": [lo, hi], "macro_f1_all_classes": [lo, hi],
        "n_boot": n_boot, "alpha": alpha}``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (0.05 for a 95% interval), got {alpha}")
    t, p = _pair(y_true, y_pred, n_classes)
    k = n_classes
    n = t.size
    cells = np.bincount(t * k + p, minlength=k * k)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, cells / n, size=n_boot).reshape(n_boot, k, k)
    present = counts.sum(axis=2) > 0  # (n_boot, k): the classes each resample has
    acc, macro_f1 = _accuracy_macro_f1(counts, present)
    _, macro_f1_all = _accuracy_macro_f1(counts)
    q = [alpha / 2, 1 - alpha / 2]
    return {
        "accuracy": [float(v) for v in np.quantile(acc, q)],
        "macro_f1": [float(v) for v in np.quantile(macro_f1, q)],
        "macro_f1_all_classes": [float(v) for v in np.quantile(macro_f1_all, q)],
        "n_boot": int(n_boot),
        "alpha": float(alpha),
    }


def focus_class_block(
    metrics: dict[str, Any], focus: str, *, top: int = 3
) -> dict[str, Any] | None:
    """One class seen on its own (the paper's HAC block): one-vs-rest scores and main confusions.

    Args:
        metrics: a :func:`classification_metrics` result.
        focus: the class name to describe.
        top: how many confused classes to list in each direction.

    Returns:
        ``None`` when ``focus`` is not among ``metrics["classes"]``; otherwise ``{"class",
        "precision", "recall", "sensitivity" (= recall), "specificity", "f1", "support",
        "predicted" (samples predicted as the focus class), "tp", "fp", "fn", "tn",
        "confused_as": [{"class", "count"}] (true focus predicted as another class),
        "confused_from": [{"class", "count"}] (another class predicted as focus)}``; the lists
        hold at most ``top`` classes with a non-zero count, most frequent first.
    """
    classes = list(metrics["classes"])
    if focus not in classes:
        return None
    i = classes.index(focus)
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    tp = int(cm[i, i])
    fn = int(cm[i].sum() - tp)
    fp = int(cm[:, i].sum() - tp)
    tn = int(cm.sum() - tp - fn - fp)
    pc = metrics["per_class"][focus]

    def most(counts: NDArray) -> list[dict[str, Any]]:
        others = [(int(counts[j]), j) for j in range(len(classes)) if j != i and counts[j] > 0]
        others.sort(key=lambda cj: (-cj[0], cj[1]))
        return [{"class": classes[j], "count": c} for c, j in others[:top]]

    return {
        "class": focus,
        "precision": float(pc["precision"]),
        "recall": float(pc["recall"]),
        "sensitivity": float(pc["recall"]),
        "specificity": float(_safe_div(np.array(tn), np.array(tn + fp))),
        "f1": float(pc["f1"]),
        "support": int(pc["support"]),
        "predicted": tp + fp,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "confused_as": most(cm[i]),
        "confused_from": most(cm[:, i]),
    }


def _probs(probs: ArrayLike, y_true: ArrayLike) -> tuple[NDArray, NDArray]:
    pr = np.asarray(probs, dtype=np.float64)
    if pr.ndim != 2:
        raise ValueError(f"probs must have shape (n_samples, n_classes), got {pr.shape}")
    t = _labels(y_true, "y_true", pr.shape[1])
    if t.size != pr.shape[0]:
        raise ValueError(f"probs has {pr.shape[0]} rows but y_true has {t.size} labels")
    if t.size == 0:
        raise ValueError("no sample to score: probs and y_true are empty")
    return pr, t


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al. 2017).

    Confidences (the highest probability of each row) are put in ``n_bins`` equal-width bins
    ``(lo, hi]`` of [0, 1]; ECE is the sample-weighted mean of ``|accuracy - mean confidence|``
    over the bins.

    Args:
        probs: class probabilities, shape (n, k).
        y_true: true class indices, shape (n,).
        n_bins: number of confidence bins.

    Returns:
        ECE in [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    pr, t = _probs(probs, y_true)
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=conf, minlength=n_bins)
    )
    # |sum(correct) - sum(conf)| / n over a bin B equals |B|/n * |acc(B) - conf(B)|
    return float(gap.sum() / t.size)


def top_k_accuracy(probs: ArrayLike, y_true: ArrayLike, k: int = 5) -> float:
    """Share of samples whose true class is among the ``k`` most probable classes.

    Ties are counted in the sample's favour: the true class is a hit when fewer than ``k``
    classes have a strictly higher probability.

    Args:
        probs: class probabilities (or logits), shape (n, n_classes).
        y_true: true class indices, shape (n,).
        k: how many top classes count as a hit (k >= n_classes gives 1.0).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    pr, t = _probs(probs, y_true)
    true_score = pr[np.arange(t.size), t]
    rank = (pr > true_score[:, None]).sum(axis=1)
    return float(np.mean(rank < k))


def softmax(logits: ArrayLike) -> NDArray[np.float32]:
    """Numerically stable softmax over the last axis (scipy's), float32 out: the one softmax of
    marrowscope's numpy code."""
    return special.softmax(np.asarray(logits, dtype=np.float32), axis=-1)


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean cross-entropy (no smoothing, no weights) of ``(N, K)`` logits against class indices;
    NaN for no sample."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return float("nan")
    logp = special.log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    return float(-logp[np.arange(y.size), y].mean())


def negative_log_likelihood(probs: ArrayLike, y_true: ArrayLike) -> float:
    """Mean ``-log p(true class)`` (probabilities clipped at 1e-12)."""
    pr, t = _probs(probs, y_true)
    return float(-np.log(np.clip(pr[np.arange(t.size), t], 1e-12, None)).mean())


def fit_temperature(
    logits: ArrayLike, y_true: ArrayLike, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The softmax temperature that minimises the negative log-likelihood (Guo et al. 2017).

    Args:
        logits: ``(n, k)`` logits, or ``(v, n, k)`` logits of ``v`` test-time-augmentation views
            (the probabilities are then the mean over views of ``softmax(logits / T)``, the same
            rule the Predictor applies).
        y_true: true class indices, shape (n,).
        bounds: the search interval for the temperature.

    Returns:
        The temperature ``T > 0`` (dividing the logits by it).
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3:
        raise ValueError(f"logits must have shape (n, k) or (v, n, k), got {z.shape}")
    t = _labels(y_true, "y_true", z.shape[2])
    if t.size != z.shape[1] or t.size == 0:
        raise ValueError(f"logits have {z.shape[1]} rows but y_true has {t.size} labels")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")

    rows = np.arange(t.size)
    log_views = np.log(z.shape[0])

    def nll(log_t: float) -> float:
        # exact, in float64: log of the mean over views of softmax(z / T) at the true class.
        # No clipping: a floor on p(true) makes the loss flat for small T, where a few
        # confidently wrong cells would let the search stop at a far too small temperature.
        log_p = special.log_softmax(z / np.exp(log_t), axis=-1)[:, rows, t]
        return float(-(special.logsumexp(log_p, axis=0) - log_views).mean())

    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded")
    return float(np.exp(res.x))


def paired_comparison(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    classes: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare two classifiers scored on the same images: is B's macro-F1 really different?

    The paired bootstrap takes the shortcut of :func:`bootstrap_ci`: resampling n images with
    replacement (the same images for A and B) only changes how many images fall in each cell
    ``(true, A's prediction, B's prediction)`` of the k x k x k joint table, and those counts are
    multinomial(n, table / n). The resampled tables are drawn directly; A's and B's confusion
    matrices are their two marginals. Same distribution as resampling the images, at
    O(n_boot * k**3) instead of 2 * n_boot metric computations over n images. Each resample's
    macro-F1 averages over the classes present in it (as :func:`bootstrap_ci`), the same
    classes for A and B since they are scored on the same images.

    Args:
        y_true: true class indices, shape (n,).
        pred_a: predictions of A (class indices), shape (n,).
        pred_b: predictions of B, shape (n,).
        classes: class names in index order.
        n_boot: paired bootstrap resamples (the same images for A and B in each resample).
        seed: bootstrap seed.

    Returns:
        ``{"n", "macro_f1_a", "macro_f1_b", "difference" (B - A), "difference_ci95" (paired
        bootstrap percentile interval), "a_right_b_wrong", "b_right_a_wrong", "mcnemar_p" (exact
        binomial McNemar test on per-image correctness)}``.
    """
    from scipy.stats import binomtest

    y = _labels(y_true, "y_true", len(classes))
    a = _labels(pred_a, "pred_a", len(classes))
    b = _labels(pred_b, "pred_b", len(classes))
    if not y.size == a.size == b.size:
        raise ValueError(
            f"y_true, pred_a and pred_b differ in length: {y.size}, {a.size}, {b.size}"
        )
    fa = classification_metrics(y, a, classes)["macro_f1"]
    fb = classification_metrics(y, b, classes)["macro_f1"]
    k = len(classes)
    cells = np.bincount((y * k + a) * k + b, minlength=k**3)
    rng = np.random.default_rng(seed)
    tables = rng.multinomial(y.size, cells / y.size, size=n_boot).reshape(n_boot, k, k, k)
    present = tables.sum(axis=(2, 3)) > 0  # (n_boot, k): classes in each resample, A's and B's
    _, f1_a = _accuracy_macro_f1(tables.sum(axis=3), present)  # (true, A)
    _, f1_b = _accuracy_macro_f1(tables.sum(axis=2), present)  # (true, B)
    diffs = f1_b - f1_a
    ca, cb = a == y, b == y
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {
        "n": int(y.size),
        "macro_f1_a": fa,
        "macro_f1_b": fb,
        "difference": fb - fa,
        "difference_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
        "a_right_b_wrong": only_a,
        "b_right_a_wrong": only_b,
        "mcnemar_p": float(p),
    }

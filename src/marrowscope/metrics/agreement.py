"""Does a faster copy of a model (int8, another runtime) still predict like the original?

:func:`guard_report` scores a reference model's and a candidate's probabilities on the same
labelled images: top-1 agreement, macro-F1 of each and the drop with its paired-bootstrap 95% CI
(:func:`~marrowscope.metrics.classification.paired_comparison`, the same images in every
resample), McNemar's p and the largest probability difference. :class:`GuardReport` holds the
numbers with the thresholds they were checked against, says which failed, and round-trips
through a plain dict (it is stored in an exported model's metadata).

Pure numpy / scikit-learn (no torch), like the rest of ``marrowscope.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from marrowscope.metrics.classification import paired_comparison

__all__ = [
    "DEFAULT_MAX_F1_DROP",
    "DEFAULT_MIN_AGREEMENT",
    "GuardReport",
    "guard_report",
]

DEFAULT_MAX_F1_DROP = 0.005
"""Largest accepted macro-F1 drop (reference minus candidate) on the guard's labelled images."""
DEFAULT_MIN_AGREEMENT = 0.99
"""Smallest accepted share of images whose top-1 class is the same for both models."""


@dataclass(frozen=True)
class GuardReport:
    """A candidate model against its reference on the same labelled images.

    Attributes:
        n: images scored.
        agreement: share of images with the same top-1 class.
        macro_f1_reference: macro-F1 of the reference (e.g. PyTorch fp32).
        macro_f1_candidate: macro-F1 of the candidate (e.g. int8).
        macro_f1_drop: reference minus candidate (positive: the candidate is worse).
        macro_f1_drop_ci95: paired-bootstrap 95% interval of the drop.
        max_prob_diff: largest absolute difference of any class probability of any image.
        mean_prob_diff: mean over images of the largest absolute difference per image.
        mcnemar_p: exact McNemar test of per-image correctness (reference vs candidate).
        reference_right_candidate_wrong: images only the reference gets right.
        candidate_right_reference_wrong: images only the candidate gets right.
        max_f1_drop: the threshold the drop was checked against.
        min_agreement: the threshold the agreement was checked against.
    """

    n: int
    agreement: float
    macro_f1_reference: float
    macro_f1_candidate: float
    macro_f1_drop: float
    macro_f1_drop_ci95: tuple[float, float]
    max_prob_diff: float
    mean_prob_diff: float
    mcnemar_p: float
    reference_right_candidate_wrong: int
    candidate_right_reference_wrong: int
    max_f1_drop: float = DEFAULT_MAX_F1_DROP
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    @property
    def failures(self) -> list[str]:
        """One phrase per failed check (empty when the candidate passes)."""
        out = []
        finite = all(
            math.isfinite(v) for v in (self.agreement, self.macro_f1_drop, self.max_prob_diff)
        )
        if not finite:
            out.append("the candidate gives non-finite probabilities (NaN or infinity)")
        if not self.agreement >= self.min_agreement:
            out.append(f"top-1 agreement {self.agreement:.4f} < {self.min_agreement:g}")
        if not self.macro_f1_drop <= self.max_f1_drop:
            lo, hi = self.macro_f1_drop_ci95
            out.append(
                f"macro-F1 drop {self.macro_f1_drop:.4f} (95% CI [{lo:.4f}, {hi:.4f}]) > "
                f"{self.max_f1_drop:g}"
            )
        return out

    @property
    def passed(self) -> bool:
        """True when every check holds."""
        return not self.failures

    def summary(self) -> str:
        """The numbers in one line, e.g. for a log or an error message."""
        lo, hi = self.macro_f1_drop_ci95
        return (
            f"top-1 agreement {self.agreement:.4f} (threshold {self.min_agreement:g}), macro-F1 "
            f"{self.macro_f1_reference:.4f} -> {self.macro_f1_candidate:.4f}: drop "
            f"{self.macro_f1_drop:+.4f}, paired 95% CI [{lo:+.4f}, {hi:+.4f}] (threshold "
            f"{self.max_f1_drop:g}), max probability difference {self.max_prob_diff:.4f}, on "
            f"{self.n} labelled images"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``passed``), read back by :meth:`from_dict`."""
        out = asdict(self)
        out["macro_f1_drop_ci95"] = list(self.macro_f1_drop_ci95)
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuardReport:
        """The report from :meth:`to_dict`'s output (extra keys such as ``passed`` are ignored).

        Raises:
            ValueError: a missing key.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in ("max_f1_drop", "min_agreement")]
        if missing:
            raise ValueError(f"guard report lacks {', '.join(missing)}")
        kw = {n: data[n] for n in names if n in data}
        lo, hi = kw["macro_f1_drop_ci95"]
        kw["macro_f1_drop_ci95"] = (float(lo), float(hi))
        return cls(**kw)


def guard_report(
    y_true: ArrayLike,
    probs_reference: ArrayLike,
    probs_candidate: ArrayLike,
    classes: Sequence[str],
    *,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    n_boot: int = 1000,
    seed: int = 0,
) -> GuardReport:
    """Score a candidate model's probabilities against its reference's on labelled images.

    Args:
        y_true: true class indices, shape (n,).
        probs_reference: ``(n, K)`` probabilities of the reference model.
        probs_candidate: ``(n, K)`` probabilities of the candidate, same images, same order.
        classes: the K class names in index order.
        max_f1_drop: threshold of :attr:`GuardReport.macro_f1_drop`.
        min_agreement: threshold of :attr:`GuardReport.agreement`.
        n_boot: paired bootstrap resamples for the CI of the drop.
        seed: bootstrap seed.

    Raises:
        ValueError: no image, or arrays whose shapes do not match ``classes`` and each other.
    """
    ref = np.asarray(probs_reference, dtype=np.float64)
    cand = np.asarray(probs_candidate, dtype=np.float64)
    y = np.asarray(y_true)
    k = len(classes)
    if ref.ndim != 2 or ref.shape != cand.shape or ref.shape[1] != k or y.shape != ref.shape[:1]:
        raise ValueError(
            f"probabilities must be (n, {k}) for both models and labels (n,); got "
            f"{ref.shape}, {cand.shape} and {y.shape}"
        )
    if y.size == 0:
        raise ValueError("the guard needs at least one labelled image")
    pred_ref = ref.argmax(axis=1)
    # a non-finite candidate row counts as a disagreement, whatever argmax makes of it
    ok = np.isfinite(cand).all(axis=1)
    pred_cand = np.where(ok, np.nan_to_num(cand, nan=-1.0).argmax(axis=1), (pred_ref + 1) % k)
    cmp = paired_comparison(y, pred_ref, pred_cand, classes, n_boot=n_boot, seed=seed)
    lo, hi = cmp["difference_ci95"]  # candidate - reference
    diff = np.abs(ref - cand)
    per_image = diff.max(axis=1)
    return GuardReport(
        n=int(y.size),
        agreement=float((pred_ref == pred_cand).mean()),
        macro_f1_reference=float(cmp["macro_f1_a"]),
        macro_f1_candidate=float(cmp["macro_f1_b"]),
        macro_f1_drop=float(-cmp["difference"]),
        macro_f1_drop_ci95=(float(-hi), float(-lo)),
        max_prob_diff=float(per_image.max()) if ok.all() else math.inf,
        mean_prob_diff=float(per_image.mean()) if ok.all() else math.inf,
        mcnemar_p=float(cmp["mcnemar_p"]),
        reference_right_candidate_wrong=int(cmp["a_right_b_wrong"]),
        candidate_right_reference_wrong=int(cmp["b_right_a_wrong"]),
        max_f1_drop=float(max_f1_drop),
        min_agreement=float(min_agreement),
    )

"""The counting rule: a differential count and its hairy-cell flag, over cells with any key.

One rule behind ``marrowscope count`` (cells keyed by their file) and the review app (cells keyed
by their database id). It never sees a file: a cell is a :class:`Call` (or any record with the
same four attributes, see :class:`Keyed`) whose ``key`` is whatever identifies it for the caller.

* :func:`tally` counts the labels of the identified cells (every class of the model appears,
  zeros included) and applies the hairy-cell rules.
* The **hairy-cell flag** fires when the cells called HAC reach ``hac_min_percent`` of the counted
  cells *or* ``hac_min_count`` cells. The defaults (:data:`DEFAULT_HAC_MIN_PERCENT` = 2 %,
  :data:`DEFAULT_HAC_MIN_COUNT` = 5 cells) are research settings chosen for sensitivity: a normal
  marrow has no hairy cells, so a handful of confident HAC calls is worth a human look, while a
  single stray call (a classifier's occasional false positive) does not fire the flag in a small
  sample. They are not a clinical decision rule. A model without a HAC class gets the status
  :data:`NOT_AVAILABLE` instead of a flag.
* :func:`select_evidence` picks the cells shown as evidence for the flag: the identified HAC
  cells with the highest HAC probability.

Pure Python: no torch, no image code, no file I/O, not even a runtime numpy import, so the command
line can read the defaults below at start-up.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_EVIDENCE",
    "DEFAULT_GALLERY",
    "DEFAULT_HAC_MIN_COUNT",
    "DEFAULT_HAC_MIN_PERCENT",
    "DEFAULT_THRESHOLD",
    "FLAGGED",
    "HAC_CLASS",
    "NOT_AVAILABLE",
    "NOT_FLAGGED",
    "Call",
    "CountError",
    "Evidence",
    "HacFlag",
    "Keyed",
    "Tally",
    "check_settings",
    "select_evidence",
    "tally",
]

DEFAULT_THRESHOLD = 0.5
"""Cells whose top class probability is below this go to the unidentified bin."""

DEFAULT_HAC_MIN_PERCENT = 2.0
"""Flag when HAC cells are at least this percentage of the identified cells (research setting)."""

DEFAULT_HAC_MIN_COUNT = 5
"""Flag when at least this many cells are called HAC (research setting)."""

DEFAULT_EVIDENCE = 8
"""How many of the highest-scoring HAC cells are shown with their Grad-CAM."""

DEFAULT_GALLERY = 48
"""Cells shown per class in the report's gallery (highest confidence first); all are in CSV."""

HAC_CLASS = "HAC"
"""The hairy-cell class name in the Matek et al. (2021) label set."""

FLAGGED = "flagged"
NOT_FLAGGED = "not flagged"
NOT_AVAILABLE = "not available"

K = TypeVar("K", bound=Hashable)
K_co = TypeVar("K_co", bound=Hashable, covariant=True)


class CountError(ValueError):
    """A count setting, label, sample folder or report folder cannot be used.

    The message names the value and the fix; the command line shows it as one line instead of a
    traceback (it is one of its user errors).
    """


class Keyed(Protocol[K_co]):
    """What the rule reads of a classified cell; :class:`Call` is the plain record for it.

    ``key`` identifies the cell for the caller (a relative file path, a database id ...). The rule
    only compares keys, to break ties between equal probabilities, so keys of one call must be
    mutually orderable (strings, integers, tuples of them).
    """

    @property
    def key(self) -> K_co:
        """What identifies the cell."""
        ...

    @property
    def predicted(self) -> str:
        """The class the cell is counted under."""
        ...

    @property
    def identified(self) -> bool:
        """True when the cell is counted (not in the unidentified bin)."""
        ...

    @property
    def probs(self) -> np.ndarray:
        """Every class's probability, in the model's class order."""
        ...


C = TypeVar("C", bound=Keyed[Any])


@dataclass(frozen=True)
class Call(Generic[K]):
    """One classified cell as the counting rule sees it.

    Attributes:
        key: what identifies the cell for the caller (orderable, see :class:`Keyed`).
        predicted: the class it is counted under.
        identified: counted; else in the unidentified bin.
        probs: every class's probability, in the model's class order.
    """

    key: K
    predicted: str
    identified: bool
    probs: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Evidence(Generic[C]):
    """A HAC cell shown as evidence for the flag.

    Attributes:
        cell: the cell (the caller's record: a :class:`Call` or its own).
        probability: its HAC probability.
        rgb: the preprocessed image the model saw (RGB ``uint8``), if drawn.
        overlay: the HAC Grad-CAM over ``rgb`` (``None`` when Grad-CAM is not available).
    """

    cell: C
    probability: float
    rgb: np.ndarray | None = field(default=None, repr=False)
    overlay: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HacFlag:
    """The hairy-cell flag and the numbers behind it.

    Attributes:
        status: :data:`FLAGGED`, :data:`NOT_FLAGGED` or :data:`NOT_AVAILABLE`.
        message: one sentence for the report.
        hac_class: the model's HAC class name (``None`` when it has none).
        count: identified cells called HAC.
        percent: their share of the identified cells, in percent.
        min_percent: the percentage rule.
        min_count: the count rule.
        by_percent: the percentage rule fired.
        by_count: the count rule fired.
        evidence: the highest-scoring HAC cells (filled in by whoever draws them).
        evidence_note: why the evidence has no Grad-CAM, if it has none.
    """

    status: str
    message: str
    hac_class: str | None
    count: int
    percent: float
    min_percent: float
    min_count: int
    by_percent: bool = False
    by_count: bool = False
    evidence: tuple[Evidence[Any], ...] = ()
    evidence_note: str | None = None

    @property
    def flagged(self) -> bool:
        """True when the flag fired."""
        return self.status == FLAGGED


@dataclass(frozen=True)
class Tally:
    """A differential count and its hairy-cell flag (no evidence pictures).

    Attributes:
        counts: cells per class (every class of the model, zeros included, model order).
        percents: ``counts`` as percentages of the counted cells (0 when none).
        flag: the hairy-cell flag for these counts.
    """

    counts: dict[str, int]
    percents: dict[str, float]
    flag: HacFlag

    @property
    def total(self) -> int:
        """Counted cells."""
        return sum(self.counts.values())


def check_settings(threshold: float, min_percent: float, min_count: int, evidence: int) -> None:
    """Check the count settings (threshold, HAC rules, evidence size).

    Raises:
        CountError: a setting out of range; the message names it and the default.
    """
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise CountError(
            f"threshold must be a probability between 0 and 1; got {threshold} "
            f"({DEFAULT_THRESHOLD} is the default)"
        )
    if not (isinstance(min_percent, (int, float)) and 0.0 < min_percent <= 100.0):
        raise CountError(
            f"the HAC percentage rule must be in (0, 100]; got {min_percent} "
            f"({DEFAULT_HAC_MIN_PERCENT} is the default)"
        )
    if not (isinstance(min_count, int) and min_count >= 1):
        raise CountError(
            f"the HAC count rule must be a whole number >= 1; got {min_count} "
            f"({DEFAULT_HAC_MIN_COUNT} is the default)"
        )
    if not (isinstance(evidence, int) and evidence >= 0):
        raise CountError(f"evidence must be a whole number >= 0; got {evidence}")


def _find_hac(classes: Sequence[str], name: str) -> str | None:
    """``name`` as the model spells it (exact, else its one case-insensitive match), or ``None``."""
    if name in classes:
        return name
    folded = [c for c in classes if c.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _flag(
    counts: dict[str, int],
    classes: Sequence[str],
    hac_class: str,
    min_percent: float,
    min_count: int,
) -> HacFlag:
    """The hairy-cell flag for ``counts`` (the rule "at least min_percent % or min_count cells")."""
    hac = _find_hac(classes, hac_class)
    if hac is None:
        return HacFlag(
            status=NOT_AVAILABLE,
            message=(
                f"The model has no {hac_class} class (its classes: "
                f"{', '.join(classes)}), so it cannot flag hairy cells. Use a model trained with "
                f"the {hac_class} class."
            ),
            hac_class=None,
            count=0,
            percent=0.0,
            min_percent=float(min_percent),
            min_count=int(min_count),
        )
    n = sum(counts.values())
    k = counts[hac]
    pct = 100.0 * k / n if n else 0.0
    by_pct = n > 0 and k > 0 and k * 100.0 >= min_percent * n - 1e-9
    by_count = k >= min_count
    share = f"{k} of {n} identified cells ({pct:.1f}%) are called {hac}"
    if by_pct or by_count:
        rules = [
            r
            for r, hit in (
                (f"at least {min_percent:g}% of identified cells", by_pct),
                (f"at least {min_count} {hac} cells", by_count),
            )
            if hit
        ]
        msg = f"{share}: {' and '.join(rules)}. Review the evidence cells below."
        status = FLAGGED
    else:
        msg = (
            f"{share}: below both rules ({min_percent:g}% of identified cells, {min_count} cells)."
        )
        status = NOT_FLAGGED
    return HacFlag(
        status=status,
        message=msg,
        hac_class=hac,
        count=k,
        percent=pct,
        min_percent=float(min_percent),
        min_count=int(min_count),
        by_percent=by_pct,
        by_count=by_count,
    )


def tally(
    labels: Iterable[str],
    classes: Sequence[str],
    *,
    hac_class: str = HAC_CLASS,
    hac_min_percent: float = DEFAULT_HAC_MIN_PERCENT,
    hac_min_count: int = DEFAULT_HAC_MIN_COUNT,
) -> Tally:
    """Count the labels of the identified cells and apply the hairy-cell rules.

    The one counting rule behind ``marrowscope count`` and the review app (model calls and
    reviewed labels alike).

    Args:
        labels: one class name per counted cell.
        classes: the model's classes, in index order (every one appears in ``counts``).
        hac_class: the hairy-cell class name (matched case-insensitively).
        hac_min_percent: flag when HAC cells are at least this % of the counted cells.
        hac_min_count: flag when at least this many cells are HAC.

    Raises:
        CountError: a label that is not one of ``classes``.
    """
    counts = {str(c): 0 for c in classes}
    for label in labels:
        if label not in counts:
            raise CountError(
                f"label {label!r} is not a class of the model ({', '.join(counts)}); use one of them"
            )
        counts[label] += 1
    n = sum(counts.values())
    percents = {c: (100.0 * k / n if n else 0.0) for c, k in counts.items()}
    flag = _flag(counts, list(counts), hac_class, hac_min_percent, hac_min_count)
    return Tally(counts=counts, percents=percents, flag=flag)


def select_evidence(cells: Iterable[C], hac: str, classes: Sequence[str], n: int) -> list[C]:
    """The ``n`` identified cells called ``hac`` with the highest ``hac`` probability.

    Ties are broken by the cells' ``key`` (smallest first) so the choice is stable.

    Args:
        cells: the classified cells (:class:`Call` or any :class:`Keyed` record).
        hac: the model's HAC class name (one of ``classes``).
        classes: the model's classes, in the order of each cell's ``probs``.
        n: how many to pick (0 or less: none).

    Returns:
        The chosen cells (the caller's own records), best first.
    """
    idx = list(classes).index(hac)
    return sorted(
        (c for c in cells if c.identified and c.predicted == hac),
        key=lambda c: (-float(c.probs[idx]), c.key),
    )[: max(0, n)]

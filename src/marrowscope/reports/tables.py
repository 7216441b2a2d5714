"""The seed paper's three tables for a model comparison, as lists of row dicts.

Input ``rows``: one dict per model with ``model``, ``train_accuracy``, ``val_accuracy``,
``test_accuracy``, ``test_macro_f1``, ``epochs``, ``train_seconds``, ``params`` and ``metrics``
(a :func:`marrowscope.metrics.classification_metrics` result on the test split). A table is a
``list[dict]`` whose keys are the column headers in order; :func:`to_markdown` and
:func:`write_csv` render it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marrowscope.utils.io import atomic_write_text

if TYPE_CHECKING:
    from rich.table import Table as RichTable

__all__ = [
    "TABLE1_COLUMNS",
    "TABLE2_COLUMNS",
    "TABLE3_COLUMNS",
    "TABLE1_FORMATS",
    "PER_CLASS_DASH_NOTE",
    "has_dash",
    "per_class_table",
    "table1_accuracy",
    "table2_focus",
    "table3_per_class",
    "to_markdown",
    "to_rich",
    "write_csv",
]

TABLE1_COLUMNS = (
    "Model",
    "Training accuracy",
    "Validation accuracy",
    "Test accuracy",
    "Test macro-F1",
    "Epochs",
    "Train time (s)",
    "Params (M)",
)
TABLE2_COLUMNS = ("Model", "Precision", "Recall", "F1", "Support")
TABLE3_COLUMNS = ("Model", "Class", "Precision", "Recall", "F1", "Support")
TABLE1_FORMATS = {"Train time (s)": ".0f", "Params (M)": ".1f"}
"""Column formats for :func:`to_markdown` of Table 1 (seconds and millions need fewer digits)."""

Table = list[dict[str, Any]]


def _num(value: Any) -> Any:
    """A number as float/int, ``None`` for missing values."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def table1_accuracy(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Table 1: training / validation / test accuracy, macro-F1, epochs, time and size per model.

    Missing values are ``None``. ``Params (M)`` is ``params / 1e6``.
    """
    out: Table = []
    for r in rows:
        params = _num(r.get("params"))
        out.append(
            {
                "Model": str(r["model"]),
                "Training accuracy": _num(r.get("train_accuracy")),
                "Validation accuracy": _num(r.get("val_accuracy")),
                "Test accuracy": _num(r.get("test_accuracy")),
                "Test macro-F1": _num(r.get("test_macro_f1")),
                "Epochs": _num(r.get("epochs")),
                "Train time (s)": _num(r.get("train_seconds")),
                "Params (M)": None if params is None else float(params) / 1e6,
            }
        )
    return out


def table2_focus(rows: Sequence[Mapping[str, Any]], focus_class: str) -> Table:
    """Table 2: precision, recall, F1 and support of ``focus_class`` on the test split.

    Models whose test metrics do not contain ``focus_class`` are left out, so the result is ``[]``
    when the class is not part of the comparison.
    """
    out: Table = []
    for r in rows:
        per_class = r["metrics"]["per_class"]
        if focus_class not in per_class:
            continue
        pc = per_class[focus_class]
        out.append(
            {
                "Model": str(r["model"]),
                "Precision": float(pc["precision"]),
                "Recall": float(pc["recall"]),
                "F1": float(pc["f1"]),
                "Support": int(pc["support"]),
            }
        )
    return out


def table3_per_class(rows: Sequence[Mapping[str, Any]]) -> Table:
    """Table 3: precision, recall, F1 and support of every class for every model (test split)."""
    out: Table = []
    for r in rows:
        m = r["metrics"]
        for c in m["classes"]:
            pc = m["per_class"][c]
            out.append(
                {
                    "Model": str(r["model"]),
                    "Class": str(c),
                    "Precision": float(pc["precision"]),
                    "Recall": float(pc["recall"]),
                    "F1": float(pc["f1"]),
                    "Support": int(pc["support"]),
                }
            )
    return out


def _columns(table: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in table:
        cols.extend(k for k in row if k not in cols)
    return cols


def _cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def per_class_table(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class of a :func:`~marrowscope.metrics.classification_metrics` result:
    ``Class``, ``Precision``, ``Recall``, ``F1``, ``Support``.

    A ratio with nothing to divide by is missing (shown as an em dash), not the 0 that
    ``metrics.json`` stores as scikit-learn's ``zero_division=0``: the precision of a class the
    model never predicted here, the recall and F1 of a class with no sample here (a class with
    samples that was never predicted keeps recall 0 and F1 0: it was missed).
    """
    cm = metrics.get("confusion_matrix")
    predicted = [int(sum(col)) for col in zip(*cm, strict=True)] if cm else None
    rows = []
    for i, (c, v) in enumerate(metrics["per_class"].items()):
        present = v["support"] > 0
        rows.append(
            {
                "Class": c,
                "Precision": v["precision"] if predicted is None or predicted[i] else None,
                "Recall": v["recall"] if present else None,
                "F1": v["f1"] if present else None,
                "Support": v["support"],
            }
        )
    return rows


PER_CLASS_DASH_NOTE = (
    "—: nothing to divide by (no sample of the class here: no recall or F1; never predicted: "
    "no precision); metrics.json stores 0 for these, as scikit-learn does."
)
"""What a dash in :func:`per_class_table` means (printed under the table when one shows)."""


def has_dash(table: Sequence[Mapping[str, Any]]) -> bool:
    """True when a cell of ``table`` is missing (shown as an em dash)."""
    return any(v is None for row in table for v in row.values())


def to_markdown(
    table: Sequence[Mapping[str, Any]],
    floatfmt: str = ".3f",
    *,
    colfmt: Mapping[str, str] | None = None,
) -> str:
    """A GitHub pipe table; columns are the row keys in first-seen order.

    Args:
        table: rows (dicts keyed by column header).
        floatfmt: format spec of float cells.
        colfmt: per-column format specs that override ``floatfmt`` (e.g. ``{"Params (M)": ".1f"}``).

    Returns:
        The table text ending in a newline; ``""`` for an empty table. Missing values show as an
        em dash, numeric columns are right-aligned.
    """
    colfmt = dict(colfmt or {})
    if not table:
        return ""
    cols = _columns(table)
    numeric = {
        c: all(
            isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
            for r in table
            if r.get(c) is not None
        )
        for c in cols
    }
    header = "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |"
    rule = "|" + "|".join("---:" if numeric[c] else "---" for c in cols) + "|"
    body = [
        "| " + " | ".join(_cell(r.get(c), colfmt.get(c, floatfmt)) for c in cols) + " |"
        for r in table
    ]
    return "\n".join([header, rule, *body]) + "\n"


def to_rich(
    table: Sequence[Mapping[str, Any]],
    title: str | None = None,
    floatfmt: str = ".3f",
    *,
    colfmt: Mapping[str, str] | None = None,
    wrap: Sequence[str] = (),
) -> RichTable:
    """The same table for the terminal (a :class:`rich.table.Table`): the columns and cell
    formats of :func:`to_markdown`, numeric columns right-aligned, cells not wrapped except in
    the ``wrap`` columns."""
    from rich.table import Table as _Rich

    colfmt = dict(colfmt or {})
    cols = _columns(table) if table else []
    out = _Rich(title=title)
    for c in cols:
        numeric = all(
            isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)
            for r in table
            if r.get(c) is not None
        )
        out.add_column(c, justify="right" if numeric else "left", no_wrap=c not in wrap)
    for r in table:
        out.add_row(*(_cell(r.get(c), colfmt.get(c, floatfmt)) for c in cols))
    return out


def write_csv(
    table: Sequence[Mapping[str, Any]], path: Path, *, columns: Sequence[str] | None = None
) -> Path:
    """Write ``table`` as CSV (atomic); floats at full precision, missing values empty.

    Args:
        table: rows to write.
        path: destination file.
        columns: header order; default the row keys in first-seen order. Give it to get a
            header line for an empty table (e.g. ``TABLE2_COLUMNS``).

    Returns:
        ``path``.
    """
    path = Path(path)
    cols = list(columns) if columns is not None else _columns(table)
    buf = io.StringIO()
    if cols:
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in table:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
    return path

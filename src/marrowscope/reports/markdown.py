"""Markdown reports: one evaluation (``report.md`` next to ``metrics.json``) and a comparison.

Both are plain strings; the caller writes them (atomically) next to the figures they link to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import yaml

from marrowscope.reports.tables import (
    PER_CLASS_DASH_NOTE,
    TABLE1_FORMATS,
    has_dash,
    per_class_table,
    table1_accuracy,
    table2_focus,
    table3_per_class,
    to_markdown,
)

__all__ = ["comparison_report", "confusion_table", "evaluation_report"]

_HEADLINE = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_f1", "Macro-F1"),
    ("macro_f1_all_classes", "Macro-F1, all model classes (absent ones as 0)"),
    ("weighted_f1", "Weighted F1"),
    ("macro_precision", "Macro precision"),
    ("macro_recall", "Macro recall"),
    ("ece", "Expected calibration error"),
)


def _f(value: Any, fmt: str = ".3f") -> str:
    if value is None:
        return "—"
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def _ci_label(ci: Mapping[str, Any] | None) -> str:
    alpha = float(ci.get("alpha", 0.05)) if ci else 0.05
    return f"{100 * (1 - alpha):g}% CI"


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _link(path: str) -> str:
    return quote(path, safe="/")


def _focus_section(focus: Mapping[str, Any]) -> list[str]:
    name = focus["class"]

    def confusions(items: Sequence[Mapping[str, Any]]) -> str:
        return ", ".join(f"{_esc(i['class'])} ({i['count']})" for i in items) or "none"

    return [
        f"## Focus class: {_esc(name)}",
        "",
        "One-vs-rest scores of this class alone.",
        "",
        "| Precision | Recall (sensitivity) | Specificity | F1 | Support | Predicted as "
        f"{_esc(name)} |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_f(focus.get('precision'))} | {_f(focus.get('recall'))} | "
        f"{_f(focus.get('specificity'))} | {_f(focus.get('f1'))} | {focus.get('support', '—')} | "
        f"{focus.get('predicted', '—')} |",
        "",
        f"- True {_esc(name)} most often predicted as: {confusions(focus.get('confused_as', []))}",
        f"- Most often predicted as {_esc(name)} instead of: "
        f"{confusions(focus.get('confused_from', []))}",
        "",
    ]


def confusion_table(classes: Sequence[Any], cm: Sequence[Sequence[Any]]) -> str:
    """A confusion matrix (rows = true class, columns = predicted) as a Markdown table."""
    classes = [str(c) for c in classes]
    lines = [
        "| true \\ predicted | " + " | ".join(_esc(c) for c in classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for c, row in zip(classes, cm, strict=True):
        lines.append(f"| **{_esc(c)}** | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def evaluation_report(
    metrics: Mapping[str, Any],
    *,
    title: str,
    ci: Mapping[str, Any] | None = None,
    focus: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A readable Markdown report of one evaluation.

    Sections: headline numbers with their bootstrap CI, the focus-class block, a per-class
    table, and the confusion matrix (link to ``confusion_matrix.png`` plus the counts as a table).

    Args:
        metrics: a :func:`~marrowscope.metrics.classification_metrics` result, optionally with
            ``ece`` and ``top5_accuracy`` added.
        title: the report's heading.
        ci: a :func:`~marrowscope.metrics.bootstrap_ci` result, or ``None``.
        focus: a :func:`~marrowscope.metrics.focus_class_block` result, or ``None``.
        extra: facts listed under the title (checkpoint, data folder, image count, ...).
        notes: paragraphs shown after the facts (e.g. what the evaluation left out).

    Returns:
        The Markdown text.
    """
    ci_label = _ci_label(ci)
    out = [f"# {title}", ""]
    for key, value in (extra or {}).items():
        out.append(f"- **{_esc(key)}**: {_esc(value)}")
    out.append(f"- **samples**: {metrics['n']}, **classes**: {len(metrics['classes'])}")
    for note in notes:
        out += ["", _esc(note)]
    out += ["", "## Headline", "", f"| Metric | Value | {ci_label} |", "|---|---:|---:|"]
    for key, label in _HEADLINE:
        if key not in metrics or metrics[key] is None:
            continue
        if key == "macro_f1_all_classes" and metrics[key] == metrics.get("macro_f1"):
            continue  # every class has samples: the same number as the headline
        interval = (ci or {}).get(key)
        ci_text = f"{_f(interval[0])} – {_f(interval[1])}" if interval else ""
        out.append(f"| {label} | {_f(metrics[key])} | {ci_text} |")
    for key in sorted(k for k in metrics if k.startswith("top") and k.endswith("_accuracy")):
        out.append(f"| {key.replace('_', ' ').capitalize()} | {_f(metrics[key])} |  |")
    out.append("")
    if ci:
        out += [
            f"{ci_label}: percentile bootstrap over the samples ({ci.get('n_boot')} resamples).",
            "",
        ]
    empty = [c for c, v in metrics["per_class"].items() if not v["support"]]
    if empty:
        out += [
            f"Classes without samples here ({', '.join(_esc(c) for c in empty)}) are left out of "
            "macro-F1 and balanced accuracy; they count as 0 in macro-F1 over all model classes, "
            "macro precision and macro recall.",
            "",
        ]
    if focus:
        out += _focus_section(focus)
    per_class = per_class_table(metrics)
    out += ["## Per class", "", to_markdown(per_class)]
    if has_dash(per_class):
        out += [PER_CLASS_DASH_NOTE, ""]
    out += [
        "## Confusion matrix",
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "Rows: true class; columns: predicted class.",
        "",
        confusion_table(metrics["classes"], metrics["confusion_matrix"]),
    ]
    return "\n".join(out).rstrip("\n") + "\n"


def comparison_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    focus_class: str,
    title: str,
    config_summary: Mapping[str, Any] | None = None,
) -> str:
    """The comparison report: the paper's Tables 1-3 with captions, figure links and notes.

    Args:
        rows: one dict per model (see :mod:`marrowscope.reports.tables`).
        focus_class: the class of Table 2 (HAC in the paper).
        title: the report's heading.
        config_summary: ``notes`` (list of caveat lines shown under the title), ``config`` (the
            resolved experiment config, shown as YAML) and any other ``key: value`` facts.

    Returns:
        The Markdown text.
    """
    summary = dict(config_summary or {})
    notes = [str(n) for n in summary.pop("notes", None) or []]
    config = summary.pop("config", None)
    models = [str(r["model"]) for r in rows]

    out = [f"# {title}", ""]
    out.append(f"Models: {', '.join(models) if models else 'none'}.")
    out.append("")
    if notes:
        out += ["**Notes**", "", *[f"- {n}" for n in notes], ""]
    for key, value in summary.items():
        out.append(f"- **{_esc(key)}**: {_esc(value)}")
    if summary:
        out.append("")

    out += [
        "## Table 1. Accuracy per model",
        "",
        "Training accuracy is measured on the **training** split and validation accuracy on the "
        "**validation** split, both at each model's best epoch (highest validation macro-F1); "
        "test accuracy and test macro-F1 come from the held-out **test** split, scored once with "
        "the best checkpoint. Train time is wall-clock seconds; Params (M) in millions.",
        "",
        to_markdown(table1_accuracy(rows), colfmt=TABLE1_FORMATS),
    ]

    t2 = table2_focus(rows, focus_class)
    out += [f"## Table 2. {_esc(focus_class)} precision, recall and F1", ""]
    if t2:
        out += [
            f"Scores of the class {_esc(focus_class)} against all others on the **test** split.",
            "",
            to_markdown(t2),
        ]
    else:
        out += [
            f"The focus class {_esc(focus_class)} is not among the classes of this comparison, so "
            "this table is empty (choose another focus class to fill it).",
            "",
        ]

    out += [
        "## Table 3. Per-class precision, recall and F1",
        "",
        "Every class for every model, on the **test** split.",
        "",
        to_markdown(table3_per_class(rows)),
    ]

    out += [
        "## Figures",
        "",
        "- Test accuracy, test macro-F1 and validation accuracy per model: "
        "[comparison.png](comparison.png)",
        "- Per-class F1 on the test split: [per_class_f1.png](per_class_f1.png)",
        "",
        "![Model comparison](comparison.png)",
        "",
        "![Per-class F1](per_class_f1.png)",
        "",
        "| Model | Training curves (train / validation) | Confusion matrix (test) |",
        "|---|---|---|",
    ]
    for m in models:
        out.append(
            f"| {_esc(m)} | [curves/{_esc(m)}.png](curves/{_link(m)}.png) | "
            f"[confusion/{_esc(m)}.png](confusion/{_link(m)}.png) |"
        )
    out.append("")

    if config is not None:
        dumped = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        out += [
            "## Configuration",
            "",
            "<details><summary>Resolved experiment configuration</summary>",
            "",
            "```yaml",
            dumped.rstrip("\n"),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(out).rstrip("\n") + "\n"

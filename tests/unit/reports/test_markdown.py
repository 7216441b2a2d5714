"""Markdown reports: evaluation and comparison."""

from __future__ import annotations

from marrowscope.metrics import bootstrap_ci, focus_class_block
from marrowscope.reports.markdown import comparison_report, evaluation_report

Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 2, 2, 2, 1]


def test_evaluation_report_sections(rows) -> None:
    m = dict(rows[0]["metrics"])
    m["ece"] = 0.042
    ci = bootstrap_ci(Y_TRUE, Y_PRED, 3, n_boot=200, seed=0)
    focus = focus_class_block(m, "HAC")
    md = evaluation_report(
        m, title="resnet50 on test", ci=ci, focus=focus, extra={"checkpoint": "runs/x/best"}
    )
    assert md.startswith("# resnet50 on test\n")
    assert "- **checkpoint**: runs/x/best" in md
    assert "| Metric | Value | 95% CI |" in md
    lo, hi = ci["accuracy"]
    assert f"| Accuracy | 0.700 | {lo:.3f} – {hi:.3f} |" in md
    assert "| Expected calibration error | 0.042 |" in md
    assert "## Focus class: HAC" in md
    assert "| 1.000 | 0.750 | 1.000 | 0.857 | 4 | 3 |" in md  # P, R, specificity, F1, n, pred
    assert "True HAC most often predicted as: LYT (1)" in md
    assert "| LYT | 0.500 | 0.667 | 0.571 | 3 |" in md  # per-class table
    assert "![Confusion matrix](confusion_matrix.png)" in md
    assert "| **HAC** | 3 | 1 | 0 |" in md
    assert "| true \\ predicted | HAC | LYT | NGS |" in md


def test_evaluation_report_without_ci_or_focus(make_rows) -> None:
    m = make_rows(["HAC", "LYT", "NGS", "BLA"])[0]["metrics"]  # BLA has no sample
    md = evaluation_report(m, title="t", ci=None, focus=None, extra=None)
    assert "Focus class" not in md
    assert "percentile bootstrap" not in md
    assert "| Accuracy | 0.700 |  |" in md
    assert "Classes without samples here (BLA)" in md


def test_comparison_report_tables_captions_and_links(rows) -> None:
    md = comparison_report(
        rows,
        focus_class="HAC",
        title="Comparison on bm-cells-dev",
        config_summary={
            "notes": ["One split for every model (seed 0).", "Caveat: tiny data."],
            "config": {"seed": 0, "model": {"name": "resnet50"}, "classes": ["HAC", "LYT"]},
        },
    )
    assert md.startswith("# Comparison on bm-cells-dev\n")
    for model in ("resnet50", "vit_small"):
        assert f"| {model} |" in md
        assert f"[curves/{model}.png](curves/{model}.png)" in md
        assert f"[confusion/{model}.png](confusion/{model}.png)" in md
    assert "## Table 1" in md and "## Table 2" in md and "## Table 3" in md
    assert "| Model | Training accuracy | Validation accuracy | Test accuracy |" in md
    assert "| resnet50 | 0.950 | 0.850 | 0.700 | 0.698 | 10 | 120 | 25.6 |" in md
    assert "| resnet50 | 1.000 | 0.750 | 0.857 | 4 |" in md  # Table 2 (HAC)
    assert "| vit_small | NGS |" in md  # Table 3
    assert "**training** split" in md and "**validation** split" in md and "**test** split" in md
    assert "(comparison.png)" in md and "(per_class_f1.png)" in md
    assert "- Caveat: tiny data." in md
    assert "```yaml" in md and "name: resnet50" in md


def test_comparison_report_absent_focus_class(make_rows) -> None:
    rows = make_rows(["BLA", "LYT", "NGS"])
    md = comparison_report(rows, focus_class="HAC", title="t", config_summary={})
    assert "The focus class HAC is not among the classes of this comparison" in md
    assert "| Model | Precision | Recall | F1 | Support |" not in md
    assert "| resnet50 | BLA |" in md


def test_comparison_report_quotes_model_names_in_links(rows) -> None:
    rows[0]["model"] = "vit small"
    md = comparison_report(rows, focus_class="HAC", title="t", config_summary=None)
    assert "(curves/vit%20small.png)" in md

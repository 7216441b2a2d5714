"""The paper's Tables 1-3 from synthetic rows; Markdown and CSV rendering."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from marrowscope.reports.tables import (
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    TABLE3_COLUMNS,
    has_dash,
    per_class_table,
    table1_accuracy,
    table2_focus,
    table3_per_class,
    to_markdown,
    write_csv,
)


def test_table1_columns_and_values(rows) -> None:
    t = table1_accuracy(rows)
    assert len(t) == 2
    assert all(tuple(r) == TABLE1_COLUMNS for r in t)
    r0 = t[0]
    assert r0["Model"] == "resnet50"
    assert r0["Training accuracy"] == pytest.approx(0.95)
    assert r0["Validation accuracy"] == pytest.approx(0.85)
    assert r0["Test accuracy"] == pytest.approx(0.7)
    assert r0["Test macro-F1"] == pytest.approx(44 / 63)
    assert r0["Epochs"] == 10
    assert r0["Train time (s)"] == pytest.approx(120.0)
    assert r0["Params (M)"] == pytest.approx(25.557032)
    assert t[1]["Model"] == "vit_small" and t[1]["Test accuracy"] == pytest.approx(0.8)


def test_table1_missing_values_are_none(rows) -> None:
    rows[0]["train_accuracy"] = None
    del rows[0]["params"]
    t = table1_accuracy(rows)
    assert t[0]["Training accuracy"] is None and t[0]["Params (M)"] is None
    assert "| resnet50 | — |" in to_markdown(t)


def test_table2_focus_values(rows) -> None:
    t = table2_focus(rows, "HAC")
    assert [tuple(r) for r in t] == [TABLE2_COLUMNS, TABLE2_COLUMNS]
    assert t[0] == pytest.approx(
        {"Model": "resnet50", "Precision": 1.0, "Recall": 0.75, "F1": 6 / 7, "Support": 4}
    )
    assert t[1]["Model"] == "vit_small"
    assert t[1]["Recall"] == pytest.approx(0.5)
    assert t[1]["F1"] == pytest.approx(2 / 3)


def test_table2_absent_focus_class_is_empty(make_rows) -> None:
    rows = make_rows(["BLA", "LYT", "NGS"])
    assert table2_focus(rows, "HAC") == []


def test_table3_every_class_of_every_model(rows) -> None:
    t = table3_per_class(rows)
    assert len(t) == 2 * 3
    assert all(tuple(r) == TABLE3_COLUMNS for r in t)
    assert [(r["Model"], r["Class"]) for r in t[:3]] == [
        ("resnet50", "HAC"),
        ("resnet50", "LYT"),
        ("resnet50", "NGS"),
    ]
    lyt = t[1]
    assert lyt["Precision"] == pytest.approx(0.5)
    assert lyt["Recall"] == pytest.approx(2 / 3)
    assert lyt["Support"] == 3


def test_to_markdown_pipe_table() -> None:
    table = [
        {"Model": "a|b", "Acc": 0.12345, "N": 3},
        {"Model": "c", "Acc": None, "N": 4},
    ]
    md = to_markdown(table, floatfmt=".2f")
    lines = md.strip().split("\n")
    assert lines[0] == "| Model | Acc | N |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b | 0.12 | 3 |"
    assert lines[3] == "| c | — | 4 |"
    assert to_markdown(table, colfmt={"Acc": ".4f"}).split("\n")[2] == "| a\\|b | 0.1235 | 3 |"
    assert to_markdown([]) == ""


def test_write_csv_round_trip(tmp_path: Path, rows) -> None:
    path = write_csv(table1_accuracy(rows), tmp_path / "sub" / "t1.csv")
    with path.open(newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(TABLE1_COLUMNS)
    assert got[0]["Model"] == "resnet50"
    assert float(got[0]["Test macro-F1"]) == pytest.approx(44 / 63, abs=1e-12)
    assert got[1]["Epochs"] == "11"
    assert not list(tmp_path.joinpath("sub").glob(".*.tmp-*"))


def test_write_csv_empty_table_with_columns(tmp_path: Path) -> None:
    path = write_csv([], tmp_path / "t2.csv", columns=TABLE2_COLUMNS)
    assert path.read_text() == "Model,Precision,Recall,F1,Support\n"
    assert write_csv([], tmp_path / "e.csv").read_text() == ""


def test_per_class_table_leaves_ratios_with_nothing_to_divide_by_empty() -> None:
    """metrics.json keeps scikit-learn's zero_division=0; the table shows a dash instead where
    a ratio is undefined: precision of a class never predicted, recall and F1 of a class with
    no sample. A class with samples that was never predicted keeps recall 0 and F1 0."""
    from marrowscope.metrics import classification_metrics

    classes = ["A", "B", "C", "D"]
    # A: 3 right of 4; C (no sample) predicted once; B has samples, never predicted; D neither
    m = classification_metrics([0, 0, 0, 0, 1, 1], [0, 0, 0, 2, 0, 0], classes)
    rows = {r["Class"]: r for r in per_class_table(m)}
    assert list(rows) == classes and list(rows["A"]) == [
        "Class",
        "Precision",
        "Recall",
        "F1",
        "Support",
    ]
    assert rows["A"]["Precision"] == pytest.approx(0.6) and rows["A"]["Recall"] == 0.75
    assert rows["B"]["Precision"] is None and rows["B"]["Recall"] == 0.0 and rows["B"]["F1"] == 0.0
    assert rows["C"]["Precision"] == 0.0 and rows["C"]["Recall"] is None and rows["C"]["F1"] is None
    assert (rows["D"]["Precision"], rows["D"]["Recall"], rows["D"]["F1"]) == (None, None, None)
    assert m["per_class"]["D"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert "| D | — | — | — | 0 |" in to_markdown(per_class_table(m))
    assert has_dash(per_class_table(m))
    every = classification_metrics([0, 1, 2, 3], [0, 1, 2, 2], classes)  # D never predicted
    assert [c for c, r in ((r["Class"], r) for r in per_class_table(every)) if has_dash([r])] == [
        "D"
    ]
    full = classification_metrics([0, 1, 2, 3], [0, 1, 3, 2], classes)
    assert not has_dash(per_class_table(full))

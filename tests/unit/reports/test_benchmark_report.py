"""The benchmark report: rows, number formats, skipped measurements, sections."""

from __future__ import annotations

from typing import Any

from marrowscope.reports.benchmark_report import benchmark_markdown, benchmark_rows
from marrowscope.reports.tables import to_rich


def _report() -> dict[str, Any]:
    row = {"backend": "onnx", "mode": "network", "batch_size": 32, "images_per_s": 1234.56,
           "median_ms": 25.9214, "p95_ms": 27.5, "batches": 40, "note": ""}  # fmt: skip
    skipped = {**row, "backend": "torch-bf16", "images_per_s": None, "median_ms": None,
               "p95_ms": None, "batches": 0, "note": "no native bf16 on this CPU"}  # fmt: skip
    return {
        "target": "bm8",
        "arch": "mobilenetv2_100",
        "input_size": 250,
        "machine": {
            "date": "2026-11-29 08:00 UTC",
            "cpu": "AMD EPYC",
            "cores": 2,
            "torch_threads": 2,
            "native_bf16": False,
            "marrowscope": "0.1.0",
            "torch": "2.14.1",
            "onnxruntime": "1.20",
            "python": "3.11.9",
        },  # fmt: skip
        "settings": {
            "random_weights": False,
            "warmup": 3,
            "min_time_s": 2.0,
            "n_images": 59,
            "images": "sample",
            "workers": 2,
        },  # fmt: skip
        "rows": [row, skipped],
        "preprocess_ms": {"decode": 1.234, "denoise": 40.5},
        "notes": ["onnx is fastest at batch 32"],
    }


def test_rows_carry_every_measurement() -> None:
    rows = benchmark_rows(_report())
    assert rows[0] == {"backend": "onnx", "mode": "network", "batch": 32, "images/s": 1234.56,
                       "median ms/batch": 25.9214, "p95 ms/batch": 27.5, "batches": 40,
                       "note": ""}  # fmt: skip
    assert rows[1]["images/s"] is None and rows[1]["note"] == "no native bf16 on this CPU"


def test_markdown_sections_and_formats() -> None:
    md = benchmark_markdown(_report())
    assert md.startswith("## Inference benchmark: mobilenetv2_100\n")
    assert "- target: `bm8` (checkpoint bundle)" in md
    assert "native bf16: no" in md and "torch 2.14.1, onnxruntime 1.20" in md
    assert "| onnx | network | 32 | 1,234.6 | 25.92 | 27.50 | 40 |  |" in md
    assert "| torch-bf16 | network | 32 | — | — | — | 0 | no native bf16 on this CPU |" in md
    assert "| decode | 1.23 |" in md and "| denoise | 40.50 |" in md
    assert md.rstrip().endswith("- onnx is fastest at batch 32")
    # a report from before --decode existed decoded in processes
    assert "with 2 decoding worker(s) (processes)" in md


def test_markdown_names_where_the_end_to_end_runs_decoded() -> None:
    for decode, words in (
        ("auto", "(threads for JPEG and PNG, processes for other formats)"),
        ("threads", "(threads)"),
        ("processes", "(processes)"),
    ):
        report = _report()
        report["settings"]["decode"] = decode
        assert f"with 2 decoding worker(s) {words}" in benchmark_markdown(report)


def test_terminal_table_has_the_same_columns() -> None:
    table = to_rich(benchmark_rows(_report()), title="t")
    assert [c.header for c in table.columns][:4] == ["backend", "mode", "batch", "images/s"]
    assert table.columns[3].justify == "right" and table.columns[0].justify == "left"
    assert table.row_count == 2

"""The inference benchmark's tables and Markdown report, from
:class:`marrowscope.engine.benchmark.BenchReport` as a plain dict (``dataclasses.asdict``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marrowscope.reports.tables import Table, to_markdown

__all__ = ["BENCH_FORMATS", "benchmark_markdown", "benchmark_rows"]

_DECODE_WORDS = {"auto": "threads for JPEG and PNG, processes for other formats"}
"""How the report names where the end-to-end runs decoded (other modes: by their name)."""

BENCH_FORMATS = {"images/s": ",.1f", "median ms/batch": ",.2f", "p95 ms/batch": ",.2f"}
"""Cell formats of :func:`benchmark_rows` (for ``to_markdown`` / ``to_rich``)."""


def benchmark_rows(report: Mapping[str, Any]) -> Table:
    """One row per measurement: backend, mode, batch, images/s, median and p95 ms per batch,
    batches timed and the note (why a measurement was skipped, or what limits it)."""
    return [
        {
            "backend": r["backend"],
            "mode": r["mode"],
            "batch": r["batch_size"],
            "images/s": r["images_per_s"],
            "median ms/batch": r["median_ms"],
            "p95 ms/batch": r["p95_ms"],
            "batches": r["batches"],
            "note": r["note"],
        }
        for r in report["rows"]
    ]


def benchmark_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: machine, settings, results, preprocessing cost, notes."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"## Inference benchmark: {report['arch']}",
        "",
        f"- target: `{report['target']}`"
        + (" (random weights)" if s.get("random_weights") else " (checkpoint bundle)"),
        f"- date: {m['date']}",
        f"- CPU: {m['cpu']} ({m['cores']} cores usable, {m['torch_threads']} torch threads, "
        f"native bf16: {'yes' if m['native_bf16'] else 'no'})",
        f"- versions: marrowscope {m['marrowscope']}, torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, openvino {m.get('openvino', 'not recorded')}, Python {m['python']}",
        f"- input {report['input_size']} px; warm-up {s['warmup']} batches; at least "
        f"{s['min_time_s']} s per measurement; end to end on {s['n_images']} files from "
        f"`{s['images']}` with {s['workers']} decoding worker(s) "
        f"({_DECODE_WORDS.get(s.get('decode', 'processes'), s.get('decode', 'processes'))})",
        "",
        to_markdown(benchmark_rows(report), colfmt=BENCH_FORMATS).rstrip("\n"),
    ]
    if report["preprocess_ms"]:
        steps = [
            {"preprocessing step": k, "ms/image (one process)": v}
            for k, v in report["preprocess_ms"].items()
        ]
        lines += ["", to_markdown(steps, ".2f").rstrip("\n")]
    if report["notes"]:
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"

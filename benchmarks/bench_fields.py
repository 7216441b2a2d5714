"""Speed of whole-field processing on 2 cores: detection alone, and end to end to the count.

Detection (file -> decode -> red-cell ruler -> rescale -> network -> boxes) on the 640 x 480
BCCD fields of field-dev, for the shipped learned detectors (ONNX Runtime) and the classical one;
then ``count --fields`` end to end (detection + crops at the classifier's scale + the shipped
classifier, with its test-time augmentation and without; PyTorch and ONNX Runtime backends).
Prints a Markdown table; the results go into docs/fields.md with the machine and date.

    python benchmarks/bench_fields.py [--data ../shared/data/field-dev] [--n 80] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _fields(data: Path, n: int) -> list[Path]:
    from marrowscope.data.fields import read_field_manifest

    recs = [r for r in read_field_manifest(data) if (r.width, r.height) == (640, 480)]
    return [Path(r.path) for r in recs[:n]]


def bench_detect(name: str, paths: list[Path], threads: int) -> dict[str, float]:
    from marrowscope.inference.fields import FieldDetector, load_field, resolve_scale

    det = (
        FieldDetector.load(name, threads=threads)
        if name != "classical"
        else FieldDetector.load(name)
    )
    for p in paths[:3]:
        det.detect(p)  # warm-up
    t0 = time.perf_counter()
    cells = sum(len(det.detect(p)) for p in paths)
    total = time.perf_counter() - t0
    # the stages, measured apart
    t0 = time.perf_counter()
    rgbs = [load_field(p) for p in paths]
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rgb in rgbs:
        resolve_scale(rgb)
    ruler = time.perf_counter() - t0
    n = len(paths)
    return {
        "fields_per_s": n / total,
        "ms_per_field": 1000 * total / n,
        "decode_ms": 1000 * decode / n,
        "ruler_ms": 1000 * ruler / n,
        "cells": cells,
    }


def bench_count(
    paths: list[Path], backend: str, tta: str | None, classifier: str
) -> dict[str, float]:
    from marrowscope.engine.count import count_fields
    from marrowscope.inference.fields import FieldDetector
    from marrowscope.inference.predictor import Predictor

    tmp = Path(tempfile.mkdtemp())
    try:
        folder = tmp / "sample"
        folder.mkdir()
        for p in paths:
            shutil.copyfile(p, folder / p.name)
        if backend == "onnx":
            from marrowscope.export.onnx import export_checkpoint
            from marrowscope.models.bundle import pretrained_bundle

            onnx_file, _ = export_checkpoint(pretrained_bundle(classifier), out=tmp / "model.onnx")
            pred = Predictor.from_checkpoint(onnx_file, backend="onnx", tta=tta)
        else:
            pred = Predictor.from_pretrained(classifier, device="cpu", tta=tta)
        det = FieldDetector.from_pretrained()
        count_fields(pred, folder, det, evidence=0, progress=False)  # warm-up pass
        t0 = time.perf_counter()
        res = count_fields(pred, folder, det, evidence=0, progress=False)
        secs = time.perf_counter() - t0
        return {
            "fields_per_s": len(paths) / secs,
            "cells": len(res.cells),
            "tta": pred.tta_,
            "precision": pred.precision_.name if backend == "torch" else "fp32",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/field-dev")
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--classifier", default="pbc6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-count", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2

    cv2.setNumThreads(1)
    from marrowscope.engine.benchmark import machine_info

    paths = _fields(Path(args.data), args.n)
    info = machine_info()
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {args.threads} threads "
        f"(torch {info['torch']}, onnxruntime {info['onnxruntime']}); {len(paths)} BCCD fields "
        f"(640 x 480) of field-dev; load average at start {os.getloadavg()[0]:.1f}.",
        "",
        "| what | fields/s | ms/field | notes |",
        "|---|---:|---:|---|",
    ]
    for name in ("wbc2", "wbc1", "classical"):
        r = bench_detect(name, paths, args.threads)
        lines.append(
            f"| detect, {name} | {r['fields_per_s']:.1f} | {r['ms_per_field']:.1f} | "
            f"decode {r['decode_ms']:.1f} ms, ruler {r['ruler_ms']:.1f} ms; {r['cells']} cells |"
        )
        print(lines[-1], flush=True)
    if not args.skip_count:
        for backend, tta in (("onnx", None), ("onnx", "none"), ("torch", None), ("torch", "none")):
            r = bench_count(paths, backend, tta, args.classifier)
            lines.append(
                f"| count --fields, {args.classifier} {backend} TTA {r['tta']} | "
                f"{r['fields_per_s']:.1f} | {1000 / r['fields_per_s']:.0f} | "
                f"{r['cells']} cells, {r['precision']}; detection included |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

"""One process vs two on this machine: data-parallel training (torchrun) and Ray prediction.

Training: ``marrowscope train --config CONFIG --set train.epochs=E`` in one process, the same under
``torchrun --standalone --nproc-per-node 2``, and (for the run-to-run noise) one process again with
another seed on the first run's split; per run the training images/s of each epoch and the
validation metrics of the last one.

Prediction: ``marrowscope predict CK IMAGES`` with ``--engine local``, ``--engine ray`` with one
predictor actor, and ``--engine ray`` with two (half a CPU each); images/s as each command reports
it, and the largest probability difference and the number of different classes against local.

    python benchmarks/scale_out.py --config configs/demo.yaml --epochs 2 --images DIR --out runs/scale

Prints a Markdown table and writes ``OUT/scale_out.json``. Everything runs as subprocesses, as a
user would run it; other jobs on the machine slow every number, so note the load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.engine.benchmark import machine_info

MS = [sys.executable, "-m", "marrowscope"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res.stdout + res.stderr, seconds


def _train_row(label: str, run_dir: Path, seconds: float) -> dict[str, Any]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    last = rows[-1]
    return {
        "run": label,
        "train img/s per epoch": " / ".join(
            f"{float(r['train_images_per_second']):.1f}" for r in rows
        ),
        "val accuracy": float(last["val_accuracy"]),
        "val macro-F1": float(last["val_macro_f1"]),
        "val loss": float(last["val_loss"]),
        "wall s": round(seconds, 1),
    }


def train(config: str, epochs: int, out: Path, extra: list[str]) -> list[dict[str, Any]]:
    base = ["train", "--config", config, "--set", f"train.epochs={epochs}", "--no-progress", *extra]
    one, two, noise = out / "train-1proc", out / "train-2proc", out / "train-1proc-seed2"
    _, s1 = _run([*MS, *base, "--run-dir", str(one)])
    _, s2 = _run([*TORCHRUN, "2", "-m", "marrowscope", *base, "--run-dir", str(two)])
    seed = int(re.search(r"^seed: (\d+)", (one / "config.yaml").read_text(), re.M).group(1))  # type: ignore[union-attr]
    _, s3 = _run(
        [*MS, *base, "--run-dir", str(noise), "--set", f"seed={seed + 1}"]
        + ["--set", f"data.manifest={one / 'split.csv'}", "--set", "data.root=null"]
    )
    return [
        _train_row("1 process", one, s1),
        _train_row("2 processes (torchrun, gloo)", two, s2),
        _train_row(f"1 process, seed {seed + 1}, same split", noise, s3),
    ]


def _frame(path: Path):  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas().sort_values("path").reset_index(drop=True)


def predict(checkpoint: str, images: str, out: Path) -> list[dict[str, Any]]:
    runs = {
        "local (decode processes + 1 network)": ["--out", str(out / "local.parquet")],
        "ray, 1 actor x 1 CPU": ["--engine", "ray", "--workers", "1", "--out", str(out / "ray1")],
        "ray, 2 actors x 0.5 CPU": ["--engine", "ray", "--workers", "2"]
        + ["--cpus-per-worker", "0.5", "--out", str(out / "ray2")],
    }
    rows = []
    ref = None
    for label, args in runs.items():
        text, seconds = _run([*MS, "predict", checkpoint, images, "--no-progress", *args])
        rate = float(re.search(r"([\d.]+) images/s", text).group(1))  # type: ignore[union-attr]
        frame = _frame(Path(args[args.index("--out") + 1]))
        ref = frame if ref is None else ref
        probs = [c for c in frame.columns if c.startswith("p_") and not c.startswith("p_top")]
        diff = float(np.nanmax(np.abs(frame[probs].to_numpy(float) - ref[probs].to_numpy(float))))
        rows.append(
            {
                "engine": label,
                "images": len(frame),
                "images/s": rate,
                "wall s (with start-up)": round(seconds, 1),
                "max |p - p_local|": diff,
                "classes differing": int((frame["predicted"] != ref["predicted"]).sum()),
            }
        )
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--checkpoint", default="bm8")
    ap.add_argument("--images", default=None, help="folder to predict (skip prediction if unset)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra training override")
    ap.add_argument("--out", type=Path, default=Path("runs/scale-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [x for s in args.set for x in ("--set", s)]
    report: dict[str, Any] = {"machine": machine_info(), "load_before": os.getloadavg()}
    if not args.skip_train:
        report["train"] = train(args.config, args.epochs, args.out, extra)
        print(_markdown(report["train"]), "\n")
    if args.images:
        report["predict"] = predict(args.checkpoint, args.images, args.out)
        print(_markdown(report["predict"]), "\n")
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    (args.out / "scale_out.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

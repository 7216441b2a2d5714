"""The paper's Keras/TF stack against marrowscope's CPU backends, side by side in one run.

For each model (the paper's 8 at 224 px, 8 classes, random weights; the shipped models at their
own size and classes), network alone, batch 16, float32 NCHW/NHWC batches made beforehand:

* **Keras/TF fp32**: the paper's stack (``benchmarks/keras_stack.py`` in a separate Python that has
  TensorFlow: ``--tf-python``; TensorFlow is never a marrowscope dependency);
* **torch bf16 + channels_last**: ``Predictor(precision="bf16")`` (what ``precision=auto`` runs on
  this CPU);
* **OpenVINO int8**: the int8 backend's runner, quantised with NNCF on ``--calibration`` real
  bone-marrow cells (for a shipped model its guarded export, if ``marrowscope export NAME
  --format int8`` made one), with one stream (``openvino-int8``) and with two streams that
  each take half the batch (``openvino-int8-2s``; the export measures both and records the
  faster, which the backend then uses);
* **ONNX Runtime int8** (static, QDQ, per-channel weights, same calibration cells): not a
  marrowscope backend, measured to choose the int8 runtime.

Rounds alternate: every round times each backend once (warm-up batch, then at least
``--min-time`` seconds), in an order rotated from round to round; the table gives the median of
the rounds. Also reported: multiply-accumulates per image (``torch.utils.flop_counter``), the int8
peak of this CPU (``benchmarks/vnni_peak.c``: AVX-512 VNNI throughput, one copy per core at
once) and the share of it each int8 model reaches, and the load average before and after.

    python benchmarks/keras_vs_marrowscope.py --tf-python /tmp/tfvenv/bin/python \
        [--models paper_cnn,resnet50,bm8] [--rounds 3] [--out docs/results/keras_vs_marrowscope.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marrowscope.config import ModelConfig
from marrowscope.data.manifest import ManifestRow
from marrowscope.data.recorded import stratified_subset
from marrowscope.engine.benchmark import machine_info
from marrowscope.export.int8 import quantize_openvino, save_int8
from marrowscope.inference.openvino_runtime import OpenVINORunner, default_int8_dir
from marrowscope.inference.predictor import Predictor, default_metadata
from marrowscope.models.bundle import load_bundle, pretrained_index
from marrowscope.models.registry import PAPER_MODELS, build_model
from marrowscope.preprocess.ops import resize
from marrowscope.utils.image import read_image

HERE = Path(__file__).resolve().parent
DATA = Path("../shared/data/bm-cells-dev")
KERAS_NAMES = {"mobilenetv2_100": "mobilenetv2"}
BACKENDS = (
    "keras-fp32",
    "keras-u8",
    "torch-bf16",
    "openvino-int8",
    "openvino-int8-2s",
    "openvino-int8-u8",
    "openvino-int8-2s-u8",
    "onnxruntime-int8",
)
KERAS = ("keras-fp32", "keras-u8")
MARROWSCOPE = (
    "torch-bf16",
    "openvino-int8",
    "openvino-int8-2s",
    "openvino-int8-u8",
    "openvino-int8-2s-u8",
)


class KerasServer:
    """``benchmarks/keras_stack.py`` in another Python, spoken to in JSON lines."""

    def __init__(self, python: str) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen(
            [python, str(HERE / "keras_stack.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the Keras process died on {req}; run keras_stack.py by hand")
        out = json.loads(line)
        if not out.pop("ok"):
            raise SystemExit(f"Keras: {out['error']} (request {req})")
        return out

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        finally:
            self.proc.wait(timeout=30)


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def int8_peak() -> float | None:
    """GMAC/s of AVX-512 VNNI over all cores (one copy of vnni_peak per core at once)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    exe = Path(tempfile.gettempdir()) / "marrowscope_vnni_peak"
    src = HERE / "vnni_peak.c"
    flags = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
    if subprocess.run([cc, *flags, str(src), "-o", str(exe)], capture_output=True).returncode:
        return None
    cores = len(os.sched_getaffinity(0))
    best = 0.0
    for _ in range(3):
        procs = [
            subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(cores)
        ]
        best = max(best, sum(float(p.communicate()[0].split()[0]) for p in procs))
    return best


def calibration_cells(data: Path, n: int, size: int) -> np.ndarray:
    """``n`` real cells under ``data`` (stratified, seeded), resized to ``size``: (n, S, S, 3)."""
    rows = [ManifestRow(str(p), p.parent.name) for p in sorted(data.glob("*/*.jpg"))]
    if not rows:
        raise SystemExit(f"no images under {data}; pass --data")
    chosen = stratified_subset(rows, n, seed=0)
    return np.stack([resize(read_image(r.path), size) for r in chosen])


def macs_per_image(model: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one forward pass at ``size`` px (FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 2.0


def ort_int8(model: torch.nn.Module, calib: np.ndarray, tmp: Path, size: int) -> Any:
    """ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax on
    ``calib``): a function of a float32 NCHW batch."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.ascontiguousarray(calib.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x[i : i + 1]} for i in range(len(x))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    fp32, pre, q = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    torch.onnx.export(
        model,
        (torch.rand(1, 3, size, size),),
        str(fp32),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(q),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


def timed(step: Any, *, min_time: float, warmup: int = 1) -> tuple[float, int]:
    """Seconds per batch (median of the timed batches) and how many were timed."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def run_model(
    name: str,
    keras: KerasServer | None,
    args: argparse.Namespace,
    tmp: Path,
) -> dict[str, Any]:
    shipped = name in pretrained_index()
    if shipped:
        model, meta = load_bundle(name)
        size, classes, arch = meta.input_size, meta.num_classes, meta.arch
    else:
        size, classes, arch = 224, 8, name
        model = build_model(ModelConfig(name=name, pretrained=False), classes, input_size=size)
        model.eval()
        meta = default_metadata(model)
    keras_name = KERAS_NAMES.get(arch, arch)
    bs = args.batch
    result: dict[str, Any] = {"model": name, "arch": arch, "size": size, "classes": classes}
    result["gmac_per_image"] = macs_per_image(model, size) / 1e9
    x = np.random.default_rng(0).random((bs, 3, size, size), dtype=np.float32)
    steps: dict[str, Any] = {}

    bf16 = Predictor.from_model(model, meta, device="cpu", precision="bf16", tta="none")
    x_cl = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    steps["torch-bf16"] = lambda: bf16.logits(x_cl)

    calib = calibration_cells(args.data, args.calibration, size)
    t0 = time.perf_counter()
    export = default_int8_dir(name) if shipped else None
    if export is not None and (export / "model.xml").is_file():
        int8 = Predictor.from_checkpoint(name, backend="int8", tta="none")
        result["int8_source"] = f"guarded export {export}"
        result["int8_guard"] = (int8.bundle_metadata_.int8 or {}).get("guard")
        folder = export
    else:
        q = quantize_openvino(model, calib, fast_bias_correction=True)  # speed only
        save_int8(q, meta.replace(int8={"runtime": "openvino", "temporary": True}), tmp / name)
        result["int8_source"] = f"quantised here on {len(calib)} cells"
        folder = tmp / name
    result["openvino_quantise_s"] = round(time.perf_counter() - t0, 1)
    threads = torch.get_num_threads()
    one = OpenVINORunner(folder / "model.xml", threads=threads, streams=1)
    two = OpenVINORunner(folder / "model.xml", threads=threads, streams=2)
    steps["openvino-int8"] = lambda: one(x)
    steps["openvino-int8-2s"] = lambda: two(x)
    if args.uint8:  # what predict hands the int8 backend: decoded uint8 NHWC images
        x_u8 = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
        steps["openvino-int8-u8"] = lambda: one.infer_uint8(x_u8)
        steps["openvino-int8-2s-u8"] = lambda: two.infer_uint8(x_u8)

    if args.ort:
        t0 = time.perf_counter()
        (tmp / f"{name}-ort").mkdir()
        ort_step = ort_int8(model, calib, tmp / f"{name}-ort", size)
        result["onnxruntime_quantise_s"] = round(time.perf_counter() - t0, 1)
        steps["onnxruntime-int8"] = lambda: ort_step(x)

    if keras is not None:
        built = keras.ask(cmd="build", model=keras_name, size=size, classes=classes, batch=bs)
        result["keras_params"] = built["params"]
        keras_keys = {"keras-fp32": keras_name}
        if args.uint8:
            keras_keys["keras-u8"] = f"{keras_name}-u8"
            keras.ask(
                cmd="build",
                model=keras_name,
                key=keras_keys["keras-u8"],
                input_dtype="uint8",
                size=size,
                classes=classes,
                batch=bs,
            )

        def keras_step_time(key: str) -> tuple[float, int]:
            one = keras.ask(cmd="time", model=key, warmup=1, batches=1)["seconds"][0]
            n = max(2, min(20, math.ceil(args.min_time / max(one, 1e-6))))
            secs = keras.ask(cmd="time", model=key, warmup=0, batches=n)["seconds"]
            return statistics.median(secs), n

    order = [b for b in BACKENDS if b in steps or (keras is not None and b in keras_keys)]
    rounds: dict[str, list[float]] = {b: [] for b in order}
    for r in range(args.rounds):
        k = r % len(order)
        for b in order[k:] + order[:k]:
            if b in KERAS:
                sec, _ = keras_step_time(keras_keys[b])
            else:
                sec, _ = timed(steps[b], min_time=args.min_time)
            rounds[b].append(bs / sec)
            print(f"  {name:16s} round {r + 1} {b:18s} {bs / sec:8.1f} images/s", flush=True)
    result["rounds"] = {b: [round(v, 2) for v in vs] for b, vs in rounds.items()}
    result["images_per_s"] = {b: round(statistics.median(vs), 2) for b, vs in rounds.items()}
    if keras is not None:
        for key in keras_keys.values():
            keras.ask(cmd="free", model=key)
    steps.clear()
    gc.collect()
    return result


def table(results: list[dict[str, Any]], peak: float | None) -> str:
    head = (
        "| model | input | GMAC/image | Keras/TF fp32 | Keras/TF, uint8 in | torch bf16+CL | "
        "ONNX Runtime int8 | OpenVINO int8 | OpenVINO int8, 2 streams | OpenVINO int8, uint8 in | "
        "OpenVINO int8, 2 streams, uint8 in | best marrowscope / best Keras | "
        "OpenVINO int8 (best): % of int8 peak |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ips = r["images_per_s"]
        keras = max((ips.get(b, 0.0) for b in KERAS), default=0.0)
        best_name = max(MARROWSCOPE, key=lambda b: ips.get(b, 0.0))
        best = ips.get(best_name, 0.0)
        ratio = f"**{best / keras:.1f}x** ({best_name})" if keras else "–"
        ov = max(ips.get(b, 0.0) for b in MARROWSCOPE if b.startswith("openvino"))
        share = f"{100 * ov * r['gmac_per_image'] / peak:.0f}%" if peak and ov else "–"

        def cell(b: str, ips: dict[str, float] = ips) -> str:
            return f"{ips[b]:.1f}" if b in ips else "–"

        lines.append(
            f"| {r['model']} | {r['size']} px | {r['gmac_per_image']:.2f} | {cell('keras-fp32')} | "
            f"{cell('keras-u8')} | {cell('torch-bf16')} | {cell('onnxruntime-int8')} | "
            f"{cell('openvino-int8')} | {cell('openvino-int8-2s')} | {cell('openvino-int8-u8')} | "
            f"{cell('openvino-int8-2s-u8')} | {ratio} | {share} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = ",".join(pretrained_index())
    ap.add_argument("--models", default=",".join(PAPER_MODELS) + ("," + shipped if shipped else ""))
    ap.add_argument(
        "--tf-python", default=None, help="a Python with TensorFlow (no Keras column without it)"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--min-time", type=float, default=3.0, help="seconds per measurement (at least)"
    )
    ap.add_argument("--calibration", type=int, default=64, help="calibration cells per int8 model")
    ap.add_argument("--no-ort", dest="ort", action="store_false", help="skip ONNX Runtime int8")
    ap.add_argument(
        "--uint8",
        action="store_true",
        help="also time both stacks on uint8 NHWC input (what predict gives the int8 backend; "
        "Keras then casts inside its graph)",
    )
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = datetime.now(UTC)
    load_before = load_avg()
    peak_before = int8_peak()
    print(f"int8 peak (VNNI, all cores): {peak_before} GMAC/s; load {load_before}", flush=True)
    keras = KerasServer(args.tf_python) if args.tf_python else None
    info = keras.ask(cmd="info") if keras else None
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="keras-vs-marrowscope-") as tmp:
            for name in [m for m in args.models.split(",") if m]:
                print(f"{name} ...", flush=True)
                results.append(run_model(name, keras, args, Path(tmp)))
    finally:
        if keras:
            keras.close()
    peak_after = int8_peak()
    peaks = [p for p in (peak_before, peak_after) if p]
    peak = max(peaks) if peaks else None
    report = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "keras": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "int8_peak_gmac_s": {"before": peak_before, "after": peak_after, "used": peak},
        "results": results,
    }
    print(table(results, peak))
    print(f"load average before {report['load_avg_before']}, after {report['load_avg_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

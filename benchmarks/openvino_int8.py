"""Could a runtime outside marrowscope make ConvNeXt-Tiny 5x faster than torch fp32 eager on CPU?

Network alone, batch 64, 224 px, 8 classes, random weights, 2 threads: torch fp32 eager (the
baseline of the inference issue), OpenVINO bf16, and OpenVINO static int8 from NNCF
post-training quantisation (300 real bone-marrow cells as calibration data; ``transformer``
preset, which keeps LayerNorm/GELU in float, and the default preset), the default-preset int8
model also run as two parallel streams of 32 images (throughput hint), and ONNX Runtime static
int8 (QDQ, per-channel weights, same calibration images). Also reports how far each model's
probabilities move from torch fp32 on 64 real cells.

OpenVINO and NNCF are the optional extra ``marrowscope[int8]`` (issue 17 made them the int8
backend); install them to re-run this:

    pip install 'marrowscope[int8]'
    python benchmarks/openvino_int8.py [--model convnext_tiny] [--out docs/results/openvino_int8.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from marrowscope.config import ModelConfig
from marrowscope.engine.benchmark import machine_info
from marrowscope.models.registry import build_model
from marrowscope.preprocess.ops import resize
from marrowscope.utils.image import read_image

DATA = Path("../shared/data/bm-cells-dev")


def cpu_flags() -> str:
    """The CPU's name with the instruction sets that decide int8/bf16 speed."""
    try:
        flags = next(
            ln.split(":", 1)[1].split()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = []
    wanted = [f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni")]
    return f"{machine_info()['cpu']} ({', '.join(wanted) or 'no AVX512-BF16/VNNI/AMX'})"


def images(n: int, step: int) -> np.ndarray:
    paths = sorted(DATA.glob("*/*.jpg"))[::step][:n]
    if len(paths) < n:
        raise SystemExit(f"need {n} images under {DATA}; found {len(paths)}")
    out = [resize(read_image(p), 224) for p in paths]
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def rate(fn, x: np.ndarray, reps: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return len(x) / float(np.median(times))


def ort_static_int8(
    model: torch.nn.Module, calib: np.ndarray, real: np.ndarray, x: np.ndarray, reps: int
) -> tuple[str, float, np.ndarray]:
    """ONNX Runtime static int8 (QDQ, per-channel weights, uint8 activations, MinMax calibration
    on ``calib``): (label, images/s on ``x``, probabilities on ``real``)."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
        torch.onnx.export(
            model,
            (torch.from_numpy(x[:1]),),
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
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
        speed = rate(lambda a: sess.run(None, {"x": a}), x, reps)
        logits = sess.run(None, {"x": real})[0]
    p = np.exp(logits - logits.max(1, keepdims=True))
    return "onnxruntime static int8 (QDQ)", speed, p / p.sum(1, keepdims=True)


def main() -> None:
    import nncf
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = build_model(ModelConfig(name=args.model, pretrained=False), 8, input_size=224).eval()
    x = np.random.default_rng(0).random((64, 3, 224, 224), dtype=np.float32)
    calib = images(300, 5)
    real = images(64, 23)

    results: dict[str, float] = {}
    with torch.inference_mode():
        results["torch fp32 eager"] = rate(lambda a: model(torch.from_numpy(a)), x, args.reps)
        ref = model(torch.from_numpy(real)).softmax(-1).numpy()

    ov_model = ov.convert_model(model, example_input=torch.from_numpy(x[:1]))
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    quantized = {
        "transformer": nncf.quantize(
            ov_model, dataset, subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER
        ),
        "default": nncf.quantize(ov_model, dataset, subset_size=len(calib)),
    }
    core = ov.Core()
    base = {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"}
    agreement: dict[str, dict[str, float]] = {}

    def run(label: str, m, precision: str) -> None:
        compiled = core.compile_model(m, "CPU", {**base, "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        results[label] = rate(lambda a: request.infer({0: a}), x, args.reps)
        logits = next(iter(request.infer({0: real}).values()))
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        agreement[label] = {
            "max_abs_prob_diff": float(np.abs(p - ref).max()),
            "argmax_agreement": float((p.argmax(1) == ref.argmax(1)).mean()),
        }

    run("openvino bf16", ov_model, "bf16")
    for preset, m in quantized.items():
        run(f"openvino int8 ({preset}) + bf16", m, "bf16")
        run(f"openvino int8 ({preset}) + fp32", m, "f32")

    # the same int8 model, the batch of 64 split over two streams of one thread each
    streams = core.compile_model(
        quantized["default"],
        "CPU",
        {
            "INFERENCE_NUM_THREADS": 2,
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": 2,
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )

    def two_streams(a: np.ndarray) -> None:
        queue = ov.AsyncInferQueue(streams, 2)
        for i in range(0, len(a), 32):
            queue.start_async({0: a[i : i + 32]})
        queue.wait_all()

    results["openvino int8 (default) + fp32, 2 streams x 32"] = rate(two_streams, x, args.reps)

    label, rate_ort, probs = ort_static_int8(model, calib, real, x, args.reps)
    results[label] = rate_ort
    agreement[label] = {
        "max_abs_prob_diff": float(np.abs(probs - ref).max()),
        "argmax_agreement": float((probs.argmax(1) == ref.argmax(1)).mean()),
    }

    fp32 = results["torch fp32 eager"]
    print(f"{args.model}, batch 64, network alone, 2 threads; {cpu_flags()}")
    print("| runtime | images/s | x torch fp32 eager | max abs prob diff | argmax agreement |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        a = agreement.get(label)
        extra = f"{a['max_abs_prob_diff']:.4f} | {a['argmax_agreement']:.3f}" if a else "– | –"
        print(f"| {label} | {r:.1f} | {r / fp32:.2f}x | {extra} |")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "batch": 64,
                    "threads": 2,
                    "cpu": cpu_flags(),
                    "openvino": ov.__version__,
                    "onnxruntime": importlib.metadata.version("onnxruntime"),
                    "nncf": nncf.__version__,
                    "torch": torch.__version__,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "images_per_s": {k: round(v, 2) for k, v in results.items()},
                    "agreement_with_torch_fp32_on_64_real_cells": agreement,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

"""Training and inference throughput (images/s) of the paper's 8 models on this machine.

For each model: one optimizer step (forward + backward + AdamW) and inference (forward, no grad)
at 224x224, in fp32 and in bf16 autocast + channels_last. Prints a Markdown table; with
``--out FILE`` also writes it (with date, machine and torch version) for docs/benchmarks.md.

    python benchmarks/bench_models.py [--models paper_cnn,resnet50] [--batch 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch

from marrowscope.config import ModelConfig
from marrowscope.engine.benchmark import machine_info
from marrowscope.models.registry import PAPER_MODELS, build_model
from marrowscope.utils.runtime import cpu_has_native_bf16


def measure(
    model: torch.nn.Module,
    batch: int,
    size: int,
    *,
    train: bool,
    bf16: bool,
    warmup: int,
    iters: int,
    min_seconds: float,
) -> float:
    """Images per second of ``model`` for one training step or one inference pass."""
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 7, (batch,))
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if train:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            else:
                with torch.no_grad():
                    model(x)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while n < iters or time.perf_counter() - t0 < min_seconds:
        step()
        n += 1
    return batch * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(PAPER_MODELS))
    ap.add_argument(
        "--extra",
        default="tf_efficientnet_lite0,mobilenetv2_100",
        help="more models measured after the paper's 8",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m] + [m for m in args.extra.split(",") if m]
    lines = [
        f"Measured {date.today().isoformat()} on {machine_info()['cpu']}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; native bf16: {cpu_has_native_bf16()}. Batch {args.batch}, "
        f"{args.size}x{args.size}, 7 classes; images/s (higher is better).",
        "",
        "| model | params (M) | train fp32 | train bf16+CL | infer fp32 | infer bf16+CL | "
        "infer speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, pretrained=False), 7, input_size=args.size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        kw = dict(
            batch=args.batch,
            size=args.size,
            warmup=1,
            iters=args.iters,
            min_seconds=args.min_seconds,
        )
        tr32 = measure(model, train=True, bf16=False, **kw)
        trbf = measure(model, train=True, bf16=True, **kw)
        model = model.to(memory_format=torch.contiguous_format)
        in32 = measure(model, train=False, bf16=False, **kw)
        inbf = measure(model, train=False, bf16=True, **kw)
        row = (
            f"| {name} | {params:.1f} | {tr32:.1f} | {trbf:.1f} | {in32:.1f} | {inbf:.1f} | "
            f"{inbf / in32:.2f}x |"
        )
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

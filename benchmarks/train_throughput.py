"""Where a training step's time goes on this machine, and training images/s per backbone.

For each backbone, on real cells of ``--data`` (decoded once into memory, as ``fit`` does), the
real training path (``CellDataset`` + ``train_transform`` in a ``DataLoader``, ``train_one_epoch``
with bf16 autocast + channels_last where the CPU has native bf16, AdamW, the paper's head):

- decode: JPEG -> RGB uint8 (a one-time cost: ``fit`` keeps the decoded cells in memory);
- augment: the per-cell augmentation of the config, alone (images/s);
- step: forward + backward + optimizer on a ready batch (images/s);
- end to end: ``train_one_epoch`` over ``--images`` cells (images/s), at each training size of the
  config's progressive-resizing schedule; a whole run's rate is then the harmonic mean over its
  epochs (``run img/s``), compared with the same run at the full size for every epoch.

    python benchmarks/train_throughput.py --config configs/bm-dev.yaml --out docs/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from marrowscope.config import load_config
from marrowscope.data.dataset import CellDataset
from marrowscope.data.scan import scan_folder
from marrowscope.engine.benchmark import machine_info
from marrowscope.engine.loops import train_one_epoch
from marrowscope.engine.train import train_size
from marrowscope.models.registry import build_model
from marrowscope.transforms.augment import to_tensor_image, train_transform
from marrowscope.utils.image import read_image
from marrowscope.utils.runtime import resolve_device, resolve_precision


def _rate(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/bm-dev.yaml")
    ap.add_argument(
        "--models",
        default="mobilenetv2_100,tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2",
    )
    ap.add_argument("--images", type=int, default=256, help="cells per end-to-end measurement")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    full = cfg.preprocess.size
    scan = scan_folder(Path(cfg.data.root), check_images=False, progress=False)
    files = [p for c in (cfg.data.classes or scan.files) for p in scan.files[c][:64]]
    files = files[: args.images]

    decode = _rate(len(files), lambda: [read_image(p) for p in files])
    images = [read_image(p) for p in files]
    labels = [i % 8 for i in range(len(images))]
    sizes = sorted({train_size(cfg, e) for e in range(1, cfg.train.epochs + 1)})
    schedule = [train_size(cfg, e) for e in range(1, cfg.train.epochs + 1)]
    aug = {}
    for s in sizes:
        tf = train_transform(cfg.augment, s)
        tensors = [to_tensor_image(a) for a in images]
        aug[s] = _rate(len(tensors), lambda tf=tf, tensors=tensors: [tf(t) for t in tensors])

    device = resolve_device("cpu")
    precision = resolve_precision(cfg.train.precision, device, cfg.train.channels_last)
    results: dict[str, object] = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.set,
        "images": len(images),
        "batch_size": cfg.train.batch_size,
        "precision": precision.name,
        "decode_img_s": round(decode, 1),
        "augment_img_s": {s: round(v, 1) for s, v in aug.items()},
        "schedule": schedule,
        "models": {},
    }
    print(
        f"decode {decode:.0f} img/s; augment " + ", ".join(f"{s}px {v:.0f}" for s, v in aug.items())
    )
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        mcfg = dataclasses.replace(cfg.model, name=name, pretrained=False)
        model = build_model(mcfg, 8, input_size=full).to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        per_size: dict[int, dict[str, float]] = {}
        for s in sizes:
            ds = CellDataset(images, labels, train_transform(cfg.augment, s))
            loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
            x = torch.rand(cfg.train.batch_size, 3, s, s)
            y = torch.randint(0, 8, (cfg.train.batch_size,))

            def steps(n: int, batch=((x, y),), model=model, opt=opt, loss_fn=loss_fn) -> None:
                for _ in range(n):
                    train_one_epoch(
                        model, batch, opt, loss_fn=loss_fn, device=device, precision=precision
                    )

            steps(1)  # warm-up
            step = _rate(cfg.train.batch_size * 3, lambda steps=steps: steps(3))
            stats = train_one_epoch(
                model, loader, opt, loss_fn=loss_fn, device=device, precision=precision
            )
            per_size[s] = {
                "step_img_s": round(step, 1),
                "end_to_end_img_s": round(stats.images_per_second, 1),
            }
            print(
                f"{name} {s}px: step {step:.1f} img/s, end to end {stats.images_per_second:.1f} img/s",
                flush=True,
            )
        e2e = {s: v["end_to_end_img_s"] for s, v in per_size.items()}
        run = len(schedule) / sum(1.0 / e2e[s] for s in schedule)
        results["models"][name] = {  # type: ignore[index]
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "per_size": per_size,
            "run_img_s_full_size": e2e[full],
            "run_img_s_schedule": round(run, 1),
        }
        print(
            f"{name}: a whole run {e2e[full]:.1f} img/s at {full}px -> {run:.1f} img/s with the schedule {schedule}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

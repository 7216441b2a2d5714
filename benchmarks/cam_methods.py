"""Which class activation map method explains a shipped model best? (docs/explain.md)

For each method of ``marrowscope.explain.gradcam.CAM_METHODS``, on real labelled cells
(a folder per class; the first ``--per-class`` images of each of the model's classes, in name
order), with the class the model predicts for the image (one view, fp32):

* **empty maps**: the share of cells whose map is zero everywhere (the method found no position
  that raises the class's score, so the overlay shows nothing);
* **faithfulness**, a deletion test in the manner of ROAD (Rong et al. 2022) with a blurred copy
  of the image as the replacement instead of ROAD's noisy linear imputation (~4 s per image
  here): at 10%, 25% and 50% of the pixels, replace the *most* relevant ones (MoRF) and,
  separately, the *least* relevant ones (LeRF) by the blurred image and read the predicted
  class's probability. score = mean(LeRF probability) - mean(MoRF probability): high when
  removing what the map points at hurts and removing what it ignores does not. Ties (an empty
  map) are broken by a fixed random order, and a map of pure noise is scored too (~0).

    python benchmarks/cam_methods.py bm8 ../shared/data/bm-cells-dev --out docs/results/cam-methods-bm8.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from marrowscope.explain.gradcam import CAM_METHODS, _fp32_model, compute_cams
from marrowscope.inference import Predictor
from marrowscope.transforms.augment import eval_transform
from marrowscope.utils.io import atomic_write_json

FRACTIONS = (0.10, 0.25, 0.50)
BLUR_SIGMA = 10.0


def _cells(root: Path, classes: list[str], per_class: int) -> list[Path]:
    out: list[Path] = []
    for c in classes:
        folder = root / c
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})
        out += files[:per_class]
    return out


def _probs(net: torch.nn.Module, batch: np.ndarray, size: int) -> np.ndarray:
    to_tensor = eval_transform(size)
    x = torch.stack([to_tensor(a) for a in batch])
    with torch.no_grad():
        return torch.softmax(net(x).float(), 1).numpy()


def _faithfulness(
    net: torch.nn.Module, arrays: np.ndarray, cams: np.ndarray, targets: np.ndarray, size: int
) -> dict[str, float]:
    """Mean predicted-class probability after removing the most / least relevant pixels."""
    rng = np.random.default_rng(0)
    blurred = np.stack([cv2.GaussianBlur(a, (0, 0), BLUR_SIGMA) for a in arrays])
    jitter = rng.random(cams.shape[1:], dtype=np.float32) * 1e-6  # one fixed order for ties
    morf, lerf = [], []
    for f in FRACTIONS:
        for most, store in ((True, morf), (False, lerf)):
            batch = arrays.copy()
            for i, cam in enumerate(cams):
                rank = (cam + jitter).ravel()
                k = int(round(f * rank.size))
                order = np.argsort(rank)
                idx = order[-k:] if most else order[:k]
                mask = np.zeros(rank.size, bool)
                mask[idx] = True
                mask = mask.reshape(cam.shape)
                batch[i][mask] = blurred[i][mask]
            p = _probs(net, batch, size)
            store.append(float(p[np.arange(len(p)), targets].mean()))
    return {
        "morf_probability": float(np.mean(morf)),
        "lerf_probability": float(np.mean(lerf)),
        "score": float(np.mean(lerf) - np.mean(morf)),
        "morf_by_fraction": dict(zip(map(str, FRACTIONS), morf, strict=True)),
        "lerf_by_fraction": dict(zip(map(str, FRACTIONS), lerf, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="shipped model name or checkpoint bundle folder")
    ap.add_argument("data", type=Path, help="labelled cells, a folder per class")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--methods", default=",".join(CAM_METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    predictor = Predictor.from_checkpoint(args.model, device="cpu", tta="none")
    classes = list(predictor.classes_)
    files = _cells(args.data, classes, args.per_class)
    if not files:
        sys.exit(f"{args.data}: no images in folders named after the model's classes {classes}")
    arrays = np.stack([predictor.preprocess(predictor.load(p)) for p in files])
    net = _fp32_model(predictor.model).eval()
    size = int(net.input_size)
    p0 = _probs(net, arrays, size)
    targets = p0.argmax(1)
    labels = [p.parent.name for p in files]
    report: dict[str, object] = {
        "model": str(args.model),
        "data": str(args.data),
        "cells": len(files),
        "per_class": args.per_class,
        "target_layer": type(net.target_layer()).__name__,
        "fractions": list(FRACTIONS),
        "blur_sigma": BLUR_SIGMA,
        "unperturbed_probability": float(p0[np.arange(len(p0)), targets].mean()),
        "accuracy_one_view": float(
            np.mean([classes[t] == y for t, y in zip(targets, labels, strict=True)])
        ),
        "methods": {},
    }
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        cams, _ = compute_cams(net, list(arrays), targets.tolist(), method=name)
        seconds = time.perf_counter() - t0
        empty = cams.reshape(len(cams), -1).max(1) < 1e-6
        by_class = {
            c: float(np.mean([e for e, y in zip(empty, labels, strict=True) if y == c]))
            for c in classes
            if c in labels
        }
        res = {
            "empty_share": float(empty.mean()),
            "empty_share_by_class": by_class,
            "seconds_per_cell": seconds / len(files),
            **_faithfulness(net, arrays, cams, targets, size),
        }
        report["methods"][name] = res  # type: ignore[index]
        rows.append((name, res))
    noise = np.random.default_rng(1).random((len(files), size, size), dtype=np.float32)
    report["noise_map"] = _faithfulness(net, arrays, noise, targets, size)
    rows.append(("(noise map)", {"empty_share": 0.0, **report["noise_map"]}))  # type: ignore[dict-item]

    print(f"{args.model} on {len(files)} cells of {args.data} ({args.per_class} per class)")
    print(f"{'method':22s} {'empty':>6s} {'MoRF p':>7s} {'LeRF p':>7s} {'score':>6s}")
    for name, r in rows:
        print(
            f"{name:22s} {r['empty_share']:6.3f} {r['morf_probability']:7.3f} "
            f"{r['lerf_probability']:7.3f} {r['score']:6.3f}"
        )
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

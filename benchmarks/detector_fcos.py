"""torchvision's FCOS against wbc2's CenterNet head, cross-validated on field-dev's train split.

Issue 14 names torchvision's detectors (FCOS, RetinaNet, Faster R-CNN) as the learned option;
marrowscope ships a CenterNet head (``models/detector.py``). This trains torchvision's
``FCOS`` (``torchvision.models.detection.FCOS``: its FCOSHead, its loss, its post-processing) on
the same frozen ImageNet MobileNetV2 trunk (stem and blocks 0-4, the offline weights), with
torchvision's ``FeaturePyramidNetwork`` on the trunk's stride-8 and stride-16 features, and feeds
it exactly what wbc2's recipe is trained on: the same fields brought to the working scale by the
same ruler, the same augmented windows (``configs/detect-fields.yaml``: scale jitter, turns,
pasted neighbours, colour), the same schedule (AdamW, warm-up, cosine, EMA, epochs), the same
folds as ``benchmarks/detector_cv.py`` (5, seed 0), the same threshold rule on the same tune
fields, and the same prediction path (the ruler, the working scale, the zero margin). Only the
head, its targets and its loss differ. The report has detector_cv.py's format, so the two pair
cell by cell:

    python benchmarks/detector_fcos.py --out runs/detector-cv/fcos
    python benchmarks/detector_cv.py compare runs/detector-cv/paste50/cv.json \\
        runs/detector-cv/fcos/cv.json --out docs/results/detector-cv/fcos-vs-paste50.json

The val split is not read.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from detector_cv import code_version, folds, write_run_report
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from touching_cells import GAPS
from touching_cells import run as touching_run

from marrowscope.data.fields import FieldRecord, read_field_manifest
from marrowscope.engine.detector_train import (
    _augment,
    _Backbone,
    _donors,
    _ema_update,
    _prepare,
    evaluate_fields,
    fit_threshold,
    format_scores,
    load_train_config,
    split_tune,
)
from marrowscope.inference.fields import TILE_SIDE, load_field, resolve_scale
from marrowscope.models.detector import CellDetector, to_input
from marrowscope.models.weights import load_offline_weights
from marrowscope.preprocess.fields import WORK_UM_PER_PX, rescale
from marrowscope.utils.runtime import seed_everything


class TrunkFPN(nn.Module):
    """The frozen MobileNetV2 trunk of :class:`CellDetector` (ImageNet normalisation inside) and
    torchvision's FPN on its stride-8 (32 ch) and stride-16 (96 ch) features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        det = CellDetector(width=width)
        self.source = load_offline_weights(_Backbone(det.backbone), "mobilenetv2_100")
        self.trunk = det
        for p in det.parameters():
            p.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork([32, 96], width)
        self.out_channels = width

    def train(self, mode: bool = True) -> TrunkFPN:
        super().train(mode)
        self.trunk.eval()  # frozen, batch norm statistics included
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        with torch.no_grad():
            c3, c4 = self.trunk.trunk(x)
        return self.fpn(OrderedDict([("p3", c3), ("p4", c4)]))


class NoResize(GeneralizedRCNNTransform):
    """torchvision's batching and box bookkeeping without its resizing: images arrive at the
    working scale already, as they do for the CenterNet head."""

    def resize(self, image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
        return image, target


def build_fcos(width: int, nms_iou: float) -> FCOS:
    backbone = TrunkFPN(width)
    # one point per cell of the stride-8 and stride-16 grids; FCOS sends a box to the stride-8
    # level while its largest centre-to-side distance is under 8 x 8 = 64 working pixels (15 um)
    anchors = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    model = FCOS(
        backbone,
        num_classes=1,
        anchor_generator=anchors,
        head=FCOSHead(width, 1, num_classes=1, num_convs=2),
        score_thresh=0.05,
        nms_thresh=nms_iou,
        detections_per_img=100,
        topk_candidates=1000,
    )
    model.transform = NoResize(192, 4096, [0.0] * 3, [1.0] * 3, size_divisible=32)
    return model


def detect_field(model: FCOS, rgb: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """One field through the ruler, to the working scale, with the zero margin; boxes back in
    the field's pixels (``model`` in eval mode)."""
    h, w = rgb.shape[:2]
    factor = resolve_scale(rgb).um_per_px / WORK_UM_PER_PX
    work = rescale(rgb, factor)
    wh, ww = work.shape[:2]
    if max(wh, ww) > TILE_SIDE:
        raise SystemExit(f"a {ww}x{wh} field at the working scale needs tiling")
    with torch.inference_mode():
        pred = model([torch.from_numpy(to_input(work, margin, "zero"))[0]])[0]
    boxes = pred["boxes"].numpy().astype(np.float64) - margin
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, ww)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, wh)
    ok = (boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)
    boxes = boxes[ok] / factor
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes, pred["scores"].numpy().astype(np.float64)[ok]


def detect(
    model: FCOS, records: list[FieldRecord], margin: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    model.eval()
    return [detect_field(model, load_field(r.path), margin) for r in records]


class FieldFCOS:
    """What ``touching_cells.run`` asks of a detector: ``detect(rgb)`` -> boxes and scores at
    the fitted threshold, ``name_``, ``min_score_``."""

    def __init__(self, model: FCOS, min_score: float, margin: int) -> None:
        self.model, self.min_score_, self.margin = model.eval(), min_score, margin
        self.name_ = "torchvision FCOS (wbc2's recipe)"

    def detect(self, rgb: np.ndarray, name: str | None = None) -> SimpleNamespace:
        boxes, scores = detect_field(self.model, rgb, self.margin)
        keep = scores >= self.min_score_
        return SimpleNamespace(boxes=boxes[keep], scores=scores[keep])


def train_fold(cfg: Any, records: list[FieldRecord], log_every: int) -> tuple[FCOS, float, dict]:
    """wbc2's training loop with FCOS in place of the CenterNet head; the fitted threshold."""
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    fit, tune = split_tune(records, cfg.tune_fraction, cfg.seed)
    t0 = time.perf_counter()
    prepared = _prepare(fit, cfg.scale_jitter)
    donors = _donors(prepared) if cfg.paste > 0 else None
    model = build_fcos(cfg.width, cfg.nms_iou)
    ema = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(prepared) / cfg.batch_size)
    total, warm = cfg.epochs * steps, steps

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    rng = np.random.default_rng(cfg.seed)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(len(prepared))
        sums: dict[str, float] = {}
        te = time.perf_counter()
        for b in range(steps):
            images, targets = [], []
            for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]:
                p = prepared[i]
                donor = None
                if donors and donors.get(p.origin):
                    pool = donors[p.origin]
                    donor = pool[int(rng.integers(len(pool)))]
                img, boxes = _augment(p, cfg, rng, donor)
                images.append(torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0))
                targets.append(
                    {
                        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.zeros(len(boxes), dtype=torch.int64),
                    }
                )
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_at(step)
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"FCOS loss diverged at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            _ema_update(ema, model, cfg.ema if step > warm else 0.0)
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / steps
        if epoch % log_every == 0 or epoch == cfg.epochs:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sums.items())
            print(
                f"  epoch {epoch}/{cfg.epochs}: {parts} ({time.perf_counter() - te:.0f} s)",
                flush=True,
            )
    results = detect(ema, tune, cfg.margin)
    thr, per = fit_threshold(results, tune)
    print(f"  threshold {thr} on {len(tune)} tune fields:\n{format_scores(per)}", flush=True)
    summary = {"train_minutes": round((time.perf_counter() - t0) / 60, 1)}
    return ema, thr, summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/detect-fields.yaml")
    ap.add_argument("--set", action="append", help="KEY=VALUE override of the recipe")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="fold seed (detector_cv.py's default)")
    ap.add_argument("--only-fold", type=int, help="train one fold and stop (a quick look)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument(
        "--touching",
        action="store_true",
        help="train once on the whole train split (its tune fields held out, as wbc2 was) and "
        "score the synthetic touching pairs of the tune fields (touching_cells.py --split tune)",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    overrides: dict[str, object] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = load_train_config(args.config, overrides)
    if cfg.pad != "zero" or cfg.cut:
        raise SystemExit("this comparison implements zero margins without cut windows only")
    code = code_version()
    records = read_field_manifest(cfg.data, split="train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.touching:
        model, thr, summary = train_fold(cfg, records, args.log_every)
        torch.save(model.state_dict(), out / "model.pt")
        result = touching_run(cfg.data, FieldFCOS(model, thr, cfg.margin), GAPS, "tune")
        result.pop("_examples")
        result.update(code=code, train_minutes=summary["train_minutes"])
        (out / "touching-tune.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / 'touching-tune.json'}")
        return
    fold_of = folds(records, args.folds, args.seed)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(records)
    thresholds, minutes = [], []
    t0 = time.perf_counter()
    for k in range(args.folds):
        if args.only_fold is not None and k != args.only_fold:
            continue
        train = [r for r, f in zip(records, fold_of, strict=True) if f != k]
        held = [i for i, f in enumerate(fold_of) if f == k]
        print(f"fold {k}: {len(train)} fields to train on, {len(held)} held out", flush=True)
        model, thr, summary = train_fold(cfg, train, args.log_every)
        thresholds.append(thr)
        minutes.append(summary["train_minutes"])
        for i, (boxes, scores) in zip(
            held, detect(model, [records[i] for i in held], cfg.margin), strict=True
        ):
            keep = scores >= thr
            results[i] = (boxes[keep], scores[keep])
        torch.save(model.state_dict(), out / f"fold{k}.pt")
        one = [records[i] for i in held]
        print(
            f"fold {k} held out:\n{format_scores(evaluate_fields([results[i] for i in held], one))}",
            flush=True,
        )
    if args.only_fold is not None:
        return
    write_run_report(
        out,
        [r for r in results if r is not None],
        records,
        cfg=cfg,
        overrides=overrides,
        args=args,
        code=code,
        thresholds=thresholds,
        minutes=minutes,
        started=t0,
        detector="torchvision FCOS (FCOSHead, 2 convs, GroupNorm) + FPN on the frozen trunk",
    )


if __name__ == "__main__":
    main()

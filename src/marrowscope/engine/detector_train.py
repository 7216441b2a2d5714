"""Training and measuring the white-cell detector on annotated fields (field-dev).

:func:`train_detector` trains :class:`~marrowscope.models.detector.CellDetector` on the train
split of a field set, holding out a stratified ``tune`` share of it (per origin) to pick the
epoch-free settings (the score threshold); the published ``val`` split is never seen. Each field
is brought to the detector's working scale by the same red-cell ruler the detector uses at
prediction time, so the ruler's own errors are part of what the network learns to tolerate, and
then jittered further in scale, rotated, flipped and colour-jittered (the four origins differ in
stain and camera).

:func:`evaluate_fields` runs any :class:`~marrowscope.inference.fields.FieldDetector` over
annotated fields and scores it per origin (recall / precision / F1 at an IoU, count error).

Train the shipped ``wbc2``'s recipe: ``python scripts/train_detector.py train --config
configs/detect-fields.yaml --out runs/wbc2`` (about 5 min on 2 quiet CPU cores, 5-7 s an epoch;
30-45 min when other jobs share the cores); ``--set paste=0 --set name=wbc1`` gives ``wbc1``'s
(the defaults of :class:`DetectorTrainConfig`). wbc1 itself was trained through the red-cell ruler
as it was before its fix of 2026-11-30 (commit 9aa960a or earlier).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml

from marrowscope.data.fields import FieldRecord, read_field_manifest, touches_border
from marrowscope.inference.fields import FieldDetector, load_field, resolve_scale
from marrowscope.metrics.detection import DetectionScores, scores_by_group
from marrowscope.models.detector import (
    MARGIN,
    STRIDE,
    CellDetector,
    DetectorMetadata,
    check_margins,
    pad_field,
    save_detector,
)
from marrowscope.models.weights import load_offline_weights
from marrowscope.preprocess.fields import WORK_UM_PER_PX, rescale
from marrowscope.utils.runtime import seed_everything

__all__ = [
    "DetectorTrainConfig",
    "centernet_loss",
    "evaluate_fields",
    "load_train_config",
    "make_targets",
    "mirror_boxes",
    "paste_neighbour",
    "train_detector",
]


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Settings of a detector training run (``configs/detect-fields.yaml``).

    Attributes:
        name: the detector's name.
        data: the field set folder (with ``MANIFEST.csv``).
        seed: seeds the tune split, the augmentation and the initialisation.
        tune_fraction: share of each origin's train fields held out to fit the score threshold.
        epochs: passes over the training fields.
        batch_size: fields per step.
        canvas: side of the square training window (working-scale pixels).
        lr: peak learning rate of the neck and heads (AdamW, cosine, 1 epoch warm-up); the
            ImageNet trunk stays frozen (it runs in ONNX Runtime during training, 5-8x faster than
            eager torch on a CPU, which makes training on 2 cores take minutes, not hours).
        weight_decay: AdamW weight decay.
        width: channels of the neck and heads.
        scale_jitter: extra scale change, drawn log-uniformly in ``[1/j, j]``.
        hue: largest hue shift (OpenCV units, 180 = full circle).
        gray: probability of a grayscale training field.
        cut: probability that a training window shows only a random part of the field (each
            side 50-100% of the field's), so that more cells are cut by the window's edge as the
            field's border cuts them (most misses are such cells); 0 keeps whole fields.
        pad: how a field's margin is filled, in training and (recorded in the bundle) at
            prediction time: ``zero`` (black, wbc1's recipe: fields lie on a zero canvas) or
            ``reflect`` (the field mirrored at its edges, :func:`mirror_boxes`).
        margin: the margin's width at prediction time (working pixels); with ``reflect`` also the
            width of the mirrored band around each training field.
        paste: probability that a training window gets a white cell of another training field
            of the same origin pasted beside one of its cells, touching or overlapping it (gap
            :data:`PASTE_GAPS`, feathered alpha blend, :func:`paste_neighbour`), so that the
            detector learns to box two close cells apart; the blood fields of field-dev almost
            never show them, bone-marrow smears show them all the time. 0 keeps wbc1's recipe.
        ema: decay of the exponential moving average of the weights that is saved.
        nms_iou: suppression overlap at prediction time.
        threads: CPU threads for torch.
        eval_every: measure on the tune fields every this many epochs.
    """

    name: str = "wbc1"
    data: str = "../shared/data/field-dev"
    seed: int = 42
    tune_fraction: float = 0.15
    epochs: int = 40
    batch_size: int = 32
    canvas: int = 224
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 64
    scale_jitter: float = 1.25
    hue: float = 10.0
    gray: float = 0.05
    cut: float = 0.0
    pad: str = "zero"
    margin: int = MARGIN
    paste: float = 0.0
    ema: float = 0.995
    nms_iou: float = 0.4
    threads: int = 2
    eval_every: int = 5

    def __post_init__(self) -> None:
        try:
            check_margins(self.pad, self.margin)
        except ValueError as e:
            raise ValueError(f"setting pad / margin: {e}") from None
        if not 0.0 <= self.paste <= 1.0:
            raise ValueError(f"setting paste: a probability in [0, 1], got {self.paste}")


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> DetectorTrainConfig:
    """Read a YAML config (unknown keys are an error) and apply overrides.

    Raises:
        ValueError: an unknown key or a value of the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        data.update(loaded)
    data.update(overrides or {})
    known = {f for f in DetectorTrainConfig.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown detector training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    defaults = DetectorTrainConfig()
    for k, v in data.items():
        want = type(getattr(defaults, k))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            data[k] = float(v)
            continue
        if isinstance(v, bool) != (want is bool) or not isinstance(v, want):
            raise ValueError(f"setting {k}: expected {want.__name__}, got {v!r}")
    return DetectorTrainConfig(**data)


# ------------------------------------------------------------------------------------ samples


@dataclass
class _Prepared:
    """A training field kept at a base scale a little above the working scale."""

    image: np.ndarray
    boxes: np.ndarray
    rest: float  # base -> working scale factor
    origin: str

    def whole(self) -> np.ndarray:
        """The boxes of the cells that the field's border does not cut (donors for pasting)."""
        h, w = self.image.shape[:2]
        return self.boxes[~touches_border(self.boxes, w, h, margin=2.0)]


def _prepare(records: Sequence[FieldRecord], jitter: float) -> list[_Prepared]:
    out = []
    for r in records:
        rgb = load_field(r.path)
        scale = resolve_scale(rgb)
        factor = scale.um_per_px / WORK_UM_PER_PX
        base = min(1.0, factor * jitter * 1.05)
        img = rescale(rgb, base)
        out.append(_Prepared(img, r.wbc * base, factor / base, r.origin))
    return out


def _colour(img: np.ndarray, rng: np.random.Generator, hue: float, gray: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[:, :, 0] = (hsv[:, :, 0] + rng.uniform(-hue, hue)) % 180
    hsv[:, :, 1] *= rng.uniform(0.7, 1.3)
    hsv[:, :, 2] *= rng.uniform(0.8, 1.2)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    contrast = rng.uniform(0.8, 1.2)
    out = (out - out.mean()) * contrast + out.mean()
    gamma = rng.uniform(0.8, 1.25)
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.2:
        out = out + rng.normal(0, rng.uniform(2, 6), out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < gray:
        g = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
        out = np.repeat(g[:, :, None], 3, axis=2)
    return out


def _shown(
    boxes: np.ndarray, ref_area: np.ndarray, x0: float, y0: float, x1: float, y1: float
) -> tuple[np.ndarray, np.ndarray]:
    """``boxes`` clipped to the rectangle, and which to keep: annotators box the visible part of
    a cell cut by the field's edge, so a box stays a target while at least 15% of ``ref_area``
    (and 6 px each way) is visible."""
    cx0, cy0 = np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1)
    cx1, cy1 = np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)
    visible = (cx1 - cx0) * (cy1 - cy0)
    keep = (visible >= 0.15 * np.maximum(ref_area, 1e-6)) & (cx1 - cx0 >= 6) & (cy1 - cy0 >= 6)
    return np.stack([cx0, cy0, cx1, cy1], axis=1), keep


_TOUCH = 1.0
"""A box within this many working pixels of the field's edge touches it (annotators' boxes of cut
cells end 0-3 source pixels short of the edge; fields are mostly shrunk 2-3x to the working
scale): it and its mirror image are then one object."""


def _mirror_axis(lo: float, hi: float, size: float, m: int) -> list[tuple[float, float, float]]:
    """The extents along one axis of a box ``[lo, hi]`` inside ``[0, size]`` once the field is
    mirrored on both sides (a band of ``min(m, size)``, zeros beyond, in a margin of ``m``), in
    padded coordinates: ``(start, end, factor)``, ``factor`` being how much longer than the box
    the extent is (a box joined with its mirror image; 1 otherwise)."""
    a, b = lo + m, hi + m
    left, right, band = float(m), float(m + size), float(min(m, size))
    start, end, copies = a, b, []
    if band > 0:
        if a <= left + _TOUCH:
            start = max(left - band, 2 * left - b)
        elif 2 * left - a > left - band:
            copies.append((max(left - band, 2 * left - b), 2 * left - a, 1.0))
        if b >= right - _TOUCH:
            end = min(right + band, 2 * right - a)
        elif 2 * right - b < right + band:
            copies.append((2 * right - b, min(right + band, 2 * right - a), 1.0))
    return [(start, end, (end - start) / max(b - a, 1e-6)), *copies]


def mirror_boxes(
    boxes: np.ndarray,
    width: int,
    height: int,
    margin: int,
    areas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The targets of a ``width`` x ``height`` field once mirrored on every side
    (:func:`~marrowscope.models.detector.pad_field` with ``reflect``), in padded coordinates.

    A cell touching the field's edge joins its mirror image into one symmetric object, centred
    on the edge (clipped to the field at prediction time, it is the visible part the annotators
    boxed); a cell near the edge gets a separate mirror image in the margin (dropped at prediction
    time: it lies outside the field), as does its image across a corner.

    Args:
        boxes: ``(N, 4)`` visible boxes inside the field.
        areas: the whole cells' areas (a cell may be cut by the field's edge or a training
            window's), by default the boxes' own.

    Returns:
        ``(boxes (M, 4), reference areas (M,))``: each target and the area against which its
        visible share is judged, as a cell's against its whole area: a mirror image's is its
        cell's, a cell joined with its image has its cell's area grown as the box grew.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    whole = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) if areas is None else np.asarray(areas)
    out, ref = [], []
    for (x0, y0, x1, y1), cell in zip(b, whole, strict=True):
        for xa, xb, fx in _mirror_axis(x0, x1, width, margin):
            for ya, yb, fy in _mirror_axis(y0, y1, height, margin):
                out.append((xa, ya, xb, yb))
                ref.append(cell * fx * fy)
    return np.asarray(out, np.float64).reshape(-1, 4), np.asarray(ref, np.float64)


def _turn(
    img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` and its ``(N, 4)`` boxes rotated by a random multiple of 90 degrees
    (counter-clockwise: (x, y) -> (y, W - x)) and flipped left-right with probability 1/2."""
    for _ in range(int(rng.integers(4))):
        w = img.shape[1]
        img = np.ascontiguousarray(np.rot90(img))
        boxes = np.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], axis=1)
    if rng.random() < 0.5:
        w = img.shape[1]
        img = np.ascontiguousarray(img[:, ::-1])
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return img, boxes


PASTE_GAPS = (-0.35, 0.25)
"""Range of the gap between a pasted cell and its neighbour, as a fraction of their mean diameter
(negative: they overlap by that much, as cells squashed together in a smear)."""
_PASTE_SURROUND = 0.2
"""Surround taken with a pasted cell, as a fraction of its longer side (the blend fades in it)."""


def paste_neighbour(
    img: np.ndarray,
    boxes: np.ndarray,
    donor: np.ndarray,
    cell: np.ndarray,
    factor: float,
    rng: np.random.Generator,
    tries: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with the white cell ``cell`` of the field ``donor`` (its box there) pasted beside
    one of ``boxes``, touching or overlapping it; returns the new image and boxes (the pasted
    cell's box appended).

    The donor cell and a surround of :data:`_PASTE_SURROUND` are resized by ``factor`` (to the
    window's scale), rotated by a multiple of 90 degrees and maybe flipped, and blended in with
    a feathered elliptic mask, its centre at ``(r1 + r2) * (1 + gap)`` from the neighbour's in a
    random direction (``r``: half the mean side of each box, ``gap`` uniform in
    :data:`PASTE_GAPS`). The image's edge may cut the pasted cell, as a field's edge cuts cells
    (its box is then the visible part); a placement that would show less than half of it, or
    cover more than half of another cell, is redrawn up to ``tries`` times; then the image is
    returned unchanged.
    """
    if not len(boxes):
        return img, boxes
    x0, y0, x1, y1 = (float(v) for v in cell)
    pad = _PASTE_SURROUND * max(x1 - x0, y1 - y0)
    dh, dw = donor.shape[:2]
    px0, py0 = int(max(0, math.floor(x0 - pad))), int(max(0, math.floor(y0 - pad)))
    px1, py1 = int(min(dw, math.ceil(x1 + pad))), int(min(dh, math.ceil(y1 + pad)))
    patch = rescale(np.ascontiguousarray(donor[py0:py1, px0:px1]), factor)
    sx, sy = patch.shape[1] / (px1 - px0), patch.shape[0] / (py1 - py0)
    b = np.array([[(x0 - px0) * sx, (y0 - py0) * sy, (x1 - px0) * sx, (y1 - py0) * sy]])
    patch, b = _turn(patch, b, rng)
    b = b[0]
    ph, pw = patch.shape[:2]
    mask = np.zeros((ph, pw), np.float32)
    centre = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    surround = _PASTE_SURROUND * max(b[2] - b[0], b[3] - b[1])
    axes = (
        int(round((b[2] - b[0]) / 2 + surround / 2)),
        int(round((b[3] - b[1]) / 2 + surround / 2)),
    )
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes, 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(surround / 3, 0.5))[:, :, None]
    h, w = img.shape[:2]
    r2 = ((b[2] - b[0]) + (b[3] - b[1])) / 4
    for _ in range(tries):
        n = boxes[int(rng.integers(len(boxes)))]
        r1 = ((n[2] - n[0]) + (n[3] - n[1])) / 4
        angle = rng.uniform(0, 2 * math.pi)
        dist = (r1 + r2) * (1 + rng.uniform(*PASTE_GAPS))
        cx = (n[0] + n[2]) / 2 + dist * math.cos(angle)
        cy = (n[1] + n[3]) / 2 + dist * math.sin(angle)
        ox, oy = int(round(cx - centre[0])), int(round(cy - centre[1]))
        new = np.clip(b + np.array([ox, oy, ox, oy]), 0, [w, h, w, h])
        if (new[2] - new[0]) * (new[3] - new[1]) < 0.5 * (b[2] - b[0]) * (b[3] - b[1]):
            continue  # at least half the cell in the window; its box is the visible part
        ix0, iy0 = np.maximum(boxes[:, 0], new[0]), np.maximum(boxes[:, 1], new[1])
        ix1, iy1 = np.minimum(boxes[:, 2], new[2]), np.minimum(boxes[:, 3], new[3])
        inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        covered = inter / np.maximum(area, 1e-6)
        if (covered > 0.5).any():  # the chosen neighbour too: a gap of -0.35 covers less
            continue
        out = img.copy()
        ax0, ay0, ax1, ay1 = max(ox, 0), max(oy, 0), min(ox + pw, w), min(oy + ph, h)
        m = mask[ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox]
        src = patch[ay0 - oy : ay1 - oy, ax0 - ox : ax1 - ox].astype(np.float32)
        region = out[ay0:ay1, ax0:ax1].astype(np.float32)
        out[ay0:ay1, ax0:ax1] = np.clip(m * src + (1 - m) * region + 0.5, 0, 255).astype(np.uint8)
        return out, np.concatenate([boxes, new[None]], axis=0)
    return img, boxes


def _augment(
    p: _Prepared,
    cfg: DetectorTrainConfig,
    rng: np.random.Generator,
    donor: _Prepared | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One training window: scale, rotate/flip, optionally a random part (``cfg.cut``), with
    probability ``cfg.paste`` a cell of ``donor`` pasted beside one of its cells
    (:func:`paste_neighbour`), colour, with ``cfg.pad == "reflect"`` mirrored at its edges
    (:func:`mirror_boxes`), placed on the zero canvas; boxes cut by the window's edge keep their
    visible part."""
    j = math.exp(rng.uniform(-math.log(cfg.scale_jitter), math.log(cfg.scale_jitter)))
    f = p.rest * j
    img = rescale(p.image, f)
    h, w = img.shape[:2]
    fx, fy = img.shape[1] / p.image.shape[1], img.shape[0] / p.image.shape[0]
    boxes = p.boxes * np.array([fx, fy, fx, fy])
    img, boxes = _turn(img, boxes, rng)
    h, w = img.shape[:2]
    if cfg.cut > 0 and rng.random() < cfg.cut:
        # a random part of the field: the cells its edges cut are clipped below like the others
        cw, ch = int(round(w * rng.uniform(0.5, 1.0))), int(round(h * rng.uniform(0.5, 1.0)))
        ox, oy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = np.ascontiguousarray(img[oy : oy + ch, ox : ox + cw])
        boxes = boxes - np.array([ox, oy, ox, oy])
        h, w = ch, cw
    if donor is not None and cfg.paste > 0 and rng.random() < cfg.paste:
        cells = donor.whole()
        if len(cells):
            cell = cells[int(rng.integers(len(cells)))]
            img, boxes = paste_neighbour(img, boxes, donor.image, cell, donor.rest * j, rng)
    img = _colour(img, rng, cfg.hue, cfg.gray)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if cfg.pad == "reflect":
        boxes, keep = _shown(boxes, area, 0, 0, w, h)
        boxes, area = mirror_boxes(boxes[keep], w, h, cfg.margin, area[keep])
        img = pad_field(img, cfg.margin, "reflect")
        h, w = img.shape[:2]
    c = cfg.canvas
    canvas = np.zeros((c, c, 3), np.uint8)
    # window of the image shown, and where it lands on the canvas
    sx = int(rng.integers(0, w - c + 1)) if w > c else 0
    sy = int(rng.integers(0, h - c + 1)) if h > c else 0
    dx = int(rng.integers(0, c - w + 1)) if w < c else 0
    dy = int(rng.integers(0, c - h + 1)) if h < c else 0
    part = img[sy : sy + c, sx : sx + c]
    canvas[dy : dy + part.shape[0], dx : dx + part.shape[1]] = part
    boxes = boxes + np.array([dx - sx, dy - sy, dx - sx, dy - sy])
    shown, keep = _shown(boxes, area, dx, dy, dx + part.shape[1], dy + part.shape[0])
    return canvas, shown[keep]


def make_targets(boxes: np.ndarray, out_h: int, out_w: int) -> dict[str, np.ndarray]:
    """CenterNet targets of one window: Gaussian heat map, and size/offset at the centres.

    Returns:
        ``heat (out_h, out_w)``, ``size (2, out_h, out_w)`` log width/height in grid units,
        ``offset (2, out_h, out_w)`` and ``mask (out_h, out_w)`` (1 at object centres).
    """
    heat = np.zeros((out_h, out_w), np.float32)
    size = np.zeros((2, out_h, out_w), np.float32)
    offset = np.zeros((2, out_h, out_w), np.float32)
    mask = np.zeros((out_h, out_w), np.float32)
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    for x0, y0, x1, y1 in boxes:
        bw, bh = (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
        if bw <= 0.5 or bh <= 0.5:
            continue
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        ix, iy = min(int(cx), out_w - 1), min(int(cy), out_h - 1)
        sigma = max(0.7, (bw + bh) / 2 / 6)
        g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
        np.maximum(heat, g, out=heat)
        heat[iy, ix] = 1.0
        size[:, iy, ix] = (math.log(bw), math.log(bh))
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1.0
    return {"heat": heat, "size": size, "offset": offset, "mask": mask}


def centernet_loss(
    out: torch.Tensor, t: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Penalty-reduced focal loss on the heat map + L1 on log size and offset at the centres."""
    logits = out[:, 0].float()
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    gt = t["heat"]
    pos = gt.eq(1).float()
    neg_w = torch.pow(1 - gt, 4)
    pos_loss = (torch.log(p) * torch.pow(1 - p, 2) * pos).sum()
    neg_loss = (torch.log(1 - p) * torch.pow(p, 2) * neg_w * (1 - pos)).sum()
    n = pos.sum().clamp(min=1.0)
    focal = -(pos_loss + neg_loss) / n
    m = t["mask"].unsqueeze(1)
    size = (torch.abs(out[:, 1:3].float() - t["size"]) * m).sum() / n
    off = (torch.abs(out[:, 3:5].float() - t["offset"]) * m).sum() / n
    loss = focal + size + off
    return loss, {
        "focal": float(focal.detach()),
        "size": float(size.detach()),
        "offset": float(off.detach()),
    }


def _donors(prepared: Sequence[_Prepared]) -> dict[str, list[_Prepared]]:
    """Per origin, the training fields with a cell their border does not cut."""
    out: dict[str, list[_Prepared]] = {}
    for p in prepared:
        if len(p.whole()):
            out.setdefault(p.origin, []).append(p)
    return out


def _batch(
    items: Sequence[_Prepared],
    cfg: DetectorTrainConfig,
    rng: np.random.Generator,
    donors: dict[str, list[_Prepared]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    imgs, targets = [], []
    o = cfg.canvas // STRIDE
    for p in items:
        donor = None
        if cfg.paste > 0 and donors and donors.get(p.origin):
            pool = donors[p.origin]
            donor = pool[int(rng.integers(len(pool)))]
        img, boxes = _augment(p, cfg, rng, donor)
        imgs.append(img)
        targets.append(make_targets(boxes, o, o))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
    t = {k: torch.from_numpy(np.stack([d[k] for d in targets])) for k in targets[0]}
    return x, t


# ------------------------------------------------------------------------------- measurement


def detect_all(
    detector: FieldDetector, records: Sequence[FieldRecord]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes and scores of every field (the detector's own threshold applies)."""
    return [(d.boxes, d.scores) for d in (detector.detect(load_field(r.path)) for r in records)]


def evaluate_fields(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[FieldRecord],
    *,
    min_score: float = 0.0,
    iou: float = 0.5,
) -> dict[str, DetectionScores]:
    """Per-origin scores of detections (those scoring at least ``min_score``), plus ``all``."""
    rows = []
    for (boxes, scores), r in zip(results, records, strict=True):
        keep = scores >= min_score
        rows.append((r.origin, boxes[keep], scores[keep], r.wbc))
    per = dict(scores_by_group(rows, iou=iou))
    per["all"] = scores_by_group([("all", *row[1:]) for row in rows], iou=iou)["all"]
    return per


def fit_threshold(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    records: Sequence[FieldRecord],
    grid: Sequence[float] = tuple(np.round(np.arange(0.10, 0.81, 0.025), 3)),
    tolerance: float = 0.005,
) -> tuple[float, dict[str, DetectionScores]]:
    """The score threshold: the middle of the range of thresholds whose worst-origin F1 is
    within ``tolerance`` of the best (on a few hundred tune cells the F1 is flat over a range;
    its edge is the least robust choice)."""
    table = []
    for thr in grid:
        per = evaluate_fields(results, records, min_score=float(thr))
        worst = min(s.f1 for g, s in per.items() if g != "all")
        table.append((float(thr), worst, per))
    best = max(w for _, w, _ in table)
    good = [i for i, (_, w, _) in enumerate(table) if w >= best - tolerance]
    # the longest run of consecutive good thresholds that holds the best one
    top = max(range(len(table)), key=lambda i: (table[i][1], -i))
    lo = hi = top
    while lo - 1 in good:
        lo -= 1
    while hi + 1 in good:
        hi += 1
    thr, _, per = table[(lo + hi) // 2]
    return thr, per


def format_scores(per: dict[str, DetectionScores]) -> str:
    """One line per origin: R / P / F1 / count error."""
    return "\n".join(
        f"  {g:<11} R {s.recall:.3f}  P {s.precision:.3f}  F1 {s.f1:.3f}  "
        f"(tp {s.counts.tp}, fp {s.counts.fp}, fn {s.counts.fn})  |count err| {s.count_error:.3f}"
        for g, s in per.items()
    )


# ----------------------------------------------------------------------------------- training


def split_tune(
    records: Sequence[FieldRecord], fraction: float, seed: int
) -> tuple[list[FieldRecord], list[FieldRecord]]:
    """Hold out ``fraction`` of each origin's fields (seeded), returns ``(fit, tune)``."""
    rng = np.random.default_rng(seed)
    fit, tune = [], []
    for origin in sorted({r.origin for r in records}):
        group = [r for r in records if r.origin == origin]
        order = rng.permutation(len(group))
        n_tune = round(fraction * len(group))
        tune += [group[i] for i in order[:n_tune]]
        fit += [group[i] for i in order[n_tune:]]
    return fit, tune


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(m.detach(), alpha=1 - decay)
            else:
                e.copy_(m)


def train_detector(
    cfg: DetectorTrainConfig,
    out_dir: str | Path,
    *,
    records: Sequence[FieldRecord] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Train the detector, fit its score threshold on the tune fields, save the bundle.

    ``records`` are the fields to train on (the tune fields are carved out of them); by default
    the train split of ``cfg.data`` (cross-validation passes a subset of it).

    Returns:
        ``(bundle folder, summary)``: the summary holds the tune-field scores and timings (also
        written to ``OUT/summary.json``; the per-epoch log goes to ``OUT/log.jsonl``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if records is None:
        records = read_field_manifest(cfg.data, split="train")
    fit, tune = split_tune(records, cfg.tune_fraction, cfg.seed)
    log(f"{len(fit)} training fields, {len(tune)} tune fields (held out of the train split)")
    t0 = time.perf_counter()
    prepared = _prepare(fit, cfg.scale_jitter)
    donors = _donors(prepared) if cfg.paste > 0 else None
    log(f"prepared at the working scale in {time.perf_counter() - t0:.0f} s")

    model = CellDetector(width=cfg.width)
    source = load_offline_weights(_Backbone(model.backbone), "mobilenetv2_100")
    log(f"backbone (frozen): {source}")
    trunk = _trunk_session(model, cfg.threads)
    ema = copy.deepcopy(model).eval()
    params = model.trained_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(prepared) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    rng = np.random.default_rng(cfg.seed)
    meta = DetectorMetadata(
        cfg.name, cfg.width, WORK_UM_PER_PX, 0.3, cfg.nms_iou, pad=cfg.pad, margin=cfg.margin
    )
    step = 0
    history: list[dict[str, Any]] = []
    log_path = out / "log.jsonl"
    log_path.write_text("")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        model.backbone.eval()
        order = rng.permutation(len(prepared))
        t_epoch = time.perf_counter()
        sums: dict[str, float] = {"loss": 0.0, "focal": 0.0, "size": 0.0, "offset": 0.0}
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x, t = _batch([prepared[i] for i in idx], cfg, rng, donors)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_at(step)
            c3, c4 = trunk.run(None, {"images": x.numpy()})
            pred = model.rest(torch.from_numpy(c3), torch.from_numpy(c4))
            loss, parts = centernet_loss(pred, t)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the detector's loss diverged at epoch {epoch}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            _ema_update(ema, model, cfg.ema if step > warm else 0.0)
            step += 1
            sums["loss"] += float(loss)
            for k, v in parts.items():
                sums[k] += v
        secs = time.perf_counter() - t_epoch
        rec: dict[str, Any] = {
            "epoch": epoch,
            **{k: v / steps_per_epoch for k, v in sums.items()},
            "seconds": round(secs, 1),
            "fields_per_s": round(len(prepared) / secs, 1),
        }
        msg = f"epoch {epoch}/{cfg.epochs}: loss {rec['loss']:.3f} (focal {rec['focal']:.3f}, size {rec['size']:.3f}, offset {rec['offset']:.3f}) {secs:.0f} s"
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            det = FieldDetector.from_model(ema, meta, min_score=0.05)
            results = detect_all(det, tune)
            thr, per = fit_threshold(results, tune)
            rec["tune"] = {"min_score": thr, **{g: s.to_dict() for g, s in per.items()}}
            msg += f"\n  tune fields at min_score {thr}:\n{format_scores(per)}"
        log(msg)
        history.append(rec)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    det = FieldDetector.from_model(ema, meta, min_score=0.05)
    results = detect_all(det, tune)
    thr, per = fit_threshold(results, tune)
    summary = {
        "config": asdict(cfg),
        "fit_fields": len(fit),
        "tune_fields": len(tune),
        "min_score": thr,
        "tune": {g: s.to_dict() for g, s in per.items()},
        "backbone": source,
        "train_minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    final = DetectorMetadata(
        cfg.name,
        cfg.width,
        WORK_UM_PER_PX,
        thr,
        cfg.nms_iou,
        pad=cfg.pad,
        margin=cfg.margin,
        extra={"training": summary, "torch_version": torch.__version__},
    )
    bundle = save_detector(out / "bundle", ema, final)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log(f"score threshold {thr} (best worst-origin F1 on the tune fields)\n{format_scores(per)}")
    log(f"wrote {bundle}")
    return bundle, summary


class _Trunk(torch.nn.Module):
    def __init__(self, model: CellDetector) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.trunk(x)


def _trunk_session(model: CellDetector, threads: int) -> Any:
    """The frozen ImageNet trunk in ONNX Runtime (features for the trained part)."""
    import io

    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(
        _Trunk(model).eval(),
        (torch.zeros(1, 3, 64, 64),),
        buf,
        input_names=["images"],
        output_names=["c3", "c4"],
        dynamic_axes={
            "images": {0: "n", 2: "h", 3: "w"},
            "c3": {0: "n", 2: "h8", 3: "w8"},
            "c4": {0: "n", 2: "h16", 3: "w16"},
        },
        opset_version=17,
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


class _Backbone(torch.nn.Module):
    """The detector's backbone seen as timm's full model, so the offline ImageNet file (whose
    tensors are mapped by position onto ``mobilenetv2_100``) loads into the blocks it keeps."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.inner = backbone

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return _full_state(self.inner)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        own = self.inner.state_dict()
        kept = {k: v for k, v in state.items() if k in own}
        return self.inner.load_state_dict(kept, strict=True)


def _full_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a full ``mobilenetv2_100`` (num_classes=0) with this backbone's values
    where it has them: the key order the offline file maps onto by position."""
    import timm

    full = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0).state_dict()
    own = backbone.state_dict()
    return {k: own.get(k, v) for k, v in full.items()}

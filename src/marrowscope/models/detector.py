"""The learned white-cell detector: a small CenterNet on the first blocks of MobileNetV2.

The network sees a field rescaled to the working scale (:data:`~marrowscope.preprocess.fields.
WORK_UM_PER_PX`: a red cell 32 pixels across, measured by the red-cell ruler) and predicts, on a
grid of stride 8, a white-cell *centre* heat map, the box size (log of width and height in grid
units) and the sub-cell offset of the centre (Zhou et al. 2019, "Objects as Points"). A box is
read off every local maximum of the heat map; its score is the heat value.

Backbone: timm's ``mobilenetv2_100`` up to stride 16 (stem and blocks 0-4), with the offline
ImageNet weights (:mod:`marrowscope.models.weights`), kept frozen; a two-level neck merges strides
16 and 8 and the heads run at stride 8 (dense 3x3 convolutions, 64 channels: the part trained). Input: RGB float ``[0, 1]`` NCHW, normalised
inside the model, sides a multiple of 32 (:func:`pad_to_stride` pads with zeros).

A detector bundle is a folder: ``model.safetensors`` (float32 weights), ``model.onnx`` (the same
network for ONNX Runtime: the inference path, 5-8x faster than eager torch on a CPU) and
``metadata.json`` (format, architecture, working scale, score threshold, NMS IoU, the field's
margins, training settings and the validation numbers). The shipped detectors are listed with
their sha256 in ``pretrained/detectors.json`` and checked on every load, like the shipped
classifiers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from marrowscope.models.bundle import (
    PRETRAINED_DIR,
    BundleError,
    read_shipped_index,
    verify_shipped_files,
)
from marrowscope.utils.boxes import nms
from marrowscope.utils.io import atomic_write, atomic_write_bytes, atomic_write_json

__all__ = [
    "shipped_detector_name",
    "DETECTORS_INDEX",
    "DETECTOR_FORMAT",
    "CellDetector",
    "DetectorMetadata",
    "check_margins",
    "decode_maps",
    "detector_index",
    "load_detector",
    "pad_field",
    "pad_to_stride",
    "pretrained_detector",
    "save_detector",
    "shipped_detector_name",
]

DETECTOR_FORMAT = 2
"""Version of the detector bundle layout; newer bundles are refused. Format 2 added mirrored
margins (``pad``, ``margin``); a bundle with zero margins is still written as format 1, which
earlier marrowscope versions read."""

DETECTORS_INDEX = "detectors.json"
"""The list of shipped detectors (name -> description and sha256 per file), in ``pretrained/``."""

STRIDE = 8
PAD_MULTIPLE = 32
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU (dense: fast to train on a CPU, unlike depthwise)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CellDetector(nn.Module):
    """MobileNetV2 (to stride 16) + a two-level neck + CenterNet heads at stride 8.

    Args:
        width: channels of the neck and heads.

    The forward pass returns one tensor ``(N, 5, H/8, W/8)``: channel 0 the centre heat-map
    logits, 1-2 the log box width and height in grid units, 3-4 the centre offset in ``[0, 1)``.
    :meth:`trunk` (the ImageNet part, frozen in training) and :meth:`rest` (the trained part)
    split the same computation.
    """

    stride = STRIDE

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        bb = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
        # keep the stem and blocks 0-4 (strides 2-16); drop blocks 5-6 and the 1280-channel head
        bb.blocks = bb.blocks[:5]
        bb.conv_head = nn.Identity()
        bb.bn2 = nn.Identity()
        self.backbone = bb
        self.width = width
        self.lat3 = nn.Conv2d(32, width, 1)
        self.lat4 = nn.Conv2d(96, width, 1)
        self.context = _conv_bn(width, width)
        self.head = nn.Sequential(_conv_bn(width, width), _conv_bn(width, width))
        self.out = nn.Conv2d(width, 5, 1)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[0] = -math.log((1 - 0.05) / 0.05)  # heat prior 5%
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3, c4 = self.trunk(x)
        return self.rest(c3, c4)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ImageNet part: stem and blocks 0-4 -> features at strides 8 (32 ch) and 16 (96 ch)."""
        bb = self.backbone
        x = (x - self.mean) / self.std
        x = bb.bn1(bb.conv_stem(x))
        for i in range(3):
            x = bb.blocks[i](x)
        c3 = x
        for i in range(3, 5):
            x = bb.blocks[i](x)
        return c3, x

    def rest(self, c3: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        """The neck and heads -> the output maps."""
        p4 = self.context(self.lat4(c4))
        p3 = self.lat3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        out = self.out(self.head(p3))
        return torch.cat([out[:, :3], torch.sigmoid(out[:, 3:5])], dim=1)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the frozen ImageNet trunk."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]


# ---------------------------------------------------------------------------- pre/post-process


def pad_to_stride(rgb: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """``rgb`` padded with zeros at the bottom and right to sides that are multiples of 32."""
    h, w = rgb.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return rgb
    return cv2.copyMakeBorder(rgb, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))


MARGIN = 16
"""Zeros around a field at prediction time: in training, fields lie at random places on a zero
canvas, so the network knows a field's edge as the edge of a black margin."""

PAD_MODES = ("zero", "reflect")
"""How a field's margin is filled: ``zero`` (black, wbc1) or ``reflect`` (the field mirrored at
its edges, so a cell cut by the border shows as a whole, symmetric cell; trained so, see
:func:`marrowscope.engine.detector_train.mirror_boxes`)."""

INSIDE_SHARE = 0.35
"""With ``reflect`` margins, a box is kept only if this share of its width and of its height lies
inside the field (a bundle's default ``inside_share``): a cell cut by the border is predicted as
itself plus its mirror image (half of it inside), a mirror image of a cell near the border lies
wholly outside."""


def check_margins(pad: str, margin: int) -> None:
    """Raise ``ValueError`` unless ``pad`` is one of :data:`PAD_MODES` and ``margin`` is a whole
    number of working pixels in 0-256."""
    if pad not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad!r}; use one of {', '.join(PAD_MODES)}")
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 256:
        raise ValueError(f"margin {margin!r} is not a whole number of working pixels in 0-256")


def pad_field(rgb: np.ndarray, margin: int, mode: str = "zero") -> np.ndarray:
    """``rgb`` with ``margin`` pixels on every side: zeros, or the field mirrored at its edges
    (OpenCV's ``BORDER_REFLECT``: the edge pixel repeated, ``cba|abc``) — once: a field narrower
    than the margin is mirrored across its own width and the rest of the margin is zeros."""
    check_margins(mode, margin)
    if not margin:
        return rgb
    if mode == "reflect":
        h, w = rgb.shape[:2]
        my, mx = min(margin, h), min(margin, w)
        rgb = cv2.copyMakeBorder(rgb, my, my, mx, mx, cv2.BORDER_REFLECT)
        if my == margin and mx == margin:
            return rgb
        dy, dx = margin - my, margin - mx
        return cv2.copyMakeBorder(rgb, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return cv2.copyMakeBorder(
        rgb, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )


def to_input(rgb: np.ndarray, margin: int = MARGIN, mode: str = "zero") -> np.ndarray:
    """RGB HWC uint8 -> float32 ``(1, 3, H, W)`` in ``[0, 1]``: ``margin`` pixels on every side
    (:func:`pad_field`), then zeros at the bottom and right up to sides that are multiples of 32."""
    rgb = pad_field(rgb, margin, mode)
    x = pad_to_stride(rgb).astype(np.float32).transpose(2, 0, 1)[None]
    x *= 1.0 / 255.0
    return np.ascontiguousarray(x)


def decode_maps(
    maps: np.ndarray,
    *,
    min_score: float,
    nms_iou: float,
    width: int,
    height: int,
    margin: int = 0,
    min_inside: float = 0.0,
    max_boxes: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and scores from one image's output maps ``(5, h, w)``.

    Every 3x3 local maximum of the heat map with a score of at least ``min_score`` gives a box
    (centre = cell + offset, size = exp(log size), in grid units times the stride); boxes are
    moved back by the ``margin`` the input was padded with (:func:`to_input`), clipped to
    ``width`` x ``height`` (the image before padding), dropped unless ``min_inside`` of their
    width and of their height was inside it (:data:`INSIDE_SHARE` for mirrored margins, 0 keeps
    all), and overlapping ones suppressed (IoU above ``nms_iou``).

    Returns:
        ``(boxes (N, 4), scores (N,))`` in input pixels, best first.
    """
    heat = 1.0 / (1.0 + np.exp(-maps[0].astype(np.float32)))
    peaks = (heat >= cv2.dilate(heat, np.ones((3, 3), np.uint8))) & (heat >= min_score)
    ys, xs = np.nonzero(peaks)
    if len(ys) == 0:
        return np.zeros((0, 4)), np.zeros(0)
    scores = heat[ys, xs].astype(np.float64)
    if len(scores) > max_boxes:
        top = np.argsort(-scores)[:max_boxes]
        ys, xs, scores = ys[top], xs[top], scores[top]
    cx = (xs + maps[3, ys, xs]) * STRIDE - margin
    cy = (ys + maps[4, ys, xs]) * STRIDE - margin
    bw = np.exp(np.clip(maps[1, ys, xs], -4, 6)) * STRIDE
    bh = np.exp(np.clip(maps[2, ys, xs], -4, 6)) * STRIDE
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).astype(
        np.float64
    )
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    ok = (boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)
    if min_inside > 0:
        ok &= (boxes[:, 2] - boxes[:, 0] >= min_inside * bw) & (
            boxes[:, 3] - boxes[:, 1] >= min_inside * bh
        )
    boxes, scores = boxes[ok], scores[ok]
    keep = nms(boxes, scores, nms_iou)
    return boxes[keep], scores[keep]


# ------------------------------------------------------------------------------------- bundles


_METADATA_KEYS = frozenset(
    {"format", "kind", "arch", "name", "width", "work_um_per_px", "min_score", "nms_iou"}
    | {"pad", "margin", "inside_share"}
)
"""The keys of ``metadata.json`` that :class:`DetectorMetadata` writes itself."""


@dataclass(frozen=True)
class DetectorMetadata:
    """What travels with a detector's weights (``metadata.json``).

    Attributes:
        name: the detector's name (``wbc1``).
        width: channels of the neck and heads.
        work_um_per_px: the scale the network sees (micrometres per pixel).
        min_score: the default score threshold (fitted on held-out training fields).
        nms_iou: boxes overlapping more than this are suppressed.
        pad: how the field's margin is filled at prediction time (:data:`PAD_MODES`), as in
            training.
        margin: the margin's width in working-scale pixels.
        inside_share: with mirrored margins, the share of a box's width and height that must
            lie inside the field (:data:`INSIDE_SHARE`).
        extra: everything else (training settings, validation numbers, provenance).
    """

    name: str
    width: int
    work_um_per_px: float
    min_score: float
    nms_iou: float
    extra: dict[str, Any] = field(default_factory=dict)
    pad: str = field(default="zero", kw_only=True)
    margin: int = field(default=MARGIN, kw_only=True)
    inside_share: float = field(default=INSIDE_SHARE, kw_only=True)

    def __post_init__(self) -> None:
        check_margins(self.pad, self.margin)
        share = self.inside_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
            raise ValueError(f"inside_share {share!r} is not a number in [0, 1)")
        reserved = sorted(set(self.extra) & _METADATA_KEYS)
        if reserved:
            raise ValueError(f"extra metadata cannot set {', '.join(reserved)}")

    @property
    def min_inside(self) -> float:
        """The share of a box that must lie inside the field (0 without mirrored margins)."""
        return self.inside_share if self.pad == "reflect" and self.margin else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metadata.json`` (format 1, which marrowscope read before
        mirrored margins, while the margins are wbc1's: 16 px of zeros)."""
        core = {
            "format": DETECTOR_FORMAT,
            "kind": "detector",
            "arch": "centernet_mobilenetv2_s8",
            "name": self.name,
            "width": self.width,
            "work_um_per_px": self.work_um_per_px,
            "min_score": self.min_score,
            "nms_iou": self.nms_iou,
            "pad": self.pad,
            "margin": self.margin,
            "inside_share": self.inside_share,
        }
        if self.pad == "zero" and self.margin == MARGIN and self.inside_share == INSIDE_SHARE:
            core["format"] = 1
            for key in ("pad", "margin", "inside_share"):
                del core[key]
        return {**core, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> DetectorMetadata:
        """Read and check ``metadata.json``.

        Raises:
            BundleError: not a detector's metadata, too new, or a missing/mistyped key.
        """
        if not isinstance(data, Mapping) or data.get("kind") != "detector":
            raise BundleError(
                f'{source}: not a white-cell detector bundle (no "kind": "detector"); pass a '
                "folder written by scripts/train_detector.py or a shipped detector name"
            )
        fmt = data.get("format")
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise BundleError(f"{source}: invalid detector format {fmt!r}; re-save the detector")
        if fmt > DETECTOR_FORMAT:
            raise BundleError(
                f"{source}: detector format {fmt!r} is newer than this marrowscope reads "
                f"({DETECTOR_FORMAT}); upgrade marrowscope"
            )
        try:
            core = {
                "name": str(data["name"]),
                "width": int(data["width"]),
                "work_um_per_px": float(data["work_um_per_px"]),
                "min_score": float(data["min_score"]),
                "nms_iou": float(data["nms_iou"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(
                f"{source}: missing or invalid key in the detector metadata ({e})"
            ) from None
        # format 1 (wbc1) has no such keys: margins of MARGIN zeros
        margins = {"pad": "zero", "margin": MARGIN, "inside_share": INSIDE_SHARE}
        if fmt >= 2:
            margins.update({k: data[k] for k in margins if k in data})
        elif any(k in data for k in margins):
            raise BundleError(
                f"{source}: format 1 metadata cannot set pad, margin or inside_share (format 2 "
                "does); re-save the detector"
            )
        skip = {"format", "kind", "arch", *core, *margins}
        extra = {k: v for k, v in data.items() if k not in skip}
        try:
            return cls(**core, **margins, extra=extra)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise BundleError(f"{source}: {e}") from None


def save_detector(
    folder: str | Path, model: CellDetector, meta: DetectorMetadata, *, onnx: bool = True
) -> Path:
    """Write a detector bundle: weights, metadata and (``onnx=True``) the ONNX export."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    if onnx:
        export_onnx(model, out / ONNX_FILE)
    atomic_write_json(out / METADATA_FILE, meta.to_dict())
    return out


def export_onnx(model: CellDetector, path: Path) -> None:
    """Export ``model`` to ONNX with a dynamic batch, height and width (atomically)."""
    import io

    m = model.eval().float().cpu()
    x = torch.zeros(1, 3, 160, 224)
    buf = io.BytesIO()
    torch.onnx.export(
        m,
        (x,),
        buf,
        input_names=["images"],
        output_names=["maps"],
        dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "maps": {0: "n", 2: "h8", 3: "w8"}},
        opset_version=17,
        dynamo=False,
    )
    atomic_write_bytes(path, buf.getvalue())


def read_detector_metadata(folder: str | Path) -> DetectorMetadata:
    """The metadata of a detector bundle folder.

    Raises:
        BundleError: missing or invalid ``metadata.json``.
    """
    path = Path(folder) / METADATA_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(
            f"{path}: no detector metadata here; pass a detector bundle folder or a shipped "
            f"detector name ({', '.join(sorted(detector_index())) or 'none installed'})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable detector metadata ({e})") from None
    return DetectorMetadata.from_dict(data, str(path))


def load_detector(folder: str | Path) -> tuple[CellDetector, DetectorMetadata]:
    """The torch model and metadata of a detector bundle (for training and export).

    Raises:
        BundleError: missing or damaged files.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_detector_metadata(folder)
    model = CellDetector(width=meta.width)
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except FileNotFoundError:
        raise BundleError(f"{folder / WEIGHTS_FILE}: missing detector weights") from None
    except Exception as e:
        raise BundleError(f"{folder / WEIGHTS_FILE}: unreadable detector weights ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{folder / WEIGHTS_FILE}: weights do not fit the detector ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys); re-train or re-install it"
        )
    return model.eval(), meta


def detector_index(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped detectors: ``{name: {"description": ..., "files": {file: sha256}}}``."""
    return read_shipped_index(
        Path(PRETRAINED_DIR if root is None else root) / DETECTORS_INDEX, "detector"
    )


def pretrained_detector(name: str) -> Path:
    """The folder of the shipped detector ``name``, after checking every file's sha256.

    Raises:
        BundleError: an unknown name (the message lists the shipped ones) or an altered file.
    """
    index = detector_index()
    if name not in index:
        known = ", ".join(sorted(index)) or "none in this installation"
        raise BundleError(
            f"unknown detector {name!r}; shipped detectors: {known}, or 'classical' (no model), "
            "or a detector bundle folder"
        )
    folder = PRETRAINED_DIR / name
    verify_shipped_files(folder, index[name]["files"], "detector")
    return folder


def shipped_detector_name(folder: str | Path) -> str | None:
    """The name of the shipped detector whose own folder in the package ``folder`` is (by any
    path to it: relative, through a symbolic link), else ``None``."""
    try:
        real = Path(folder).expanduser().resolve()
        if real.parent != PRETRAINED_DIR.resolve():
            return None
    except OSError:  # pragma: no cover - an unresolvable path is no shipped folder
        return None
    return real.name if real.name in detector_index() else None

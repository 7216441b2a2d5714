"""Whole fields of view: find the white cells, cut each one out at the classifier's scale, classify.

The API the command line and the review app call::

    det = FieldDetector.from_pretrained()              # the shipped learned detector (wbc2)
    found = det.detect(rgb)                            # FieldDetections: boxes, scores, scale
    pred = Predictor.from_pretrained("pbc6")
    cells = classify_cells(pred, rgb, found)           # one CellResult per box, in box order
    # or both at once:
    result = analyze_field(rgb, det, pred)             # FieldResult(detections, cells)

Every image may be a path, encoded bytes, an array (gray, RGBA, 16-bit ... converted) or a PIL
image; boxes are ``x_min, y_min, x_max, y_max`` in pixels of the field as given.

**Scale.** The detector works at a fixed scale (a red cell 32 px across). A field's scale comes
from, in this order: ``um_per_px`` passed by the caller, the red-cell ruler
(:func:`~marrowscope.preprocess.fields.estimate_scale`), else
:data:`~marrowscope.preprocess.fields.DEFAULT_UM_PER_PX` with a warning. The scale used is
recorded in every result.

**Crops.** A classifier must see a cell as it saw its training crops: the same field of view in
micrometres at the same pixel size. :func:`crop_spec` says what that was for a model (measured
for the shipped ``bm8`` and ``pbc6``; a bundle may carry ``"crop": {"um_per_px", "side_px"}`` in
its metadata); :func:`cell_crop` cuts it, and the Predictor's own preprocessing follows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.models.bundle import BundleError
from marrowscope.models.detector import (
    ONNX_FILE,
    CellDetector,
    DetectorMetadata,
    decode_maps,
    load_detector,
    pretrained_detector,
    read_detector_metadata,
    shipped_detector_name,
    to_input,
)
from marrowscope.preprocess.fields import (
    DEFAULT_UM_PER_PX,
    MAX_FIELD_PIXELS,
    UM_PER_PX_RANGE,
    WORK_UM_PER_PX,
    ClassicalParams,
    FieldScale,
    crop_at_scale,
    detect_classical,
    estimate_scale,
    looks_like_crop,
    plan_tiles,
    rescale,
)
from marrowscope.preprocess.ops import is_grayscale
from marrowscope.utils.boxes import as_boxes, clip_boxes, nms
from marrowscope.utils.image import decode_image, pil_to_rgb, read_file_bytes, to_rgb_uint8

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "CLASSICAL",
    "DEFAULT_DETECTOR",
    "MAX_FIELD_PIXELS",
    "CellResult",
    "CropSpec",
    "FieldDetections",
    "FieldDetector",
    "FieldError",
    "FieldResult",
    "analyze_field",
    "cell_crop",
    "classify_cells",
    "crop_spec",
    "load_field",
    "resolve_scale",
]

log = logging.getLogger(__name__)

CLASSICAL = "classical"
"""Name of the stain-based detector (no model file)."""

TILE_SIDE = 1024
"""Largest side (working-scale pixels, about 240 um) the network sees at once; larger fields (up
to :data:`~marrowscope.preprocess.fields.MAX_FIELD_PIXELS`) go in overlapping tiles."""

TILE_OVERLAP = 160
"""Overlap of neighbouring tiles in working pixels (about 37 um: more than two white cells)."""


class FieldError(ValueError):
    """A field cannot be used (unreadable, too large, a bad scale); the message names the fix."""


# -------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FieldDetections:
    """The white cells found in one field.

    Attributes:
        width, height: the field's size in pixels.
        boxes: ``(N, 4)`` float boxes ``x_min, y_min, x_max, y_max`` (field pixels), best first.
        scores: ``(N,)`` detection scores in ``[0, 1]``.
        scale: the magnification used (and where it came from).
        method: the detector (``wbc2``, ``classical`` ...).
        tiles: how many windows the field was processed in (1 = whole).
        warnings: what the user should know about this field (one sentence each).
    """

    width: int
    height: int
    boxes: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    scale: FieldScale
    method: str
    tiles: int = 1
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def centres(self) -> np.ndarray:
        """``(N, 2)`` box centres ``x, y``."""
        b = as_boxes(self.boxes)
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


@dataclass(frozen=True)
class CropSpec:
    """What a classifier's training crops were: their scale and their side in pixels.

    Attributes:
        um_per_px: micrometres per pixel of the training crops (before the model's resize).
        side_px: their side in pixels.
        source: how this was established (for the record).
    """

    um_per_px: float
    side_px: int
    source: str

    @property
    def side_um(self) -> float:
        """The field of view of one crop, in micrometres."""
        return self.um_per_px * self.side_px


@dataclass(frozen=True)
class CellResult:
    """One classified white cell of a field.

    Attributes:
        index: its position among the field's boxes.
        box: ``(x_min, y_min, x_max, y_max)`` in field pixels.
        score: the detection score.
        probs: the classifier's probabilities (model class order).
        predicted: the most likely class.
        confidence: its probability.
    """

    index: int
    box: tuple[float, float, float, float]
    score: float
    probs: np.ndarray = field(repr=False)
    predicted: str
    confidence: float


@dataclass(frozen=True)
class FieldResult:
    """A field's detections and, when a classifier was given, its classified cells."""

    detections: FieldDetections
    cells: tuple[CellResult, ...] = ()
    crop: CropSpec | None = None


# -------------------------------------------------------------------------------- image input


def load_field(image: Any, *, name: str | None = None) -> np.ndarray:
    """Any field image -> RGB, HWC, uint8 (gray, gray+alpha, RGBA, 16-bit, float converted).

    Raises:
        FieldError: unreadable, empty, or above :data:`MAX_FIELD_PIXELS` (named with the limit).
    """
    from marrowscope.utils.image import ImageReadError

    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "<array>")
    try:
        if isinstance(image, (str, os.PathLike)):
            data = read_file_bytes(image)
            rgb = decode_image(data, Path(image), max_pixels=MAX_FIELD_PIXELS, what="field")
        elif isinstance(image, (bytes, bytearray, memoryview)):
            rgb = decode_image(bytes(image), label, max_pixels=MAX_FIELD_PIXELS, what="field")
        elif isinstance(image, np.ndarray):
            if image.ndim >= 2 and image.shape[0] * image.shape[1] > MAX_FIELD_PIXELS:
                raise FieldError(_too_large(label, image.shape[1], image.shape[0]))
            rgb = to_rgb_uint8(image)
        elif hasattr(image, "getbands"):
            w, h = image.size
            if w * h > MAX_FIELD_PIXELS:
                raise FieldError(_too_large(label, w, h))
            rgb = pil_to_rgb(image)
        else:
            raise FieldError(
                f"cannot read a field from {type(image).__name__}; pass a path, bytes, a numpy "
                "array or a PIL image"
            )
    except ImageReadError as e:
        raise FieldError(str(e)) from None
    except ValueError as e:
        if isinstance(e, FieldError):
            raise
        raise FieldError(
            f"{label}: not an image ({e}); pass (H, W), (H, W, 3) or (H, W, 4) arrays"
        ) from None
    if min(rgb.shape[:2]) < 8:
        raise FieldError(
            f"{label}: {rgb.shape[1]}x{rgb.shape[0]} pixels is too small to be a field"
        )
    return rgb


def _too_large(label: str, w: int, h: int) -> str:
    return (
        f"{label}: field is {w}x{h} = {w * h:,} pixels, above the {MAX_FIELD_PIXELS:,}-pixel "
        "limit of a field; cut it into smaller fields first"
    )


FIELD_GRAY_TOLERANCE = 2
"""Colour spread under which a field (raw, not preprocessed) counts as grayscale: a field with
its stain has far more than 1% of its pixels above it."""


def resolve_scale(rgb: np.ndarray, um_per_px: float | None = None) -> FieldScale:
    """The field's scale: the caller's value, else the red-cell ruler, else the default.

    Raises:
        FieldError: a given value outside the plausible range.
    """
    if um_per_px is not None:
        lo, hi = UM_PER_PX_RANGE
        if not (isinstance(um_per_px, (int, float)) and lo <= um_per_px <= hi):
            raise FieldError(
                f"um_per_px {um_per_px} is not a plausible microscope scale; give micrometres per "
                f"pixel between {lo} and {hi} (about 0.05-0.1 at 100x oil), or leave it out to "
                "measure it on the red cells"
            )
        return FieldScale(um_per_px=float(um_per_px), source="given")
    measured = estimate_scale(rgb)
    if measured is not None:
        return measured
    return FieldScale(um_per_px=DEFAULT_UM_PER_PX, source="default")


# ------------------------------------------------------------------------------------ detector


class FieldDetector:
    """Finds white cells in fields: the learned detector or the classical one.

    ``__init__`` stores parameters only; build one with :meth:`from_pretrained`,
    :meth:`from_folder`, :meth:`from_model` or :meth:`classical`.

    Args:
        min_score: keep boxes scoring at least this (``None``: the detector's fitted value).
        backend: ``onnx`` (ONNX Runtime, the fast path) or ``torch``.
        threads: CPU threads for ONNX Runtime. The default, 1, runs the network in the calling
            thread: at the detector's working scale a field is small (a 640 x 480 field is about
            190 x 145 pixels), and no thread pool is left in the process, so a process that
            forks workers later (``predict``'s decoding pool) cannot inherit a held lock.

    Attributes:
        name_: the detector's name (``wbc2``, ``classical``, a folder).
        metadata_: the detector bundle's metadata (``None`` for the classical detector).
        min_score_: the score threshold in use.
    """

    def __init__(
        self, *, min_score: float | None = None, backend: str = "onnx", threads: int = 1
    ) -> None:
        self.min_score = min_score
        self.backend = backend
        self.threads = threads

    def __repr__(self) -> str:
        return f"FieldDetector(name={getattr(self, 'name_', None)!r}, backend={self.backend!r})"

    # ------------------------------------------------------------------------------ building

    @classmethod
    def load(cls, name: str | os.PathLike[str] = DEFAULT_DETECTOR, **kwargs: Any) -> FieldDetector:
        """A shipped detector by name, ``classical``, or a detector bundle folder."""
        if str(name) == CLASSICAL:
            return cls.classical(
                **{k: v for k, v in kwargs.items() if k in ("params", "min_score")}
            )
        path = Path(name)
        if path.is_dir():
            return cls.from_folder(path, **kwargs)
        return cls.from_pretrained(str(name), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_DETECTOR, **kwargs: Any) -> FieldDetector:
        """The shipped detector ``name`` (its files checked by sha256)."""
        return cls.from_folder(pretrained_detector(name), _name=name, **kwargs)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], *, _name: str | None = None, **kwargs: Any
    ) -> FieldDetector:
        """A detector bundle folder (``model.onnx`` + ``metadata.json``; torch needs the weights).

        Raises:
            BundleError: missing or damaged files.
        """
        self = cls(**kwargs)
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such detector folder")
        shipped = shipped_detector_name(folder) if _name is None else None
        if shipped is not None:  # the package's own folder: checked as loading it by name is
            folder, _name = pretrained_detector(shipped), shipped
        meta = read_detector_metadata(folder)
        self._setup(meta, _name or str(folder))
        if self.backend == "onnx":
            self._session = _onnx_session(folder / ONNX_FILE, self.threads)
        elif self.backend == "torch":
            self._model, _ = load_detector(folder)
        else:
            raise ValueError(f"unknown backend {self.backend!r}; use onnx or torch")
        return self

    @classmethod
    def from_model(
        cls, model: CellDetector, meta: DetectorMetadata, **kwargs: Any
    ) -> FieldDetector:
        """An in-memory torch detector (training and evaluation)."""
        self = cls(backend="torch", **{k: v for k, v in kwargs.items() if k != "backend"})
        self._setup(meta, meta.name)
        self._model = model.eval()
        return self

    @classmethod
    def classical(
        cls, params: ClassicalParams | None = None, *, min_score: float | None = None
    ) -> FieldDetector:
        """The stain-based detector (no model file)."""
        self = cls(min_score=min_score, backend="classical")
        self.name_ = CLASSICAL
        self.metadata_ = None
        self.params_ = params or ClassicalParams()
        self.min_score_ = 0.0 if min_score is None else float(min_score)
        self.work_um_per_px_ = WORK_UM_PER_PX
        return self

    def _setup(self, meta: DetectorMetadata, name: str) -> None:
        self.name_ = name
        self.metadata_ = meta
        self.min_score_ = meta.min_score if self.min_score is None else float(self.min_score)
        self.work_um_per_px_ = meta.work_um_per_px
        self._session: Any = None
        self._model: CellDetector | None = None

    # ----------------------------------------------------------------------------- detection

    def detect(
        self, image: Any, *, um_per_px: float | None = None, name: str | None = None
    ) -> FieldDetections:
        """Find the white cells of one field.

        Args:
            image: the field (path, bytes, array, PIL image).
            um_per_px: its scale if known (else measured on the red cells).
            name: the field's name for messages (default: the path, when ``image`` is one).

        Raises:
            FieldError: an unreadable or oversized field, or an implausible ``um_per_px``.
        """
        if not hasattr(self, "name_"):
            raise RuntimeError("this FieldDetector is not loaded; use FieldDetector.load(name)")
        if name is None and isinstance(image, (str, os.PathLike)):
            name = str(image)
        rgb = load_field(image, name=name)
        h, w = rgb.shape[:2]
        scale = resolve_scale(rgb, um_per_px)
        warnings: list[str] = []
        if is_grayscale(rgb, tolerance=FIELD_GRAY_TOLERANCE):
            warnings.append(
                "the field is grayscale: the detector relies on the nuclear stain's colour, so it "
                "may miss or invent cells; use the colour image"
            )
        if scale.source == "default":
            warnings.append(
                f"no red cell could be measured, so the scale {DEFAULT_UM_PER_PX} um/px was "
                "assumed; pass --um-per-px if it is known"
            )
        if self.backend == "classical":
            boxes, scores = detect_classical(rgb, um_per_px=scale.um_per_px, params=self.params_)
            tiles = 1
        else:
            boxes, scores, tiles = self._detect_learned(rgb, scale, name or "<array>")
        keep = scores >= self.min_score_
        boxes, scores = clip_boxes(boxes[keep], w, h), scores[keep]
        measured = scale.red_cells if scale.source in ("ruler", "default") else None
        if looks_like_crop(boxes, w, h, red_cells=measured):
            warnings.append(
                "this looks like a single-cell crop (one centred cell fills the frame), not a "
                "field; classify crops with 'marrowscope predict' or 'count' without --fields"
            )
        return FieldDetections(
            width=w,
            height=h,
            boxes=boxes,
            scores=scores,
            scale=scale,
            method=self.name_,
            tiles=tiles,
            warnings=tuple(warnings),
        )

    def _detect_learned(
        self, rgb: np.ndarray, scale: FieldScale, name: str
    ) -> tuple[np.ndarray, np.ndarray, int]:
        um_per_px = scale.um_per_px
        factor = um_per_px / self.work_um_per_px_
        meta = self.metadata_
        assert meta is not None
        h, w = rgb.shape[:2]
        work_w, work_h = round(w * factor), round(h * factor)
        if work_w < 16 or work_h < 16:
            raise FieldError(
                f"{name}: at {scale.describe()} this {w}x{h} field is only {work_w}x{work_h} "
                f"pixels at the detector's scale (16 needed); {_small_field_advice(scale)}"
            )
        # a low floor here; the caller's threshold is applied afterwards
        floor = min(self.min_score_, 0.05)
        if max(work_w, work_h) <= TILE_SIDE:
            work = rescale(rgb, factor)
            boxes, scores = decode_maps(
                self._maps(work),
                min_score=floor,
                nms_iou=meta.nms_iou,
                width=work.shape[1],
                height=work.shape[0],
                margin=meta.margin,
                min_inside=meta.min_inside,
            )
            return boxes / factor, scores, 1
        # large field: overlapping windows at the working scale, merged by NMS
        src_tile = round(TILE_SIDE / factor)
        src_overlap = round(TILE_OVERLAP / factor)
        all_boxes, all_scores = [], []
        tiles = plan_tiles(w, h, tile=src_tile, overlap=src_overlap)
        for t in tiles:
            window = rescale(rgb[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width], factor)
            b, s = decode_maps(
                self._maps(window),
                min_score=floor,
                nms_iou=meta.nms_iou,
                width=window.shape[1],
                height=window.shape[0],
                margin=meta.margin,
                min_inside=meta.min_inside,
            )
            b = b / factor + np.array([t.x0, t.y0, t.x0, t.y0])
            # drop boxes cut by an inner tile edge: the neighbouring tile sees them whole
            margin = 2.0
            cut = np.zeros(len(b), bool)
            if t.x0 > 0:
                cut |= b[:, 0] <= t.x0 + margin
            if t.y0 > 0:
                cut |= b[:, 1] <= t.y0 + margin
            if t.x0 + t.width < w:
                cut |= b[:, 2] >= t.x0 + t.width - margin
            if t.y0 + t.height < h:
                cut |= b[:, 3] >= t.y0 + t.height - margin
            all_boxes.append(b[~cut])
            all_scores.append(s[~cut])
        boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
        scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
        keep = nms(boxes, scores, meta.nms_iou)
        return boxes[keep], scores[keep], len(tiles)

    def _maps(self, work: np.ndarray) -> np.ndarray:
        assert self.metadata_ is not None
        x = to_input(work, self.metadata_.margin, self.metadata_.pad)
        if self._session is not None:
            return self._session.run(None, {"images": x})[0][0]
        import torch

        assert self._model is not None
        with torch.inference_mode():
            return self._model(torch.from_numpy(x)).float().numpy()[0]


def _small_field_advice(scale: FieldScale) -> str:
    """What to do about a field too small at the detector's scale, by where its scale came from."""
    if scale.source == "given":
        return "check --um-per-px (micrometres per pixel of this image), or give a larger field"
    if scale.source == "model":
        return (
            "the classifier's training scale was assumed (--um-per-px model); give this image's "
            "own scale with --um-per-px, or a larger field"
        )
    if scale.source == "ruler":
        return (
            "its scale was measured on its red cells; give a larger field, or its scale with "
            "--um-per-px if the measurement is wrong"
        )
    return (
        "no red cell could be measured, so the default scale was assumed; give a larger field, "
        "or its scale with --um-per-px"
    )


def _onnx_session(path: Path, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - a hard dependency
        raise BundleError("the field detector needs onnxruntime: pip install onnxruntime") from None
    if not path.is_file():
        raise BundleError(
            f"{path}: the detector's ONNX model is missing; re-run scripts/train_detector.py --export"
        )
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between runs: the classifier (torch) runs in between, on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BundleError(
            f"{path}: cannot load the detector ({type(e).__name__}: {str(e)[:200]})"
        ) from None


# --------------------------------------------------------------------------------------- crops

_SHIPPED_CROPS = {
    # PBC (Acevedo et al. 2020) crops are 360 x 363 px; the ruler measures 0.088 um/px on them
    # (median of 420 crops of pbc-cells-dev, interquartile range 0.084-0.092; on all 2,100 of
    # them 0.0874 before the ruler's fix of 2026-11-30 and 0.0885 after).
    "pbc6": CropSpec(0.088, 360, "measured: the red-cell ruler on 420 PBC training crops"),
    # Matek et al. 2021 crops are 250 x 250 px and too tight for the ruler (every red cell is cut
    # by the border); their scale comes from the lymphocyte nucleus, 127 px across in the
    # bone-marrow crops vs 99 px in the PBC crops (0.088 * 99 / 127).
    "bm8": CropSpec(0.069, 250, "measured: lymphocyte nuclei of bm-cells-dev vs pbc-cells-dev"),
}


def crop_spec(predictor: Predictor) -> CropSpec:
    """The training-crop scale of a classifier: its metadata's ``crop`` entry, the measured value
    of a shipped model, else the bone-marrow (Matek) value with a warning in the log."""
    meta = predictor.bundle_metadata_
    given = meta.extra.get("crop") if isinstance(meta.extra, dict) else None
    if isinstance(given, dict) and {"um_per_px", "side_px"} <= set(given):
        return CropSpec(float(given["um_per_px"]), int(given["side_px"]), "the bundle's metadata")
    name = (meta.pretrained or {}).get("name")
    if name in _SHIPPED_CROPS:
        return _SHIPPED_CROPS[name]
    spec = _SHIPPED_CROPS["bm8"]
    log.warning(
        "the model does not say the scale of its training crops; assuming Matek's bone-marrow crops "
        '(%.3f um/px, %d px). Add "crop": {"um_per_px": ..., "side_px": ...} to its metadata.json',
        spec.um_per_px,
        spec.side_px,
    )
    return CropSpec(spec.um_per_px, spec.side_px, "assumed (Matek bone-marrow crops)")


def cell_crop(
    rgb: np.ndarray, box: Sequence[float], scale: FieldScale, spec: CropSpec
) -> np.ndarray:
    """The crop of one cell as the classifier's training crops were made (RGB uint8,
    ``spec.side_px`` square), centred on the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return crop_at_scale(
        rgb,
        ((x0 + x1) / 2, (y0 + y1) / 2),
        um_per_px=scale.um_per_px,
        crop_um=spec.side_um,
        out_px=spec.side_px,
    )


def classify_cells(
    predictor: Predictor,
    image: Any,
    detections: FieldDetections,
    *,
    spec: CropSpec | None = None,
) -> tuple[CellResult, ...]:
    """Classify every detected cell of a field through the predictor (its preprocessing, TTA and
    calibration), in box order."""
    if len(detections) == 0:
        return ()
    rgb = load_field(image)
    spec = spec or crop_spec(predictor)
    arrays = [
        predictor.preprocess(cell_crop(rgb, b, detections.scale, spec)) for b in detections.boxes
    ]
    probs = predictor.predict_preprocessed(arrays)
    classes = predictor.classes_
    out = []
    for i, (b, s, p) in enumerate(zip(detections.boxes, detections.scores, probs, strict=True)):
        top = int(np.argmax(p))
        out.append(
            CellResult(
                index=i,
                box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                score=float(s),
                probs=np.asarray(p, np.float32),
                predicted=str(classes[top]),
                confidence=float(p[top]),
            )
        )
    return tuple(out)


def analyze_field(
    image: Any,
    detector: FieldDetector,
    predictor: Predictor | None = None,
    *,
    um_per_px: float | None = None,
    spec: CropSpec | None = None,
    name: str | None = None,
) -> FieldResult:
    """Detect (and, with a predictor, classify) the white cells of one field (``name``: for
    messages; default the path, when ``image`` is one)."""
    if name is None and isinstance(image, (str, os.PathLike)):
        name = str(image)
    rgb = load_field(image, name=name)
    found = detector.detect(rgb, um_per_px=um_per_px, name=name)
    if predictor is None:
        return FieldResult(found)
    spec = spec or crop_spec(predictor)
    return FieldResult(found, classify_cells(predictor, rgb, found, spec=spec), spec)

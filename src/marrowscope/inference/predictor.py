"""The one path from a raw image to class probabilities: :class:`Predictor`.

Everything (architecture, class names in index order, input size, normalisation, preprocessing)
comes from the checkpoint bundle, never from a folder listing or a default::

    p = Predictor.from_checkpoint("runs/x/best")            # PyTorch
    p = Predictor.from_checkpoint("runs/x/best", backend="onnx")  # ONNX Runtime (model.onnx)
    p = Predictor.from_checkpoint("runs/x/best", backend="int8")  # OpenVINO int8 (x/best/int8)
    p.predict_proba(["cell.jpg", rgb_array, pil_image])     # (N, K) float32
    p.classes_

Steps per image: :meth:`Predictor.load` (any file, array or PIL image -> RGB uint8) ->
:meth:`Predictor.preprocess` (the bundle's crop / resize / denoise / sharpen) -> batched network
(the model normalises its [0, 1] input itself; in ONNX the normalisation is inside the graph
too) -> softmax of ``logits / temperature``, averaged over the test-time-augmentation views.

The bundle's ``metadata["inference"]`` says how it predicts: ``tta`` (``none``, ``flips`` = the
image and its 3 flips, ``d8`` = all 8 rotations/reflections) and ``temperature`` (fitted on the
validation split after training; 1.0 = uncalibrated). ``Predictor(tta=...)`` overrides the TTA.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marrowscope import __version__
from marrowscope.config import PreprocessConfig, to_dict
from marrowscope.inference.batching import iter_loaded
from marrowscope.inference.openvino_runtime import (
    INT8_BIN,
    INT8_XML,
    RECHECK_XML,
    OpenVINORunner,
    default_int8_dir,
)
from marrowscope.metadata import BUNDLE_FORMAT, TTA_MODES, BundleMetadata, MetadataError
from marrowscope.metrics.classification import softmax
from marrowscope.models.bundle import (
    METADATA_NAME,
    SHIPPED_PREFIX,
    WEIGHTS_NAME,
    BundleError,
    load_bundle,
    pretrained_bundle,
    pretrained_index,
    read_metadata,
    shadow_error,
    shadowed_shipped_name,
    shipped_name,
)
from marrowscope.models.registry import Classifier
from marrowscope.preprocess.cache import default_cache_root, resolve_workers
from marrowscope.preprocess.ops import (
    apply_preprocess,
    config_from_params,
    is_grayscale,
    preprocess_params,
    resize,
)
from marrowscope.utils.image import decode_image, pil_to_rgb, read_image, to_rgb_uint8
from marrowscope.utils.io import current_version, file_sha256
from marrowscope.utils.progress import make_progress
from marrowscope.utils.runtime import Precision, resolve_device, resolve_precision

__all__ = [
    "BACKEND_ALIASES",
    "BACKENDS",
    "ONNX_INPUT",
    "ONNX_METADATA_KEY",
    "ONNX_NAME",
    "ONNX_OUTPUT",
    "PathPrediction",
    "default_onnx_path",
    "shipped_command_name",
    "Predictor",
    "PredictorError",
    "read_onnx_metadata",
    "softmax",
    "tta_views",
]

BACKENDS = ("torch", "onnx", "int8")
"""Prediction backends: PyTorch (fp32/bf16), ONNX Runtime (fp32), OpenVINO int8."""
BACKEND_ALIASES = {"openvino": "int8"}
"""Other names accepted for a backend (the runtime's own name)."""
ONNX_NAME = "model.onnx"
"""File name of the exported model inside a bundle folder."""
ONNX_METADATA_KEY = "marrowscope"
"""``metadata_props`` key holding the bundle metadata (JSON) in an exported ONNX model."""
ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"

ONNX_DIR = "onnx"
"""Folder of the per-user cache (``$MARROWSCOPE_CACHE``) holding shipped models' ONNX exports."""

_EXPORT_HINT = "re-export it with: marrowscope export CHECKPOINT --format onnx"
_INT8_HINT = "marrowscope export CHECKPOINT --format int8"


def shipped_command_name(name: str) -> str:
    """How to name the shipped model ``name`` on a command line here: ``bm8``, or
    ``builtin:bm8`` when a local path ``bm8`` would be taken instead."""
    return name if shipped_name(name) == name else f"{SHIPPED_PREFIX}{name}"


def default_onnx_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where ``marrowscope export CHECKPOINT --format onnx`` writes by default, and where the
    onnx backend looks: ``CHECKPOINT/model.onnx`` for a bundle folder,
    ``$MARROWSCOPE_CACHE/onnx/NAME/model.onnx`` (default ``~/.cache/marrowscope/...``) for a
    shipped model (its name, ``builtin:NAME`` or its folder), since the package folder may be
    read-only and a ``./NAME`` folder would hide the shipped model."""
    name = shipped_name(checkpoint, folder=True)
    if name is not None:
        return default_cache_root() / ONNX_DIR / name / ONNX_NAME
    return Path(checkpoint).expanduser() / ONNX_NAME


class PredictorError(BundleError):
    """A checkpoint or ONNX model cannot be used for prediction; names the file and the fix."""


@dataclass(frozen=True, eq=False)
class PathPrediction:
    """The result for one image file: probabilities, or the reason it could not be used.

    Attributes:
        path: the file as given.
        probs: ``(K,)`` float32 class probabilities (index order of ``classes_``), or ``None``.
        error: why the file could not be used (names the file and the fix), or ``None``.
        grayscale: the image carries no colour (its prediction is unreliable: the models learn
            from stained colour cells); it is classified all the same.
    """

    path: str
    probs: np.ndarray | None
    error: str | None = None
    grayscale: bool = False

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return self.probs is not None

    def label(self, classes: Sequence[str]) -> str | None:
        """The predicted class name (``None`` for an unreadable file)."""
        return None if self.probs is None else str(classes[int(np.argmax(self.probs))])

    @property
    def confidence(self) -> float | None:
        """Probability of the predicted class (``None`` for an unreadable file)."""
        return None if self.probs is None else float(np.max(self.probs))


def tta_views(batch: np.ndarray, mode: str) -> list[np.ndarray]:
    """The test-time-augmentation views of an ``(N, H, W, C)`` batch (contiguous copies).

    ``none``: the batch; ``flips``: + horizontal, vertical and both flips; ``d8``: the 4
    rotations by 90 degrees, each with and without a horizontal flip (the dihedral group).
    """
    if mode == "none":
        return [batch]
    if mode == "flips":
        views = [batch, batch[:, :, ::-1], batch[:, ::-1], batch[:, ::-1, ::-1]]
    elif mode == "d8":
        views = []
        for k in range(4):
            r = np.rot90(batch, k, axes=(1, 2))
            views += [r, r[:, :, ::-1]]
    else:
        raise ValueError(f"unknown test-time augmentation {mode!r}; use one of {TTA_MODES}")
    return [np.ascontiguousarray(v) for v in views]


def read_onnx_metadata(path: str | os.PathLike[str]) -> BundleMetadata:
    """The bundle metadata embedded in an exported ONNX model (``metadata_props['marrowscope']``).

    Raises:
        PredictorError: unreadable/corrupt ONNX file, or no (valid) marrowscope metadata.
    """
    sess = _onnx_session(Path(path), threads=1)
    return _session_metadata(sess, Path(path))


def _onnx_session(path: Path, *, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictorError(
            "the onnx backend needs onnxruntime: pip install onnxruntime (or use --backend torch)"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise PredictorError(
            f"{path}: cannot load the ONNX model ({type(e).__name__}: {str(e)[:300]}); the file "
            f"is damaged or not ONNX; {_EXPORT_HINT}"
        ) from None


def _session_metadata(sess: Any, path: Path) -> BundleMetadata:
    text = sess.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if not text:
        raise PredictorError(
            f"{path}: this ONNX model carries no marrowscope metadata (class names, input size, "
            f"preprocessing), so its outputs cannot be named; {_EXPORT_HINT}"
        )
    try:
        return BundleMetadata.from_json(text, f"{path} (embedded metadata)")
    except MetadataError as e:
        raise PredictorError(f"{e}; or {_EXPORT_HINT}") from None


def _shipped_weights_sha(name: str) -> str | None:
    """The sha256 of the shipped model ``name``'s weights in the pretrained index, if any."""
    entry = pretrained_index().get(name)
    files = entry.get("files") if isinstance(entry, dict) else None
    sha = files.get(WEIGHTS_NAME) if isinstance(files, dict) else None
    return str(sha) if sha else None


def _check_export_source(
    export: Path, recorded: Any, shipped: str | None, weights: Path | None, command: str
) -> None:
    """Refuse an ONNX or int8 export made from other weights than those it stands for.

    Args:
        export: the export (for the message).
        recorded: the sha256 of the source weights the export recorded (``weights_sha256``).
        shipped: the shipped model whose cache export this is: the export must record its
            weights' sha256, equal to the pretrained index's (the one the shipped files are
            checked against when they load; they are not hashed again here).
        weights: otherwise the bundle's weights file, hashed and compared when the export
            recorded a sha256.
        command: the command that exports it again.

    Raises:
        PredictorError: no recorded sha256 for a shipped model, or other weights.
    """
    if shipped is not None:
        expected = _shipped_weights_sha(shipped)
        if not recorded:
            raise PredictorError(
                f"{export}: this export of the shipped model {shipped} does not record which "
                "weights it was made from (no weights_sha256: an older marrowscope made it), so "
                f"it cannot be checked against them; export it again with: {command}"
            )
        if recorded != expected:
            raise PredictorError(
                f"{export} was exported from other weights than the shipped model {shipped} "
                f"(weights sha256 {recorded}, shipped {expected}); export it again with: {command}"
            )
        return
    if weights is not None and recorded and weights.is_file() and file_sha256(weights) != recorded:
        raise PredictorError(
            f"{export} was exported from other weights than {weights} (the checkpoint changed "
            f"since); export it again with: {command}"
        )


def _model_name(checkpoint: str | os.PathLike[str], meta: BundleMetadata, backend: str) -> str:
    """What :attr:`Predictor.model_name_` (the ``model`` column) calls a loaded checkpoint.

    The shipped model's name (``bm8``) when the checkpoint is the shipped model itself (its
    name, ``builtin:NAME``, its folder, or its export in the cache, checked against the shipped
    weights), or a copy of it: the same weights (their sha256, or the one its ONNX / int8
    export recorded, equals the pretrained index's) and the same classes, preprocessing, TTA
    and temperature. Anything else, such as a re-saved, fine-tuned or recalibrated copy whose
    metadata still names the shipped model, is called by its checkpoint path.
    """
    name = shipped_name(checkpoint, folder=True)
    if name is not None:
        return name
    claimed = (meta.pretrained or {}).get("name")
    expected = _shipped_weights_sha(str(claimed)) if claimed else None
    if expected is None:
        return str(checkpoint)
    if backend == "torch":
        weights = Path(checkpoint).expanduser() / WEIGHTS_NAME
        sha = file_sha256(weights) if weights.is_file() else None
    else:
        sha = ((meta.onnx if backend == "onnx" else meta.int8) or {}).get("weights_sha256")
    if sha != expected:
        return str(checkpoint)
    try:
        shipped = read_metadata(f"{SHIPPED_PREFIX}{claimed}")
    except BundleError:
        return str(checkpoint)
    same = (
        list(meta.classes) == list(shipped.classes)
        and meta.preprocess == shipped.preprocess
        and meta.inference.tta == shipped.inference.tta
        and meta.inference.temperature == shipped.inference.temperature
    )
    return str(claimed) if same else str(checkpoint)


def _is_single_image(obj: Any) -> bool:
    """True for one image (path, bytes, an array below 4 dimensions, a PIL image)."""
    if isinstance(obj, (str, os.PathLike, bytes, bytearray, memoryview)):
        return True
    if isinstance(obj, np.ndarray):
        return obj.ndim < 4
    return hasattr(obj, "getbands") and hasattr(obj, "mode")  # PIL.Image.Image


class Predictor:
    """Class probabilities for raw images, from a checkpoint bundle or an exported ONNX model.

    ``__init__`` only stores parameters; :meth:`from_checkpoint` (or :meth:`from_model`) builds
    a ready predictor.

    Args:
        checkpoint: bundle folder or shipped model's name (``bm8``; ``builtin:bm8`` where a
            local path ``bm8`` exists), or (``backend="onnx"``) a folder with ``model.onnx``, an
            ``.onnx`` file exported by ``marrowscope export``, or a shipped model's name (its
            export in the per-user cache: :func:`default_onnx_path`), or (``backend="int8"``) a
            bundle folder with an ``int8`` export, the export folder itself, or a shipped
            model's name.
        device: ``auto``, ``cpu`` or ``cuda`` (the onnx and int8 backends run on the CPU).
        backend: ``torch``, ``onnx`` or ``int8`` (alias ``openvino``: the OpenVINO model of
            ``marrowscope export CHECKPOINT --format int8``; needs ``marrowscope[int8]``).
        batch_size: images per forward pass.
        precision: torch backend: ``auto`` (bf16 autocast + channels_last on CPUs with native
            bf16 and on CUDA, else fp32), ``fp32`` or ``bf16``. The onnx backend is fp32,
            the int8 backend int8 (with fp32 for the layers the quantiser left in float).
        tta: test-time augmentation ``none``, ``flips`` or ``d8``; ``None`` = the bundle's
            setting (``metadata["inference"]["tta"]``, else ``none``).

    Attributes:
        classes_: class names in index order (from the bundle).
        model_name_: the shipped model's name (``bm8``) for the shipped model itself, its ONNX
            and int8 exports and unchanged copies of it (same weights by sha256, same
            classes, preprocessing, TTA and temperature); else the checkpoint path it was
            loaded from (``<in-memory ARCH>`` for :meth:`from_model`).
        bundle_metadata_: the bundle's typed ``metadata.json``
            (:class:`~marrowscope.metadata.BundleMetadata`; for the onnx backend the copy
            embedded in the ONNX model).
        metadata: the same as the JSON object (a dict).
        precision_: the resolved precision (torch backend).
        device_: the resolved device.
        preprocess_config_: the bundle's preprocessing parameters.
        tta_: the resolved test-time augmentation.
        temperature_: softmax temperature from the bundle (1.0 when not calibrated).
        recheck_margin_: int8 backend: cells whose top-two probabilities are closer than this
            are predicted again by the export's fp32 model (0: never; from the export).
        cells_checked_, cells_rechecked_: cells the int8 backend predicted, and re-checked in
            fp32, since the predictor was made.
    """

    recheck_margin_: float = 0.0
    cells_checked_: int = 0
    cells_rechecked_: int = 0
    _fp32_runner: OpenVINORunner | None = None

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        backend: str = "torch",
        batch_size: int = 64,
        precision: str = "auto",
        tta: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.backend = backend
        self.batch_size = batch_size
        self.precision = precision
        self.tta = tta

    def __repr__(self) -> str:
        return (
            f"Predictor(checkpoint={str(self.checkpoint)!r}, backend={self.backend!r}, "
            f"device={self.device!r}, batch_size={self.batch_size}, precision={self.precision!r}, "
            f"tta={self.tta!r})"
        )

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        backend: str = "torch",
        batch_size: int = 64,
        precision: str = "auto",
        tta: str | None = None,
    ) -> Predictor:
        """Load a predictor from a bundle folder (torch), an exported ONNX model (onnx) or an
        int8 export (int8).

        Raises:
            BundleError: missing, corrupt or newer-format bundle (``PredictorError`` for ONNX
                files without metadata, stale exports and bad preprocessing parameters).
            ValueError: an unknown backend/precision or a bad batch size.
        """
        self = cls(
            path,
            device=device,
            backend=backend,
            batch_size=batch_size,
            precision=precision,
            tta=tta,
        )
        self._check_params()
        if backend == "torch":
            if Path(path).is_file() and Path(path).suffix.lower() == ".onnx":
                raise PredictorError(
                    f"{path} is an ONNX model; load it with backend='onnx' (--backend onnx)"
                )
            if (Path(path) / INT8_XML).is_file():
                raise PredictorError(
                    f"{path} is an int8 export; load it with backend='int8' (--backend int8)"
                )
            model, meta = load_bundle(path, device="cpu")
            self._setup_torch(model, meta, str(Path(path) / METADATA_NAME))
        elif self.backend == "int8":
            self._setup_int8(path)
        else:
            self._setup_onnx(path)
        self.model_name_ = _model_name(path, self.bundle_metadata_, self.backend)
        return self

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: str = "auto",
        backend: str = "torch",
        batch_size: int = 64,
        precision: str = "auto",
        tta: str | None = None,
    ) -> Predictor:
        """Load a model that ships with marrowscope (``bm8``, ``pbc6``; ``marrowscope models``
        lists them), its files checked by sha256.

        ``backend="onnx"`` runs its ONNX export, made once with ``marrowscope export NAME``
        (kept in ``$MARROWSCOPE_CACHE/onnx/NAME``); ``backend="int8"`` its int8 export, made
        once with ``marrowscope export NAME --format int8`` (kept in
        ``$MARROWSCOPE_CACHE/int8/NAME``). A local folder ``NAME`` plays no part here.

        Raises:
            BundleError: an unknown name (the message lists the shipped ones), a damaged file, or
                (onnx, int8) no export yet (the message gives the command that makes it).
        """
        if name not in pretrained_index():
            pretrained_bundle(name)  # the error that lists the shipped models
        return cls.from_checkpoint(
            f"{SHIPPED_PREFIX}{name}",  # checked by sha256 where it is loaded
            device=device,
            backend=backend,
            batch_size=batch_size,
            precision=precision,
            tta=tta,
        )

    @classmethod
    def from_model(
        cls,
        model: Classifier,
        metadata: Mapping[str, Any] | BundleMetadata | None = None,
        *,
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        tta: str | None = None,
    ) -> Predictor:
        """A torch predictor for an in-memory model (a copy; ``model`` itself is not changed).

        Args:
            model: the classifier.
            metadata: the bundle's metadata, or a dict of some of its keys; missing keys are
                filled from the model (classes
                ``model.classes`` or ``class_0..``, preprocessing = resize to the input size).
        """
        self = cls(
            None,
            device=device,
            backend="torch",
            batch_size=batch_size,
            precision=precision,
            tta=tta,
        )
        self._check_params()
        meta = default_metadata(model, metadata)
        self._setup_torch(copy.deepcopy(model), meta, f"<model {model.arch}>")
        # no file to check against the shipped one: metadata naming a shipped model proves nothing
        self.model_name_ = f"<in-memory {model.arch}>"
        return self

    def _check_params(self) -> None:
        self.backend = BACKEND_ALIASES.get(self.backend, self.backend)
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}; use torch, onnx or int8 (alias openvino)"
            )
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch size must be a positive integer, got {bs!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {self.precision!r}; use auto, fp32 or bf16")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {self.tta!r}; use none, flips or d8")

    def _setup_common(self, meta: BundleMetadata, source: str) -> None:
        if meta.preprocess is None:
            raise PredictorError(
                f"{source}: the metadata lacks 'preprocess' (the preprocessing the model was "
                "trained with), so images cannot be prepared for it; re-save the checkpoint with "
                "a current marrowscope"
            )
        try:
            cfg = config_from_params(dict(meta.preprocess))
        except (ValueError, TypeError) as e:
            raise PredictorError(f"{source}: invalid preprocessing parameters: {e}") from None
        self.bundle_metadata_ = meta
        self.classes_ = list(meta.classes)
        self.preprocess_config_ = cfg
        self.tta_ = self.tta if self.tta is not None else meta.inference.tta
        self.temperature_ = meta.inference.temperature
        self._size = meta.input_size

    def _setup_torch(self, model: Classifier, meta: BundleMetadata, source: str) -> None:
        self._setup_common(meta, source)
        if model.num_classes != len(self.classes_):
            raise PredictorError(
                f"{source}: {len(self.classes_)} class names for a model with "
                f"{model.num_classes} outputs"
            )
        dev = resolve_device(self.device)
        prec = resolve_precision(self.precision, dev)
        # channels_last pays off with bf16 (oneDNN/AMX) and on CUDA; fp32 eager stays contiguous.
        prec = Precision(dtype=prec.dtype, channels_last=prec.dtype is not None)
        model = model.float().eval().to(dev)
        if prec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model: Classifier | None = model
        self._session: Any = None
        self._runner: Any = None
        self.device_ = dev
        self.precision_ = prec

    def _setup_onnx(self, checkpoint: str | os.PathLike[str]) -> None:
        if self.device not in ("auto", "cpu"):
            raise PredictorError(
                f"the onnx backend runs on the CPU; use --device cpu (or --backend torch for "
                f"{self.device})"
            )
        if self.precision not in ("auto", "fp32"):
            raise PredictorError("the onnx backend runs in fp32; use precision='fp32' or 'auto'")
        path = Path(checkpoint).expanduser()
        name = shipped_name(checkpoint, folder=True)
        weights: Path | None = None
        hidden = shadowed_shipped_name(checkpoint)
        if hidden is not None:  # ./bm8 that is no bundle (an old export's model.onnx, say)
            raise shadow_error(hidden)
        if name is not None:  # a shipped model: its export lives in the per-user cache
            command = f"marrowscope export {shipped_command_name(name)} --format onnx"
            onnx_file = default_onnx_path(checkpoint)
            if not onnx_file.is_file():
                raise PredictorError(
                    f"{checkpoint}: the shipped model {name} has no ONNX export yet (looked for "
                    f"{onnx_file}); create it once with: {command}"
                )
        elif path.is_dir():
            command = f"marrowscope export {path} --format onnx"
            onnx_file = path / ONNX_NAME
            if not onnx_file.is_file():
                raise PredictorError(
                    f"{path}: no {ONNX_NAME} in this checkpoint folder; create it with: {command}"
                )
            weights = path / WEIGHTS_NAME
        elif path.is_file():
            command = ""
            onnx_file = path
        else:
            raise PredictorError(f"{path}: no such ONNX file or checkpoint folder; check the path")
        sess = _onnx_session(onnx_file, threads=torch.get_num_threads())
        meta = _session_metadata(sess, onnx_file)
        _check_export_source(
            onnx_file, (meta.onnx or {}).get("weights_sha256"), name, weights, command
        )
        self._setup_common(meta, str(onnx_file))
        inp = sess.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[2:] != [self._size, self._size]:
            raise PredictorError(
                f"{onnx_file}: model input shape {shape} does not match the metadata input size "
                f"{self._size}; {_EXPORT_HINT}"
            )
        self._session = sess
        self._input_name = inp.name
        self._runner = lambda x: sess.run([ONNX_OUTPUT], {inp.name: x})[0]
        self._model = None
        self.device_ = torch.device("cpu")
        self.precision_ = Precision(dtype=None, channels_last=False)
        self.onnx_path_ = onnx_file

    def _int8_folder(self, path: str | os.PathLike[str]) -> tuple[Path, Path | None, str | None]:
        """The int8 export folder for ``path``; the bundle folder whose weights it must come
        from (``None`` when unknown or shipped); the shipped model's name when it is the
        cache export of one (``None`` otherwise)."""
        hidden = shadowed_shipped_name(path)
        if hidden is not None:  # ./bm8 that is no bundle (an old export's int8/, say)
            raise shadow_error(hidden)
        p = Path(path).expanduser()
        if p.is_file() and p.name == INT8_XML:
            p = p.parent
        if (p / INT8_XML).is_file():
            parent = p.parent
            return p, parent if (parent / WEIGHTS_NAME).is_file() else None, None
        name = shipped_name(path, folder=True)
        folder = default_int8_dir(path)
        if (folder / INT8_XML).is_file():
            return folder, None if name is not None else p, name
        if p.is_dir() or name is not None:
            ref = shipped_command_name(name) if name is not None else str(path)
            raise PredictorError(
                f"{path}: no int8 export at {folder}; create it with: "
                f"{_INT8_HINT.replace('CHECKPOINT', ref)}"
            )
        raise PredictorError(
            f"{path}: no such int8 export folder, checkpoint folder or shipped model; check the "
            "path"
        )

    def _setup_int8(self, path: str | os.PathLike[str]) -> None:
        if self.device not in ("auto", "cpu"):
            raise PredictorError(
                f"the int8 backend runs on the CPU; use --device cpu (or --backend torch for "
                f"{self.device})"
            )
        if self.precision not in ("auto", "fp32"):
            raise PredictorError(
                "the int8 backend runs the int8 model as exported; use precision='auto'"
            )
        export, bundle, name = self._int8_folder(path)
        # every file from one version of the export (an export running now may replace it)
        folder = current_version(export)
        meta_file = folder / METADATA_NAME
        try:
            meta = BundleMetadata.read(meta_file)
        except MetadataError as e:
            raise PredictorError(
                f"{e}; or export again with: {_INT8_HINT.replace('CHECKPOINT', str(path))}"
            ) from None
        if not meta.int8:
            raise PredictorError(
                f"{meta_file}: no 'int8' section, so this is not an int8 export; export one with: "
                f"{_INT8_HINT.replace('CHECKPOINT', str(path))}"
            )
        ref = shipped_command_name(name) if name is not None else str(path)
        _check_export_source(
            folder,
            meta.int8.get("weights_sha256"),
            name,
            bundle / WEIGHTS_NAME if bundle is not None else None,
            _INT8_HINT.replace("CHECKPOINT", ref),
        )
        self._setup_common(meta, str(meta_file))
        streams = meta.int8.get("streams", 1)
        if streams not in (1, 2):
            raise PredictorError(
                f"{meta_file}: int8 'streams' is {streams!r}, expected 1 or 2; export it again "
                f"with: {_INT8_HINT.replace('CHECKPOINT', str(path))}"
            )
        runner = OpenVINORunner(
            folder / INT8_XML, threads=torch.get_num_threads(), streams=int(streams)
        )
        shape = runner.input_shape
        if len(shape) != 4 or shape[2:] != [self._size, self._size]:
            raise PredictorError(
                f"{folder / INT8_XML}: model input shape {shape} does not match the metadata "
                f"input size {self._size}; export it again with: "
                f"{_INT8_HINT.replace('CHECKPOINT', str(path))}"
            )
        self._runner = runner
        self._session = None
        self._model = None
        self.device_ = torch.device("cpu")
        self.precision_ = Precision(dtype=None, channels_last=False)
        self.int8_path_ = folder / INT8_BIN  # in the version loaded (what Ray ships)
        self.int8_export_ = export  # the export folder, as users name it
        self._setup_recheck(meta, folder, path)

    def _setup_recheck(self, meta: BundleMetadata, folder: Path, path: Any) -> None:
        """The export's fp32 re-check of uncertain cells, if any (its fp32 model loaded now)."""
        recheck = (meta.int8 or {}).get("recheck") or {}
        margin = recheck.get("margin", 0.0)
        again = f"export it again with: {_INT8_HINT.replace('CHECKPOINT', str(path))}"
        if not isinstance(margin, (int, float)) or not 0.0 <= margin <= 1.0:
            raise PredictorError(
                f"{folder / METADATA_NAME}: int8 'recheck.margin' is {margin!r}, expected a "
                f"number in [0, 1]; {again}"
            )
        self.recheck_margin_ = float(margin)
        self.cells_checked_ = self.cells_rechecked_ = 0
        self._fp32_runner = None
        if self.recheck_margin_ > 0:
            xml = folder / RECHECK_XML
            if not xml.is_file():
                raise PredictorError(
                    f"{folder}: the export re-checks uncertain cells in fp32 but {RECHECK_XML} "
                    f"is missing; {again}"
                )
            # loaded now: the files may be gone later (a Ray actor's temporary copy)
            # (dynamic batch: the number of cells re-checked changes from batch to batch)
            self._fp32_runner = OpenVINORunner(
                xml, threads=torch.get_num_threads(), streams=1, static_shapes=False
            )

    def recheck_share(self) -> float | None:
        """Share of the cells predicted so far that the int8 backend re-checked in fp32 (``None``
        before any cell, or for another backend)."""
        if self.backend not in ("int8", "openvino") or not self.cells_checked_:
            return None
        return self.cells_rechecked_ / self.cells_checked_

    # -------------------------------------------------------------------------- properties

    @property
    def model(self) -> Classifier:
        """The torch model (eval mode; for Grad-CAM). Torch backend only."""
        self._require_ready()
        if self._model is None:
            raise PredictorError(
                f"this predictor runs the {self.backend} backend and has no torch model; load it "
                "with backend='torch' (e.g. for Grad-CAM)"
            )
        return self._model

    @property
    def metadata(self) -> dict[str, Any]:
        """The bundle's metadata as the JSON object of ``metadata.json``."""
        self._require_ready()
        return self.bundle_metadata_.to_dict()

    @property
    def input_size(self) -> int:
        """Side of the square image the network takes."""
        self._require_ready()
        return self._size

    @property
    def arch(self) -> str:
        """The model's registry name (e.g. ``tf_efficientnet_lite0``)."""
        self._require_ready()
        return self.bundle_metadata_.arch

    def _require_ready(self) -> None:
        if not hasattr(self, "bundle_metadata_"):
            raise RuntimeError(
                "this Predictor is not loaded; build it with Predictor.from_checkpoint(path)"
            )

    # ------------------------------------------------------------------------ single images

    def load(self, image: Any) -> np.ndarray:
        """Any supported image -> RGB, HWC, uint8.

        Args:
            image: a file path; encoded bytes; a numpy array (RGB order; gray, gray+alpha, RGBA,
                uint8/uint16/float accepted); or a PIL image.

        Raises:
            ImageReadError: an unreadable file or bytes (names the file and the fix).
            ValueError: an array that is not an image.
            TypeError: an unsupported object.
        """
        if isinstance(image, (str, os.PathLike)):
            return read_image(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(bytes(image))
        if isinstance(image, np.ndarray):
            try:
                return to_rgb_uint8(image)
            except ValueError as e:
                raise ValueError(
                    f"array of shape {image.shape} and dtype {image.dtype} is not an image "
                    f"({e}); pass (H, W), (H, W, 3) or (H, W, 4) RGB(A) arrays"
                ) from None
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None  # type: ignore[assignment]
        if Image is not None and isinstance(image, Image.Image):
            return pil_to_rgb(image)
        raise TypeError(
            f"cannot read an image from {type(image).__name__}; pass a path, bytes, a numpy array "
            "or a PIL image"
        )

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """Apply the bundle's preprocessing (crop / resize / denoise / sharpen): RGB uint8 in
        and out.

        The result is always ``input_size`` square.
        """
        self._require_ready()
        out = apply_preprocess(rgb, self.preprocess_config_)
        if out.shape[:2] != (self._size, self._size):
            out = resize(out, self._size)
        return out

    # ---------------------------------------------------------------------------- networks

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw network outputs for a float batch ``(N, 3, S, S)`` in [0, 1] -> ``(N, K)`` float32."""
        self._require_ready()
        if self._runner is not None:
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
            return self._runner(np.ascontiguousarray(arr, dtype=np.float32))
        t = torch.as_tensor(x).to(self.device_, torch.float32)
        return self._torch_forward(t)

    @torch.inference_mode()
    def _torch_forward(self, x: torch.Tensor) -> np.ndarray:
        assert self._model is not None
        if self.precision_.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        with self.precision_.autocast(self.device_):
            out = self._model(x)
        return out.float().cpu().numpy()

    def _logits_uint8(self, batch: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K)`` logits of one view."""
        if isinstance(self._runner, OpenVINORunner):  # uint8 in: scaled inside the graph
            return self._runner.infer_uint8(batch)
        if self._runner is not None:
            x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
            x /= 255.0
            return self._runner(x)
        t = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device_)
        # NHWC memory viewed as NCHW is exactly channels_last; fp32 makes it contiguous.
        x = t.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return self._torch_forward(x)

    def _view_logits(self, batch: np.ndarray, tta: str | None = None) -> np.ndarray:
        """``(V, N, K)`` logits of the test-time-augmentation views of a uint8 batch (for an int8
        export with a re-check, the fp32 logits of the cells int8 finds uncertain)."""
        mode = tta if tta is not None else self.tta_
        views = np.stack([self._logits_uint8(v) for v in tta_views(batch, mode)])
        if self.recheck_margin_ > 0 and len(batch):
            probs = softmax(views / self.temperature_).mean(axis=0)
            top = np.sort(probs, axis=1)
            idx = np.flatnonzero(top[:, -1] - top[:, -2] < self.recheck_margin_)
            self.cells_checked_ += len(batch)
            if idx.size:
                assert self._fp32_runner is not None
                sub = np.ascontiguousarray(batch[idx])
                views[:, idx] = np.stack(
                    [self._fp32_runner.infer_uint8(v) for v in tta_views(sub, mode)]
                )
                self.cells_rechecked_ += int(idx.size)
        return views

    def _probs_uint8(self, batch: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 -> ``(N, K)`` probabilities (TTA-averaged, temperature-scaled)."""
        views = self._view_logits(batch)
        return softmax(views / self.temperature_).mean(axis=0, dtype=np.float32)

    def view_logits_preprocessed(
        self, arrays: Sequence[np.ndarray] | np.ndarray, *, tta: str | None = None
    ) -> np.ndarray:
        """Raw logits ``(V, N, K)`` of every test-time-augmentation view (no temperature).

        Used to fit the softmax temperature: the probabilities of :meth:`predict_preprocessed`
        are ``softmax(logits / temperature_)`` averaged over the ``V`` views.

        Args:
            arrays: preprocessed RGB HWC uint8 images.
            tta: the views (``None``: :attr:`tta_`).
        """
        self._require_ready()
        mode = tta if tta is not None else self.tta_
        n_views = len(tta_views(np.zeros((1, 1, 1, 3), np.uint8), mode))
        out = np.empty((n_views, len(arrays), len(self.classes_)), np.float32)
        for start in range(0, len(arrays), self.batch_size):
            batch = self._stack(arrays[start : start + self.batch_size], start)
            out[:, start : start + len(batch)] = self._view_logits(batch, mode)
        return out

    def _stack(self, arrays: Sequence[np.ndarray], offset: int = 0) -> np.ndarray:
        s = self._size
        out = np.empty((len(arrays), s, s, 3), np.uint8)
        for i, a in enumerate(arrays):
            if (
                not isinstance(a, np.ndarray)
                or a.ndim != 3
                or a.shape[2] != 3
                or a.dtype != np.uint8
            ):
                raise ValueError(
                    f"image {offset + i}: expected a preprocessed RGB HWC uint8 array, got "
                    f"{type(a).__name__} {getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}; "
                    "use predict_proba for raw images"
                )
            out[i] = a if a.shape[:2] == (s, s) else resize(a, s)
        return out

    # ------------------------------------------------------------------------------ batches

    def predict_preprocessed(
        self, arrays: Sequence[np.ndarray] | np.ndarray, *, progress: bool = False
    ) -> np.ndarray:
        """Probabilities for images already preprocessed with the bundle's parameters.

        Args:
            arrays: RGB HWC uint8 images (a list, or one ``(N, S, S, 3)`` array); an image not at
                ``input_size`` is resized.
            progress: show a progress bar.

        Returns:
            ``(N, K)`` float32 probabilities.
        """
        self._require_ready()
        n = len(arrays)
        k = len(self.classes_)
        if n == 0:
            return np.zeros((0, k), np.float32)
        whole = (
            isinstance(arrays, np.ndarray)
            and arrays.ndim == 4
            and arrays.dtype == np.uint8
            and arrays.shape[1:] == (self._size, self._size, 3)
        )
        out = np.empty((n, k), np.float32)
        bs = self.batch_size
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("Predicting", total=n)
            for start in range(0, n, bs):
                chunk = arrays[start : start + bs]
                batch = chunk if whole else self._stack(chunk, start)
                out[start : start + len(batch)] = self._probs_uint8(batch)
                bar.advance(task, len(batch))
        return out

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Class probabilities ``(N, K)`` (float32, columns in ``classes_`` order).

        Args:
            images: paths, encoded bytes, numpy arrays or PIL images (any mix).

        Raises:
            ImageReadError: an unreadable file (use :meth:`predict_paths` to get an error per
                file instead).
            TypeError: a single image instead of a sequence.
        """
        self._require_ready()
        if _is_single_image(images):
            raise TypeError(
                "predict_proba takes a sequence of images; wrap a single image in a list: "
                "predict_proba([image])"
            )
        if not isinstance(images, (Sequence, np.ndarray)):
            images = list(images)
        n = len(images)
        out = np.empty((n, len(self.classes_)), np.float32)
        bs = self.batch_size
        for start in range(0, n, bs):
            chunk = [self.preprocess(self.load(im)) for im in images[start : start + bs]]
            out[start : start + len(chunk)] = self._probs_uint8(np.stack(chunk))
        return out

    def predict(self, images: Sequence[Any]) -> list[str]:
        """Predicted class names (see :meth:`predict_proba`)."""
        probs = self.predict_proba(images)
        return [self.classes_[i] for i in probs.argmax(axis=1)]

    def predict_path_batches(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        workers: int = 0,
        progress: bool = True,
        decode: str = "auto",
    ) -> Iterator[list[PathPrediction]]:
        """Like :meth:`predict_paths`, one list per batch of ``batch_size`` files."""
        self._require_ready()
        names = [str(p) for p in paths]
        n_workers = min(resolve_workers(workers), max(1, len(names)))
        bs = self.batch_size
        chunk = max(1, -(-bs // n_workers))  # one batch is shared by all workers
        per_batch = -(-bs // chunk)
        loaded = iter_loaded(
            names,
            self.preprocess_config_,
            self._size,
            workers=n_workers,
            chunk_size=chunk,
            prefetch=max(2 * per_batch, n_workers + 1),
            decode=decode,
        )
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("Predicting", total=len(names))
            buf: list[tuple[str, np.ndarray | None, str | None]] = []
            for name, (arr, err) in zip(names, loaded, strict=True):
                buf.append((name, arr, err))
                if len(buf) == bs:
                    yield self._finish(buf)
                    bar.advance(task, len(buf))
                    buf = []
            if buf:
                yield self._finish(buf)
                bar.advance(task, len(buf))

    def _finish(self, buf: list[tuple[str, np.ndarray | None, str | None]]) -> list[PathPrediction]:
        good = [a for _, a, _ in buf if a is not None]
        probs = iter(self._probs_uint8(np.stack(good)) if good else ())
        return [
            PathPrediction(name, None, err)
            if arr is None
            else PathPrediction(name, next(probs), err, grayscale=is_grayscale(arr))
            for name, arr, err in buf
        ]

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        workers: int = 0,
        progress: bool = True,
        decode: str = "auto",
    ) -> Iterator[PathPrediction]:
        """Predict many files: decoding and preprocessing run in threads (JPEG, PNG) and worker
        processes (other formats), overlapped with inference, in batches of ``batch_size``;
        results come in input order.

        An unreadable, truncated, non-image or oversized file yields a :class:`PathPrediction`
        with ``error`` set; the run never stops for one file (a decoder that crashes the
        interpreter ends it only for a file decoded in a thread).

        Args:
            paths: image files.
            workers: decoding threads (processes); 0 = one per CPU core.
            progress: show a progress bar with images/s (on stderr).
            decode: ``auto`` (default: JPEG and PNG in threads, other formats in worker
                processes), ``processes`` (every file in a worker process: a crashing decoder
                costs only its file) or ``threads`` (:data:`~marrowscope.inference.batching.DECODE_MODES`;
                threads are faster next to a fast network, docs/benchmarks.md).
        """
        for batch in self.predict_path_batches(
            paths, workers=workers, progress=progress, decode=decode
        ):
            yield from batch


def default_metadata(
    model: Classifier, metadata: Mapping[str, Any] | BundleMetadata | None = None
) -> BundleMetadata:
    """The metadata of a bare model: its classes (or ``class_0..``), size, mean/std, and
    preprocessing = resize to the input size only; keys of ``metadata`` (a dict) replace these,
    a :class:`BundleMetadata` is returned as it is.

    Raises:
        PredictorError: a value of the wrong type in ``metadata``.
    """
    if isinstance(metadata, BundleMetadata):
        return metadata
    classes = list(model.classes or [f"class_{i}" for i in range(model.num_classes)])
    pre = PreprocessConfig(size=model.input_size, resize=True, denoise=False, sharpen=False)
    meta = {
        "format": BUNDLE_FORMAT,
        "marrowscope_version": __version__,
        "architecture": to_dict(model.config),
        "arch": model.arch,
        "classes": classes,
        "input_size": model.input_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "preprocess": preprocess_params(pre),
        **dict(metadata or {}),
    }
    try:
        return BundleMetadata.from_dict(meta, f"<metadata of model {model.arch}>")
    except MetadataError as e:
        raise PredictorError(str(e)) from None

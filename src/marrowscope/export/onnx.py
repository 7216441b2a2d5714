"""ONNX export of a checkpoint bundle, with its metadata embedded and a parity check.

``export_onnx`` writes the :class:`~marrowscope.models.registry.Classifier` (fp32, eval mode,
normalisation inside the graph) with a dynamic batch axis, input ``images`` (float32 NCHW in
[0, 1]) and output ``logits``. The bundle's metadata (classes, input size, preprocessing, ...)
is stored as JSON under ``metadata_props["marrowscope"]``, so the ``.onnx`` file alone is enough
for :class:`~marrowscope.inference.Predictor` (``backend="onnx"``).

Before the file is put in place, ONNX Runtime and PyTorch (fp32) are compared on random images
and on real cells (the bundled sample, preprocessed with the bundle's parameters): if the largest
absolute probability difference exceeds the tolerance (1e-4), :class:`ExportError` is raised and
no file is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marrowscope.data.sample import SAMPLE_ROOT
from marrowscope.inference.predictor import (
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUT,
    Predictor,
    default_metadata,
    default_onnx_path,
    softmax,
)
from marrowscope.metadata import BundleMetadata
from marrowscope.models.bundle import WEIGHTS_NAME, load_bundle, pretrained_bundle, shipped_name
from marrowscope.models.registry import Classifier, ModelError
from marrowscope.preprocess.ops import apply_preprocess, config_from_params, resize
from marrowscope.utils.image import ImageReadError, list_image_files, read_image
from marrowscope.utils.io import atomic_write, file_sha256

__all__ = [
    "DEFAULT_TOLERANCE",
    "ExportError",
    "ParityReport",
    "export_checkpoint",
    "export_onnx",
    "sample_images",
]

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
"""Largest accepted absolute difference between ONNX Runtime and PyTorch fp32 probabilities."""


class ExportError(ModelError):
    """The model cannot be exported, or the exported model disagrees with PyTorch."""


@dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduces PyTorch fp32 (max abs probability difference)."""

    random_max_abs_diff: float
    real_max_abs_diff: float
    n_random: int
    n_real: int
    tolerance: float
    exporter: str
    opset: int | None

    @property
    def max_abs_diff(self) -> float:
        """The larger of the two differences."""
        return max(self.random_max_abs_diff, self.real_max_abs_diff)

    @property
    def passed(self) -> bool:
        """True when both differences are within the tolerance."""
        return self.max_abs_diff <= self.tolerance


def sample_images(
    params: Mapping[str, Any], size: int, *, root: Path = SAMPLE_ROOT, per_class: int = 2
) -> list[np.ndarray]:
    """Real cells for the parity check: ``per_class`` images of each bundled sample class,
    preprocessed with ``params`` (a bundle's ``preprocess`` entry) at ``size``."""
    cfg = config_from_params(dict(params))
    out = []
    if not root.is_dir():
        return out
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for p in list_image_files(cls_dir)[0][:per_class]:
            try:
                arr = apply_preprocess(read_image(p), cfg)
            except ImageReadError:
                continue
            out.append(arr if arr.shape[:2] == (size, size) else resize(arr, size))
    return out


def _written_opset(path: Path) -> int | None:
    """The default-domain opset of the ONNX file at ``path`` (None when it names none)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _opset_problem(path: Path, opset: int | None) -> str | None:
    """``None`` when no opset was asked for or the file at ``path`` carries it, else
    ``"wrote opset N"``."""
    if opset is None:
        return None
    written = _written_opset(path)
    return None if written == opset else f"wrote opset {written}"


def _torch_export(model: Classifier, path: Path, *, opset: int | None) -> str:
    """Export to ``path``; returns the exporter used (``dynamo``, else ``torchscript``).

    With ``opset`` given, the written file must carry that opset: the dynamo exporter may raise
    it (to the lowest opset it can write), so then the TorchScript exporter is tried.

    Raises:
        ExportError: neither exporter can export the model, or none writes ``opset``.
    """
    size = model.input_size
    example = (torch.rand(2, 3, size, size),)  # batch 2: torch.export does not specialise it
    errors = []
    quiet = io.StringIO()
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        with (
            contextlib.redirect_stdout(quiet),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=True,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_shapes={"x": {0: batch}},
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        problem = _opset_problem(path, opset)
        if problem is None:
            return "dynamo"
        errors.append(f"dynamo: {problem}")
        log.info("the dynamo exporter %s, not %s; trying TorchScript", problem, opset)
    except Exception as e:  # the dynamo exporter cannot trace every timm model yet
        errors.append(f"dynamo: {type(e).__name__}: {str(e)[:500]}")
        log.warning("the torch.export-based ONNX exporter failed (%s); trying TorchScript", e)
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=False,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                opset_version=opset or 17,
                do_constant_folding=True,
            )
        problem = _opset_problem(path, opset)
        if problem is None:
            return "torchscript"
        errors.append(f"torchscript: {problem}")
    except Exception as e:
        errors.append(f"torchscript: {type(e).__name__}: {str(e)[:500]}")
    if any(": wrote opset " in e for e in errors):
        path.unlink(missing_ok=True)  # not the opset asked for: leave no file that looks usable
    if opset is not None and all(": wrote opset " in e for e in errors):
        raise ExportError(
            f"--opset {opset} was asked for, but the exporters write another opset "
            f"({'; '.join(errors)}); leave out --opset, or pass one of those"
        )
    raise ExportError(
        f"cannot export {model.arch!r} to ONNX with either exporter ({'; '.join(errors)}); "
        "try another --opset or another model"
    )


def _embed_metadata(path: Path, meta: BundleMetadata) -> int | None:
    """Write ``meta`` into the model's ``metadata_props``; returns the default-domain opset."""
    import onnx

    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props[ONNX_METADATA_KEY] = meta.to_json()
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "marrowscope"
    m.doc_string = (
        f"marrowscope {meta.arch} classifier: input '{ONNX_INPUT}' float32 NCHW RGB in "
        f"[0, 1] (normalised inside), output '{ONNX_OUTPUT}' over classes "
        f"{', '.join(meta.classes)}"
    )
    onnx.save(m, str(path))
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _max_diff(ref: Classifier, pred: Predictor, x: np.ndarray, batch: int) -> float:
    worst = 0.0
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            p_torch = softmax(ref(torch.from_numpy(xb)).float().numpy())
            p_onnx = softmax(pred.logits(xb))
            worst = max(worst, float(np.abs(p_torch - p_onnx).max()))
    return worst


def check_parity(
    model: Classifier,
    onnx_path: Path,
    *,
    real: Sequence[np.ndarray],
    n_random: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
    exporter: str = "",
    opset: int | None = None,
    seed: int = 0,
) -> ParityReport:
    """Compare ONNX Runtime (through :class:`Predictor`) with PyTorch fp32 on random images and
    on ``real`` preprocessed RGB uint8 images, at batch sizes 1 and up to 8."""
    pred = Predictor.from_checkpoint(onnx_path, backend="onnx", batch_size=8)
    size = model.input_size
    rng = np.random.default_rng(seed)
    x_rand = rng.random((n_random, 3, size, size), dtype=np.float32)
    d_rand = max(_max_diff(model, pred, x_rand[:1], 1), _max_diff(model, pred, x_rand, 8))
    d_real = 0.0
    if len(real):
        x_real = np.stack(real).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        d_real = _max_diff(model, pred, np.ascontiguousarray(x_real), 8)
    return ParityReport(
        random_max_abs_diff=d_rand,
        real_max_abs_diff=d_real,
        n_random=n_random,
        n_real=len(real),
        tolerance=tolerance,
        exporter=exporter,
        opset=opset,
    )


def export_onnx(
    model: Classifier,
    out: str | os.PathLike[str],
    metadata: Mapping[str, Any] | BundleMetadata | None = None,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    real_images: Sequence[np.ndarray] | None = None,
    n_random: int = 8,
    weights_sha256: str | None = None,
) -> ParityReport:
    """Export ``model`` to ``out`` (atomically), embed ``metadata`` and check parity.

    Args:
        model: the classifier (not modified; a CPU fp32 eval copy is exported).
        out: the ``.onnx`` file to write.
        metadata: bundle metadata to embed (default: derived from the model).
        opset: ONNX opset (default: the exporter's).
        tolerance: largest accepted absolute probability difference.
        real_images: preprocessed RGB uint8 images for the check (default: the bundled sample
            preprocessed with ``metadata["preprocess"]``).
        n_random: random images in the check.
        weights_sha256: SHA-256 of the bundle's weights file, recorded so that a stale
            ``model.onnx`` (older than the weights) is refused at load time.

    Returns:
        The parity report (also embedded in the metadata, under ``onnx.parity``).

    Raises:
        ExportError: the export fails, or the parity check exceeds ``tolerance`` (``out`` is
            then left as it was).
    """
    ref = copy.deepcopy(getattr(model, "_orig_mod", model)).to("cpu", torch.float32)
    ref = ref.to(memory_format=torch.contiguous_format).eval()
    meta = default_metadata(ref, metadata)
    size = meta.input_size
    if size != ref.input_size:
        raise ExportError(f"metadata input size {size} differs from the model's {ref.input_size}")
    real = (
        list(real_images) if real_images is not None else sample_images(meta.preprocess or {}, size)
    )
    out = Path(out)
    result: dict[str, ParityReport] = {}

    def write(tmp: Path) -> None:
        exporter = _torch_export(ref, tmp, opset=opset)
        info = {
            "exporter": exporter,
            "opset": None,
            "torch_version": torch.__version__,
            "weights_sha256": weights_sha256,
            "input": ONNX_INPUT,
            "output": ONNX_OUTPUT,
            "dynamic_batch": True,
        }
        embedded = meta.replace(onnx=info)  # info is completed below and embedded again
        info["opset"] = _embed_metadata(tmp, embedded)
        report = check_parity(
            ref,
            tmp,
            real=real,
            n_random=n_random,
            tolerance=tolerance,
            exporter=exporter,
            opset=info["opset"],
        )
        result["report"] = report
        if not report.passed:
            raise ExportError(
                f"ONNX parity check failed for {out}: max abs probability difference "
                f"{report.max_abs_diff:.3g} (random images {report.random_max_abs_diff:.3g}, "
                f"real images {report.real_max_abs_diff:.3g}) exceeds {tolerance:g}; no ONNX "
                "file was written; try another --opset or report the model name"
            )
        info["parity"] = asdict(report)
        _embed_metadata(tmp, embedded)

    atomic_write(out, write)
    return result["report"]


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[Path, ParityReport]:
    """Export a checkpoint bundle or shipped model to ONNX.

    The default output is where the onnx backend looks
    (:func:`~marrowscope.inference.predictor.default_onnx_path`): ``CHECKPOINT/model.onnx``,
    or for a shipped model ``$MARROWSCOPE_CACHE/onnx/NAME/model.onnx`` (never a ``./NAME``
    folder, which would hide the shipped model, nor the package folder). The SHA-256 of the
    weights it comes from is recorded, so that a stale export is refused at load time.

    Raises:
        BundleError: the checkpoint cannot be loaded.
        ExportError: export or parity failure (nothing written).
    """
    model, meta = load_bundle(checkpoint, device="cpu")
    target = Path(out) if out is not None else default_onnx_path(checkpoint)
    if target.is_dir():
        raise ExportError(f"{target} is a folder; pass a file name ending in .onnx")
    name = shipped_name(checkpoint, folder=True)
    folder = pretrained_bundle(name) if name is not None else Path(checkpoint).expanduser()
    weights = folder / WEIGHTS_NAME
    sha = file_sha256(weights) if weights.is_file() else None
    report = export_onnx(model, target, meta, opset=opset, tolerance=tolerance, weights_sha256=sha)
    return target, report

"""int8 export of a checkpoint bundle (OpenVINO + NNCF static quantisation) with an accuracy guard.

``export_int8_checkpoint(CK)`` (``marrowscope export CK --format int8``):

1. **Calibration images**: by default a stratified draw of :data:`CALIBRATION_SIZE` images of
   the bundle's own training split (:func:`~marrowscope.data.recorded.recorded_split`), or the
   images under a folder the user names (``calibrate=DIR``, e.g. cells from their own scanner);
   preprocessed exactly as ``predict`` does. Which images were used is recorded in the export.
2. **Quantisation**: the PyTorch model (normalisation inside) is converted to OpenVINO with a
   dynamic batch axis, and NNCF's post-training quantisation computes the int8 ranges of weights
   (per channel) and activations on the calibration images, then corrects the biases layer by
   layer. A bundle that predicts with test-time augmentation sees rotated and flipped cells, so
   each calibration image is then shown in one random view of the same group (seeded).
3. **Accuracy guard**: PyTorch fp32 and the int8 model predict the held-out labelled cells (the
   bundle's validation split by default, or ``guard_data=DIR``, a folder per class) with the
   bundle's own prediction rule (test-time augmentation and temperature); top-1 agreement,
   macro-F1 of each with the paired-bootstrap CI of the drop, and the largest probability
   difference are computed (:func:`~marrowscope.metrics.agreement.guard_report`; the same numbers
   for a single view are recorded too). If macro-F1 drops by more than ``max_f1_drop`` (0.005) or
   agreement is below ``min_agreement`` (0.99), :class:`GuardFailedError` names the numbers and
   nothing is written, unless ``force=True``.
   **Re-check** (``recheck="auto"``, the default): int8 and fp32 disagree almost only on cells
   whose top two probabilities are nearly tied, so the int8 backend predicts such cells again
   with the fp32 model (saved beside the int8 one, :data:`RECHECK_XML`). The margin is fitted
   before the guard, on training cells that are not calibration cells: the 99th percentile of
   how much int8 changes the gap between its top two probabilities
   (:func:`fit_recheck_margin`). The guard measures the backend with its re-check.
4. **Streams**: the int8 model is timed with one OpenVINO stream and with two (each half a
   batch) on a batch of calibration images, and the faster is recorded (``streams``; two only
   when 5% faster), which the int8 backend then uses (:func:`measure_streams`).
5. The export folder (``model.xml``, ``model.bin``, ``model_fp32.*`` when there is a re-check,
   ``metadata.json`` with an ``int8`` section
   holding all of the above) is written as a new version of the folder
   (:func:`~marrowscope.utils.io.versioned_folder`): the files go to a fresh staging folder
   beside it, and only a complete export becomes current, in one rename. A failed or
   interrupted export leaves the previous one (or none) and no staging folder; two exports of
   the same model at the same time (two ``export`` runs, or two users of one cache) both
   succeed, the one that finishes last is current, and a ``predict --backend int8`` loading
   meanwhile reads one complete export, the old or the new.

Why OpenVINO + NNCF and not ONNX Runtime's own static quantisation: measured on this project's
CPU (AVX-512 VNNI, no AMX) it was the faster int8 runtime for every model tried (see
docs/benchmarks.md, "Choosing the int8 runtime"). OpenVINO and NNCF are an optional extra:
``pip install 'marrowscope[int8]'``.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marrowscope import __version__
from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow
from marrowscope.data.recorded import recorded_split, stratified_subset
from marrowscope.data.sample import resolve_root
from marrowscope.data.scan import scan_folder
from marrowscope.export.onnx import ExportError
from marrowscope.inference.batching import collect_image_paths, iter_loaded
from marrowscope.inference.openvino_runtime import (
    INSTALL_HINT,
    INT8_XML,
    RECHECK_XML,
    OpenVINORunner,
    RuntimeMissingError,
    default_int8_dir,
    import_openvino,
)
from marrowscope.inference.predictor import ONNX_INPUT, ONNX_OUTPUT, Predictor, tta_views
from marrowscope.metadata import TTA_MODES, BundleMetadata
from marrowscope.metrics.agreement import (
    DEFAULT_MAX_F1_DROP,
    DEFAULT_MIN_AGREEMENT,
    GuardReport,
    guard_report,
)
from marrowscope.metrics.classification import softmax
from marrowscope.models.bundle import (
    METADATA_NAME,
    WEIGHTS_NAME,
    load_bundle,
    pretrained_bundle,
    shipped_name,
)
from marrowscope.models.registry import Classifier
from marrowscope.preprocess.ops import config_from_params
from marrowscope.utils.io import file_sha256, is_versioned_folder, versioned_folder

__all__ = [
    "CALIBRATION_SIZE",
    "RECHECK_CELLS",
    "GuardFailedError",
    "Int8Export",
    "LabelledImages",
    "calibration_images",
    "calibration_views",
    "convert_openvino",
    "export_int8",
    "export_int8_checkpoint",
    "guard_images",
    "fit_recheck_margin",
    "measure_streams",
    "quantize_openvino",
    "save_int8",
]

log = logging.getLogger(__name__)

CALIBRATION_SIZE = 300
"""Calibration images drawn by default (NNCF's default subset size; more barely moves int8
ranges, fewer starts to)."""


RECHECK_COVERAGE = 0.99
"""``recheck="auto"``: the margin is this quantile of how much int8 changes the gap between a
cell's top two probabilities (:func:`fit_recheck_margin`)."""
RECHECK_MAX_SHARE = 0.15
"""``recheck="auto"`` never picks a margin that re-checks more than this share of the cells it
is fitted on (the re-check runs fp32, about 3x slower per cell than int8)."""
RECHECK_CELLS = 600
"""``recheck="auto"``: training cells (not calibration cells) the margin is fitted on."""


class GuardFailedError(ExportError):
    """The int8 model predicts too differently from fp32; the message names the numbers."""

    def __init__(self, message: str, report: GuardReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class LabelledImages:
    """Image files with their class indices, and where they came from (in words)."""

    paths: list[str]
    labels: list[int]
    source: str
    note: str = ""


@dataclass(frozen=True)
class Int8Export:
    """What :func:`export_int8` wrote and measured."""

    path: Path
    guard: GuardReport
    guard_single_view: GuardReport
    calibration: dict[str, Any]
    guard_data: str
    guard_tta: str
    forced: bool
    streams: dict[str, Any] | None = None
    """The streams measurement (:func:`measure_streams`) and the choice recorded."""
    recheck: dict[str, Any] | None = None
    """The fp32 re-check of uncertain cells (:func:`fit_recheck_margin`); margin 0 = none."""
    guard_rechecked: float | None = None
    """Share of the guard cells the int8 backend re-checked in fp32."""

    @property
    def passed(self) -> bool:
        """True when the guard passed (it may have been overridden with ``force``)."""
        return self.guard.passed


# ------------------------------------------------------------------------------ image sets


def _common_root(paths: Sequence[str]) -> str:
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # mixed drives / relative and absolute
        return ""


def calibration_images(
    bundle_dir: Path | None,
    meta: BundleMetadata,
    *,
    calibrate: str | os.PathLike[str] | None = None,
    size: int = CALIBRATION_SIZE,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> tuple[list[str], dict[str, Any]]:
    """The calibration files and the record of how they were chosen (stored in the export).

    Args:
        bundle_dir: the bundle folder (for its ``split.csv``), or ``None``.
        meta: the bundle's metadata.
        calibrate: a folder of the user's cells (any layout; labels are not needed), or
            ``None`` for the bundle's training split.
        size: images to draw (all of them when there are fewer).
        seed: seed of the draw.
        exclude: files never drawn (e.g. the calibration cells, for another draw).

    Raises:
        DataError: no training split can be found, or the folder has no image.
    """
    if size < 1:
        raise ValueError(f"the calibration size must be >= 1, got {size}")
    if calibrate is not None:
        files = [str(p) for p in collect_image_paths([resolve_root(calibrate)])]
        rows = [ManifestRow(path=p, label=Path(p).parent.name) for p in files]
        source = f"user folder {calibrate}"
    else:
        split = recorded_split(bundle_dir, meta)
        rows = split.split("train")
        if not rows:
            raise DataError(f"the training split of {split.source} is empty; pass --calibrate DIR")
        source = f"training split ({split.source})"
    if exclude:
        skip = set(exclude)
        rows = [r for r in rows if r.path not in skip]
        if not rows:
            return [], {"source": source, "n": 0, "of": 0, "seed": seed, "files": []}
    chosen = stratified_subset(rows, size, seed=seed)
    files = [r.path for r in chosen]
    root = _common_root(files)
    record = {
        "source": source,
        "n": len(files),
        "of": len(rows),
        "seed": seed,
        "per_class": dict(Counter(r.label for r in chosen)) if calibrate is None else None,
        "root": root,
        "files": [os.path.relpath(f, root) if root else f for f in files],
    }
    return files, record


def guard_images(
    bundle_dir: Path | None,
    meta: BundleMetadata,
    *,
    guard_data: str | os.PathLike[str] | None = None,
) -> LabelledImages:
    """The held-out labelled cells of the accuracy guard.

    Args:
        bundle_dir: the bundle folder (for its ``split.csv``), or ``None``.
        meta: the bundle's metadata.
        guard_data: a folder with one sub-folder per class (or ``builtin:bm-sample``); class
            folders the model does not know are left out (and named in ``note``). ``None``: the
            bundle's validation split.

    Raises:
        DataError: no validation split, or a folder without any image of the model's classes.
    """
    index = {c: i for i, c in enumerate(meta.classes)}
    if guard_data is None:
        split = recorded_split(bundle_dir, meta)
        rows = split.split("val")
        if not rows:
            raise DataError(
                f"the validation split of {split.source} is empty; pass --guard-data DIR (a "
                "folder per class of labelled cells the model never trained on)"
            )
        return LabelledImages(
            paths=[r.path for r in rows],
            labels=[index[r.label] for r in rows],
            source=f"validation split ({split.source})",
        )
    root = resolve_root(guard_data)
    scan = scan_folder(root, check_images=False, progress=False)
    known = [c for c in scan.classes if c in index and scan.files[c]]
    unknown = [c for c in scan.classes if c not in index and scan.counts[c]]
    if not known:
        raise DataError(
            f"{root}: no class folder named like a class of the model ({', '.join(meta.classes)}); "
            "--guard-data needs a folder per class of labelled cells"
        )
    paths = [str(p) for c in known for p in scan.files[c]]
    labels = [index[c] for c in known for _ in scan.files[c]]
    note = (
        f"left out class folders the model does not know: {', '.join(unknown)}" if unknown else ""
    )
    if note:
        log.warning("%s: %s", root, note)
    return LabelledImages(paths=paths, labels=labels, source=f"folder {guard_data}", note=note)


def _load_arrays(
    paths: Sequence[str], meta: BundleMetadata, *, workers: int, what: str
) -> tuple[np.ndarray, list[int]]:
    """Decode + preprocess ``paths`` as ``predict`` does: ``(N, S, S, 3)`` uint8 and the indices
    of the files that could be used (unreadable ones are skipped with a warning)."""
    cfg = config_from_params(dict(meta.preprocess or {}))
    size = meta.input_size
    out = np.empty((len(paths), size, size, 3), np.uint8)
    kept: list[int] = []
    bad = 0
    for i, (arr, err) in enumerate(iter_loaded(paths, cfg, size, workers=workers)):
        if arr is None:
            bad += 1
            log.warning("%s image skipped: %s", what, err)
            continue
        out[len(kept)] = arr
        kept.append(i)
    if not kept:
        raise DataError(f"none of the {len(paths)} {what} images could be read; check the files")
    return out[: len(kept)], kept


def calibration_views(images: np.ndarray, tta: str, *, seed: int = 0) -> np.ndarray:
    """Each image in one random view of the test-time augmentation ``tta`` (seeded), so the
    int8 ranges cover what the network sees when it predicts; ``none`` returns ``images``."""
    if tta == "none" or not len(images):
        return images
    n_views = len(tta_views(images[:1], tta))
    pick = np.random.default_rng(seed).integers(0, n_views, len(images))
    out = np.empty_like(images)
    for v in range(n_views):
        idx = np.flatnonzero(pick == v)
        if idx.size:
            out[idx] = tta_views(images[idx], tta)[v]
    return out


# --------------------------------------------------------------------------------- quantise


def _require_nncf() -> tuple[Any, Any]:
    ov = import_openvino()
    try:
        import nncf
    except ImportError:
        raise RuntimeMissingError(
            f"the int8 export quantises with NNCF, which is not installed: {INSTALL_HINT}"
        ) from None
    return ov, nncf


def convert_openvino(model: Classifier) -> Any:
    """``model`` as an fp32 ``openvino.Model``: input ``images`` (float32 NCHW in [0, 1], dynamic
    batch), output ``logits`` (normalisation inside, as in the PyTorch model).

    Raises:
        RuntimeMissingError: OpenVINO is not installed.
        ExportError: the conversion fails.
    """
    ov = import_openvino()
    ref = copy.deepcopy(getattr(model, "_orig_mod", model)).to("cpu", torch.float32).eval()
    ref = ref.to(memory_format=torch.contiguous_format)
    size = ref.input_size
    try:
        with torch.inference_mode():
            ov_model = ov.convert_model(
                ref,
                example_input=torch.rand(1, 3, size, size),
                input=[ov.PartialShape([-1, 3, size, size])],
            )
    except Exception as e:
        raise ExportError(
            f"OpenVINO cannot convert {ref.arch!r} ({type(e).__name__}: {str(e)[:300]}); use "
            "--format onnx, or report the model name"
        ) from None
    ov_model.input(0).get_tensor().set_names({ONNX_INPUT})
    ov_model.output(0).get_tensor().set_names({ONNX_OUTPUT})
    return ov_model


def fit_recheck_margin(
    p_fp32: np.ndarray,
    p_int8: np.ndarray,
    *,
    coverage: float = RECHECK_COVERAGE,
    max_share: float = RECHECK_MAX_SHARE,
) -> dict[str, Any]:
    """The margin below which the int8 backend re-checks a cell in fp32.

    int8 can change a cell's top-1 class only when its perturbation of the two leading
    probabilities is larger than the gap between them. So the margin is a high quantile
    (``coverage``) of that perturbation, measured on cells the guard does not use: the absolute
    change, int8 against fp32, of the difference between int8's top two probabilities. A cell
    whose int8 top two are closer than that is predicted again in fp32 and gets fp32's answer.
    This depends on how much int8 perturbs the probabilities, not on how confident the model is
    on these cells (training cells are easier than new ones: int8 alone agrees with fp32 more
    often on them), so it carries over to new cells, where more cells fall under the margin.
    The margin is rounded up to a multiple of 0.01 and lowered, when needed, until at most
    ``max_share`` of these cells are re-checked.

    Args:
        p_fp32: ``(N, K)`` fp32 probabilities (the bundle's prediction rule).
        p_int8: the int8 model's probabilities of the same cells.
        coverage: the quantile of the perturbation the margin covers.
        max_share: the largest share of these cells the margin may re-check.

    Returns:
        ``{"margin", "cells", "coverage", "perturbation_quantile", "share", "agreement_int8",
        "agreement_with_recheck", "max_share", "capped"}`` (shares and agreements on these
        cells; a re-checked cell counts as agreeing).
    """
    if p_fp32.shape != p_int8.shape or p_fp32.ndim != 2 or len(p_fp32) == 0:
        raise ValueError(
            f"need two (N, K) probability arrays of the same shape, got {p_fp32.shape} and "
            f"{p_int8.shape}"
        )
    if not 0.0 < coverage <= 1.0 or not 0.0 <= max_share <= 1.0:
        raise ValueError(
            f"coverage must be in (0, 1] and max_share in [0, 1], got {coverage}, {max_share}"
        )
    rows = np.arange(len(p_int8))
    order = np.argsort(p_int8, axis=1)
    if p_int8.shape[1] < 2:  # one class: nothing can flip
        gap, change = np.ones(len(p_int8)), np.zeros(len(p_int8))
    else:
        first, second = order[:, -1], order[:, -2]
        gap = p_int8[rows, first] - p_int8[rows, second]
        change = np.abs(gap - (p_fp32[rows, first] - p_fp32[rows, second]))
    q = float(np.quantile(change, coverage))
    margin = min(1.0, float(np.ceil(round(q * 100, 6)) / 100))
    capped = False
    while margin > 0 and (gap < margin).mean() > max_share:
        margin, capped = round(margin - 0.01, 2), True
    checked = gap < margin
    agree = p_fp32.argmax(1) == p_int8.argmax(1)
    return {
        "margin": margin,
        "cells": len(p_int8),
        "coverage": coverage,
        "perturbation_quantile": round(q, 4),
        "share": round(float(checked.mean()), 4),
        "agreement_int8": round(float(agree.mean()), 4),
        "agreement_with_recheck": round(float((agree | checked).mean()), 4),
        "max_share": max_share,
        "capped": capped,
    }


def quantize_openvino(
    model: Classifier, calibration: np.ndarray, *, fast_bias_correction: bool = False
) -> Any:
    """Statically quantise ``model`` to int8 for OpenVINO (NNCF post-training quantisation).

    Args:
        model: the classifier (not modified; a CPU fp32 eval copy is converted).
        calibration: ``(N, S, S, 3)`` uint8 preprocessed RGB images.
        fast_bias_correction: NNCF's fast bias correction instead of the full one (off: on the
            shipped bm8 the full correction raised agreement with fp32 on its validation
            split from 96.8% to 98.2%, for about twice the quantisation time).

    Returns:
        The quantised ``openvino.Model``: input ``images`` (float32 NCHW in [0, 1], dynamic
        batch), output ``logits``.

    Raises:
        RuntimeMissingError: OpenVINO or NNCF is not installed.
        ExportError: the conversion or the quantisation fails.
    """
    _, nncf = _require_nncf()
    ov_model = convert_openvino(model)

    def to_input(img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img[None].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    dataset = nncf.Dataset(list(calibration), to_input)
    try:
        return nncf.quantize(
            ov_model,
            dataset,
            subset_size=len(calibration),
            fast_bias_correction=fast_bias_correction,
        )
    except Exception as e:
        raise ExportError(
            f"NNCF cannot quantise {model.arch!r} ({type(e).__name__}: {str(e)[:300]}); use "
            "--format onnx, or report the model name"
        ) from None


def measure_streams(
    xml: Path, images: np.ndarray, *, threads: int, rounds: int = 3, min_time: float = 0.25
) -> dict[str, Any]:
    """Time the int8 model with one stream and with two (each half a batch, at the same time)
    on ``images`` (uint8 ``(N, S, S, 3)``, a batch of up to 16), in alternating rounds.

    Two streams are chosen only when their median rate is at least 5% above one stream's (one
    stream is the better choice for a single image, and the safe one when they tie).

    Returns:
        ``{"streams": 1|2, "images_per_s": {"1": .., "2": ..}, "batch", "threads", "rounds"}``
        (``images_per_s`` is ``None`` with one thread: nothing to split).
    """
    batch = np.ascontiguousarray(images[:16])
    record: dict[str, Any] = {"batch": len(batch), "threads": threads, "rounds": rounds}
    if threads < 2 or len(batch) < 2:
        return {"streams": 1, "images_per_s": None, **record}
    runners = {k: OpenVINORunner(xml, threads=threads, streams=k) for k in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    for runner in runners.values():
        runner.infer_uint8(batch)  # warm-up
    for _ in range(rounds):
        for k, runner in runners.items():
            n, t0 = 0, time.perf_counter()
            while True:
                runner.infer_uint8(batch)
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_time:
                    break
            times[k].append(n * len(batch) / elapsed)
    rate = {k: statistics.median(v) for k, v in times.items()}
    return {
        "streams": 2 if rate[2] >= 1.05 * rate[1] else 1,
        "images_per_s": {str(k): round(v, 1) for k, v in rate.items()},
        **record,
    }


# ------------------------------------------------------------------------------------ export


def save_int8(quantized: Any, meta: BundleMetadata, folder: str | os.PathLike[str]) -> Path:
    """Write a quantised OpenVINO model and its metadata (which needs an ``int8`` section) as an
    int8 export folder, atomically; no guard (``export_int8`` is the checked path)."""
    ov = import_openvino()
    if not meta.int8:
        raise ValueError("the metadata of an int8 export needs an 'int8' section")

    def write(tmp: Path) -> None:
        ov.save_model(quantized, str(tmp / INT8_XML), compress_to_fp16=False)
        meta.write(tmp / METADATA_NAME)

    return versioned_folder(Path(folder), write)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {
        "marrowscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for dist in ("openvino", "nncf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _guards(
    ref: Predictor,
    int8: Predictor,
    arrays: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    max_f1_drop: float,
    min_agreement: float,
) -> tuple[GuardReport, GuardReport]:
    """The guard with the prediction rule of ``ref`` (TTA views, temperature), and for a single
    view (the identity view, temperature 1)."""
    v_ref = ref.view_logits_preprocessed(arrays)
    v_int8 = int8.view_logits_preprocessed(arrays)
    t = ref.temperature_
    rule = [
        softmax(v / t).mean(axis=0, dtype=np.float32) for v in (v_ref, v_int8)
    ]  # as Predictor._probs_uint8
    # single view: the backend as --tta none runs it (its re-check decided on that one view)
    one = v_int8[0] if int8.tta_ == "none" else int8.view_logits_preprocessed(arrays, tta="none")[0]
    single = [softmax(v_ref[0]), softmax(one)]
    kw = {"max_f1_drop": max_f1_drop, "min_agreement": min_agreement}
    return (
        guard_report(labels, rule[0], rule[1], classes, **kw),
        guard_report(labels, single[0], single[1], classes, **kw),
    )


def export_int8(
    model: Classifier,
    meta: BundleMetadata,
    out: str | os.PathLike[str],
    *,
    calibration: np.ndarray,
    calibration_record: dict[str, Any],
    guard_arrays: np.ndarray,
    guard_labels: Sequence[int],
    guard_source: str,
    guard_tta: str | None = None,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    force: bool = False,
    weights_sha256: str | None = None,
    source: str = "",
    batch_size: int = 32,
    recheck: str | float = "auto",
    recheck_images: np.ndarray | None = None,
) -> Int8Export:
    """Quantise ``model``, check it against PyTorch fp32 and write the export folder atomically
    (a new version of it: :func:`~marrowscope.utils.io.versioned_folder`).

    Args:
        model: the classifier.
        meta: its bundle metadata (classes, preprocessing, prediction rule).
        out: the export folder to create or update (its current version is replaced).
        calibration: ``(N, S, S, 3)`` uint8 preprocessed calibration images.
        calibration_record: how they were chosen (stored in the metadata).
        guard_arrays: ``(M, S, S, 3)`` uint8 preprocessed labelled images.
        guard_labels: their class indices.
        guard_source: where they came from, in words.
        guard_tta: test-time augmentation of the guard (``None``: the bundle's).
        max_f1_drop: largest accepted macro-F1 drop.
        min_agreement: smallest accepted top-1 agreement.
        force: write the export even when the guard fails (recorded as ``forced``).
        weights_sha256: SHA-256 of the source weights (a stale export is refused at load time).
        source: the checkpoint it came from (recorded).
        batch_size: images per forward pass of the guard.
        recheck: the fp32 re-check of uncertain cells: ``"auto"`` (the margin fitted on
            ``recheck_images`` by :func:`fit_recheck_margin`), ``"off"`` (pure int8), or a margin
            in [0, 1]. With a margin above 0 the export also holds the fp32 OpenVINO model, and
            the int8 backend predicts every cell whose top-two int8 probabilities are closer than
            the margin again in fp32; the guard measures the backend with its re-check.
        recheck_images: ``(N, S, S, 3)`` uint8 preprocessed cells to fit the margin on (default:
            ``calibration``); never the guard's cells.

    Raises:
        ValueError: an unknown ``recheck``.
        GuardFailedError: the guard failed and ``force`` is off (nothing written).
        ExportError: conversion or quantisation failed.
        RuntimeMissingError: OpenVINO/NNCF missing.
    """
    ov, _ = _require_nncf()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; the int8 export is a folder; pick another --out")
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (out / INT8_XML).is_file()
        and not is_versioned_folder(out)  # (another export is putting its first version in)
    ):
        raise ExportError(
            f"refusing to replace {out}: a non-empty folder that is not an int8 export (no "
            f"{INT8_XML}); pick another --out"
        )
    tta = guard_tta if guard_tta is not None else meta.inference.tta
    if tta not in TTA_MODES:
        raise ValueError(f"unknown guard test-time augmentation {tta!r}; use {TTA_MODES}")
    fixed_margin = _recheck_setting(recheck)
    labels = np.asarray(guard_labels, dtype=np.int64)
    quantized = quantize_openvino(model, calibration)
    ref = Predictor.from_model(
        model, meta, device="cpu", precision="fp32", tta=tta, batch_size=batch_size
    )
    info: dict[str, Any] = {
        "runtime": "openvino",
        "quantizer": "nncf post-training static quantisation (per-channel int8 weights, "
        "int8 activations, full bias correction)",
        "versions": _versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        "weights_sha256": weights_sha256,
        "input": ONNX_INPUT,
        "output": ONNX_OUTPUT,
        "dynamic_batch": True,
        "calibration": calibration_record,
    }
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        ov.save_model(quantized, str(tmp / INT8_XML), compress_to_fp16=False)
        trial = calibration if len(calibration) else guard_arrays
        info["streams_measured"] = measure_streams(
            tmp / INT8_XML, trial, threads=torch.get_num_threads()
        )
        info["streams"] = info["streams_measured"]["streams"]
        meta.replace(int8=info).write(tmp / METADATA_NAME)
        if fixed_margin != 0.0:  # fitted with the bundle's own rule, the one predict uses
            rule_tta = meta.inference.tta
            info["recheck"] = _fit_recheck(
                ref
                if rule_tta == tta
                else Predictor.from_model(
                    model, meta, device="cpu", precision="fp32", tta=rule_tta, batch_size=batch_size
                ),
                Predictor.from_checkpoint(tmp, backend="int8", tta=rule_tta, batch_size=batch_size),
                recheck_images if recheck_images is not None else calibration,
                fixed_margin,
                "other cells drawn like the calibration cells"
                if recheck_images is not None
                else "the calibration cells",
            )
        else:
            info["recheck"] = {"margin": 0.0, "setting": "off"}
        if info["recheck"]["margin"] > 0:
            ov.save_model(convert_openvino(model), str(tmp / RECHECK_XML), compress_to_fp16=False)
        meta.replace(int8=info).write(tmp / METADATA_NAME)
        int8 = Predictor.from_checkpoint(tmp, backend="int8", tta=tta, batch_size=batch_size)
        rule, single = _guards(
            ref,
            int8,
            guard_arrays,
            labels,
            meta.classes,
            max_f1_drop=max_f1_drop,
            min_agreement=min_agreement,
        )
        result["guard"], result["single"] = rule, single
        result["rechecked"] = int8.recheck_share()
        margin = info["recheck"]["margin"]
        rechecked = (
            f"; int8 with its fp32 re-check of cells whose top two are closer than {margin:g}, "
            f"{result['rechecked']:.1%} of these cells"
            if margin > 0 and result["rechecked"] is not None
            else ""
        )
        if not rule.passed and not force:
            raise GuardFailedError(
                f"int8 accuracy guard failed for {source or out}: {'; '.join(rule.failures)} "
                f"(fp32 vs int8 with test-time augmentation {tta!r} on {rule.n} labelled cells "
                f"of the {guard_source}{rechecked}; {rule.summary()}). Nothing was written. "
                "Calibrate on "
                "cells like the ones you will classify (--calibrate DIR), check the guard cells "
                "(--guard-data DIR), or write it anyway with --force",
                rule,
            )
        info["guard"] = {
            **rule.to_dict(),
            "data": guard_source,
            "tta": tta,
            "forced": bool(force and not rule.passed),
            "single_view": single.to_dict(),
            "rechecked_share": result["rechecked"],
        }
        meta.replace(int8=info).write(tmp / METADATA_NAME)

    versioned_folder(out, write)
    return Int8Export(
        path=out,
        guard=result["guard"],
        guard_single_view=result["single"],
        calibration=calibration_record,
        guard_data=guard_source,
        guard_tta=tta,
        forced=bool(force and not result["guard"].passed),
        streams=info.get("streams_measured"),
        recheck=info.get("recheck"),
        guard_rechecked=result.get("rechecked"),
    )


def _recheck_setting(recheck: str | float) -> float | None:
    """``None`` for ``auto``, else the fixed margin (0 for ``off``)."""
    if recheck == "auto":
        return None
    if recheck == "off":
        return 0.0
    try:
        margin = float(recheck)
    except (TypeError, ValueError):
        raise ValueError(
            f"recheck must be auto, off or a margin in [0, 1], got {recheck!r}"
        ) from None
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"recheck must be auto, off or a margin in [0, 1], got {recheck!r}")
    return margin


def _fit_recheck(
    ref: Predictor, int8: Predictor, images: np.ndarray, fixed: float | None, source: str
) -> dict[str, Any]:
    """The ``recheck`` record: the margin (fitted on ``images`` when ``fixed`` is ``None``) and
    what int8 alone and int8 with the re-check do on those cells."""
    t = ref.temperature_
    p_ref, p_int8 = (
        softmax(p.view_logits_preprocessed(images) / t).mean(axis=0, dtype=np.float32)
        for p in (ref, int8)
    )
    fit = fit_recheck_margin(p_ref, p_int8)
    if fixed is not None:  # the user's margin, with what it does on these cells
        top = np.sort(p_int8, axis=1)
        checked = top[:, -1] - top[:, -2] < fixed
        agree = p_ref.argmax(1) == p_int8.argmax(1)
        fit.update(
            margin=fixed,
            share=round(float(checked.mean()), 4),
            agreement_with_recheck=round(float((agree | checked).mean()), 4),
            capped=False,
        )
    return {
        **fit,
        "setting": "auto" if fixed is None else "fixed",
        "fitted_on": f"{source}, with the bundle's prediction rule (test-time augmentation "
        f"{int8.tta_})",
        "model": RECHECK_XML,
    }


def export_int8_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    calibrate: str | os.PathLike[str] | None = None,
    calibration_size: int = CALIBRATION_SIZE,
    guard_data: str | os.PathLike[str] | None = None,
    guard_tta: str | None = None,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    force: bool = False,
    workers: int = 0,
    seed: int = 0,
    recheck: str | float = "auto",
    recheck_size: int = RECHECK_CELLS,
) -> Int8Export:
    """int8 export of a checkpoint bundle or shipped model (see the module docstring).

    Args:
        checkpoint: bundle folder or shipped model name.
        out: export folder (default: :func:`~marrowscope.inference.openvino_runtime.default_int8_dir`).
        calibrate: folder of calibration cells (default: the bundle's training split).
        calibration_size: calibration images to draw.
        guard_data: folder per class of labelled guard cells (default: the validation split).
        guard_tta: test-time augmentation of the guard (default: the bundle's).
        max_f1_drop: largest accepted macro-F1 drop.
        min_agreement: smallest accepted top-1 agreement.
        force: write even when the guard fails.
        workers: decoding threads or processes (0 = one per core).
        seed: seed of the calibration draw.
        recheck: ``auto``, ``off`` or a margin (see :func:`export_int8`).
        recheck_size: ``auto``: cells to fit the margin on, drawn like the calibration cells but
            none of them (all the others when there are fewer).

    Raises:
        ValueError: an unknown ``recheck``.
        BundleError: the checkpoint cannot be loaded.
        DataError: no calibration or guard images (the message says which flag to pass).
        GuardFailedError: the guard failed (nothing written).
        ExportError: conversion or quantisation failed.
        RuntimeMissingError: ``marrowscope[int8]`` is not installed.
    """
    fixed_margin = _recheck_setting(recheck)  # a bad value fails before any work
    if recheck_size < 1:
        raise ValueError(f"recheck_size must be >= 1, got {recheck_size}")
    model, meta = load_bundle(checkpoint, device="cpu")
    ck = Path(checkpoint).expanduser()
    name = shipped_name(checkpoint, folder=True)
    bundle_dir: Path | None = (
        pretrained_bundle(name) if name is not None else ck if ck.is_dir() else None
    )
    target = Path(out) if out is not None else default_int8_dir(checkpoint)
    calib_files, record = calibration_images(
        bundle_dir, meta, calibrate=calibrate, size=calibration_size, seed=seed
    )
    guard = guard_images(bundle_dir, meta, guard_data=guard_data)
    _require_nncf()  # fail before the images are read
    calib, _ = _load_arrays(calib_files, meta, workers=workers, what="calibration")
    calib = calibration_views(calib, meta.inference.tta, seed=seed)
    record["n_used"] = len(calib)
    record["views"] = (
        "as read"
        if meta.inference.tta == "none"
        else f"one random view of the bundle's test-time augmentation ({meta.inference.tta}) per "
        "image"
    )
    recheck_arrays = None
    if fixed_margin is None:  # auto: fit the margin on other cells than the calibration's
        others, _ = calibration_images(  # stratified like them, none of them
            bundle_dir,
            meta,
            calibrate=calibrate,
            size=recheck_size,
            seed=seed + 1,
            exclude=calib_files,
        )
        if others:
            recheck_arrays, _ = _load_arrays(others, meta, workers=workers, what="re-check fit")
            record["recheck_fit_cells"] = len(recheck_arrays)
    arrays, kept = _load_arrays(guard.paths, meta, workers=workers, what="guard")
    labels = [guard.labels[i] for i in kept]
    source = guard.source + (f"; {guard.note}" if guard.note else "")
    weights = bundle_dir / WEIGHTS_NAME if bundle_dir is not None else None
    sha = file_sha256(weights) if weights is not None and weights.is_file() else None
    return export_int8(
        model,
        meta,
        target,
        calibration=calib,
        calibration_record=record,
        guard_arrays=arrays,
        guard_labels=labels,
        guard_source=source,
        guard_tta=guard_tta,
        max_f1_drop=max_f1_drop,
        min_agreement=min_agreement,
        force=force,
        weights_sha256=sha,
        source=str(checkpoint),
        recheck=recheck,
        recheck_images=recheck_arrays,
    )

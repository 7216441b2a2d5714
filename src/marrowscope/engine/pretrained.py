"""Packing a trained bundle as a model that ships inside marrowscope (``bm8``, ``pbc6``, ...).

:func:`pack_pretrained` takes a trained checkpoint bundle and the labelled validation cells it
was never trained on — or, for a model refitted on every cell (``marrowscope cv --refit``), the
cross-validation that estimates it — and writes ``marrowscope/pretrained/NAME``:

1. the weights in float16 (half the size) when the rounding changes no prediction materially:
   the largest probability difference to the float32 weights over the validation cells must be
   at most ``tolerance`` (1e-3); otherwise in float32;
2. ``metadata.json`` with a ``pretrained`` block: name, description, the model card's prose, the
   validation (or pooled out-of-fold) metrics (bootstrap CIs, per-class F1, calibration), the
   fp16 parity and the speed;
3. ``MODEL_CARD.md`` rendered from that metadata;
4. the sha256 of the weights and metadata in ``pretrained/index.json``, checked on every load.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from marrowscope.engine.benchmark import machine_info
from marrowscope.engine.cv import RUNTIME_KEYS, out_of_fold_probs, saved_config
from marrowscope.engine.evaluate import evaluate_bundle, labelled_rows, score
from marrowscope.inference.predictor import Predictor
from marrowscope.metadata import BundleMetadata
from marrowscope.models import bundle as bundle_mod
from marrowscope.models.bundle import (
    INDEX_NAME,
    METADATA_NAME,
    WEIGHTS_NAME,
    BundleError,
    load_bundle,
    pretrained_index,
    read_metadata,
    save_bundle,
)
from marrowscope.models.registry import Classifier
from marrowscope.preprocess.cache import PreprocessCache
from marrowscope.preprocess.ops import config_from_params
from marrowscope.reports.model_card import render_model_card
from marrowscope.utils.io import atomic_write_json, atomic_write_text, file_sha256

__all__ = ["CARD_NAME", "fp16_copy", "pack_pretrained", "update_card"]

CARD_NAME = "MODEL_CARD.md"

_RECIPE_KEYS = ("seed", "preprocess", "augment", "model", "train", "inference")
"""The config sections a refit shares with the cross-validation that measures it."""


def _recipe_part(section: Any, key: str) -> Any:
    """A config section without its run-time settings (:data:`RUNTIME_KEYS`: threads, workers,
    device ...), which a resumed cross-validation or refit may have changed."""
    if not isinstance(section, dict):
        return section
    drop = {k.split(".", 1)[1] for k in RUNTIME_KEYS if k.startswith(f"{key}.")}
    return {k: v for k, v in section.items() if k not in drop}


_EVAL_KEYS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "ece",
    "ci95",
    "per_class",
    "confusion_matrix",
    "tta",
    "temperature",
)


def fp16_copy(model: Classifier) -> Classifier:
    """A float32 copy of ``model`` whose floating-point weights are rounded to float16 and back:
    exactly what a bundle saved with ``weights_dtype=torch.float16`` loads as."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in out.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return out


def _speed(model: Classifier, meta: BundleMetadata, images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Cells/s of ``model`` on up to 128 decoded, preprocessed cells, with no test-time
    augmentation and with the bundle's, as a user's predictor runs it (precision ``auto``)."""
    sample = list(images[:128])
    out: dict[str, Any] = {}
    for key, tta in (("images_per_s_tta_none", "none"), ("images_per_s_tta_bundle", None)):
        p = Predictor.from_model(model, meta, device="cpu", tta=tta)
        p.predict_preprocessed(sample[:8])  # warm-up
        t0 = time.perf_counter()
        p.predict_preprocessed(sample)
        out[key] = round(len(sample) / (time.perf_counter() - t0), 1)
    info = machine_info()
    out.update(machine=info["cpu"], threads=info["torch_threads"], precision=p.precision_.name)
    return out


def _unpublish(root: Path, name: str) -> None:
    """Take ``name`` off ``root``'s sha256 index before its files are rewritten: until
    :func:`_publish` records the new ones, the folder is not a shipped model (so nothing checks
    it against the old sha256, and an interrupted pack leaves no entry that its files fail)."""
    index = pretrained_index(root)
    if index.pop(name, None) is not None:
        atomic_write_json(root / INDEX_NAME, dict(sorted(index.items())))


def _publish(root: Path, name: str, description: str) -> None:
    """Render ``root/name``'s model card from its metadata and record its files' sha256."""
    out = root / name
    atomic_write_text(out / CARD_NAME, render_model_card(read_metadata(out)))
    index = pretrained_index(root)
    index[name] = {
        "description": description,
        "files": {f: file_sha256(out / f) for f in (WEIGHTS_NAME, METADATA_NAME)},
    }
    atomic_write_json(root / INDEX_NAME, dict(sorted(index.items())))


def pack_pretrained(
    bundle_dir: str | Path,
    name: str,
    *,
    val_source: str | Path | None = None,
    cv_dir: str | Path | None = None,
    description: str,
    card: Mapping[str, Any],
    out_root: Path | None = None,
    tolerance: float = 1e-3,
    checkpoint_label: str = "last",
    allow_float32: bool = True,
    console: Console | None = None,
) -> Path:
    """Write ``out_root/name`` (fp16 weights, metadata, model card) and its index entry.

    Args:
        bundle_dir: the trained bundle (with its fitted temperature).
        name: the shipped name (a plain word: ``bm8``).
        val_source: the labelled validation cells: a split manifest (its ``val`` rows) or a
            folder per class; never cells the model was trained on.
        cv_dir: instead of ``val_source``, for a model trained on every cell (``OUT/refit`` of
            ``marrowscope cv --refit``): that cross-validation, whose pooled out-of-fold
            predictions of the folds' last epochs (each fold calibrated on the others) are the
            measured results; the float16 check and the speed then use the (training) cells.
        description: one line for ``marrowscope models``.
        card: the model card's prose: ``intended_use``, ``data``, ``attribution``, ``limits``
            (lists of sentences), ``license``, ``results_note``.
        out_root: the folder of shipped models (``None``: the package's ``pretrained/``).
        tolerance: largest allowed probability difference between float16 and float32 weights.
        allow_float32: store float32 weights when float16 exceeds ``tolerance`` (else refuse).
        checkpoint_label: which checkpoint of the run this is (for the card).

    Returns:
        The written folder.

    Raises:
        ValueError: a bad name, not exactly one of ``val_source`` and ``cv_dir``, a
            cross-validation of other classes, or (``allow_float32=False``) float16 storage
            changes the probabilities by more than ``tolerance`` (nothing is written then).
    """
    console = console or Console()
    if not name.isidentifier():
        raise ValueError(f"a shipped model's name must be a plain word like bm8, got {name!r}")
    if (val_source is None) == (cv_dir is None):
        raise ValueError(
            "give the cells that measure the model: val_source (validation cells) or cv_dir "
            "(the cross-validation of a model refitted on every cell), exactly one"
        )
    bundle_dir = Path(bundle_dir)
    model, meta = load_bundle(bundle_dir, device="cpu")

    if cv_dir is not None:
        evaluation, paths = _cv_evaluation(Path(cv_dir), bundle_dir, meta, console)
    else:
        console.print(f"{name}: evaluating {bundle_dir} on the validation cells of {val_source}")
        source = Path(val_source)  # type: ignore[arg-type]
        split = "val" if source.suffix.lower() == ".csv" else None
        metrics = evaluate_bundle(bundle_dir, source, split=split, progress=False, console=console)
        evaluation = {k: metrics[k] for k in _EVAL_KEYS if k in metrics}
        evaluation["source"] = "validation"
        paths = [r.path for r in labelled_rows(source, split)]

    # float16 storage, if it changes no probability by more than `tolerance` on these cells
    # (one view each, both computed in float32, so only the storage differs); else float32
    pre = config_from_params(meta.preprocess or {})
    arrays, _ = PreprocessCache(pre).load_many(paths, workers=pre.workers, progress=False)
    images = [a for a in arrays if a is not None]
    half = fp16_copy(model)
    p32 = Predictor.from_model(model, meta, device="cpu", precision="fp32", tta="none")
    p16 = Predictor.from_model(half, meta, device="cpu", precision="fp32", tta="none")
    a, b = p32.predict_preprocessed(images), p16.predict_preprocessed(images)
    parity = {
        "images": len(images),
        "views": "none",
        "max_abs_diff": float(np.abs(a - b).max()),
        "agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "tolerance": tolerance,
    }
    fp16 = parity["max_abs_diff"] <= tolerance
    parity["stored_as"] = "float16" if fp16 else "float32"
    console.print(
        f"{name}: float16 weights change probabilities by at most {parity['max_abs_diff']:.2e} "
        f"over {len(images)} cells (top-1 agreement {parity['agreement']:.4f}): stored as "
        f"{parity['stored_as']}" + ("" if fp16 else f" (float16 only within {tolerance:g})")
    )
    if not fp16 and not allow_float32:
        raise ValueError(
            f"{name}: float16 storage changes a probability by {parity['max_abs_diff']:.2e} "
            f"> {tolerance:g}; keep this model in float32"
        )
    shipped = half if fp16 else model
    speed = _speed(shipped, meta, images)

    root = Path(bundle_mod.PRETRAINED_DIR if out_root is None else out_root)
    out = root / name
    weight_bytes = sum(
        t.numel() * (2 if fp16 and t.is_floating_point() else t.element_size())
        for t in shipped.state_dict().values()
    )
    pretrained = {
        "name": name,
        "description": description,
        "checkpoint": checkpoint_label,
        "card": dict(card),
        "evaluation": evaluation,
        "fp16_parity": parity,
        "speed": speed,
        "weights_mb": round(weight_bytes / 1e6, 2),
    }
    _unpublish(root, name)
    save_bundle(
        out,
        shipped,
        meta.replace(pretrained=pretrained),
        weights_dtype=torch.float16 if fp16 else torch.float32,
    )

    # what was written loads back to exactly the rounded model
    check = Predictor.from_checkpoint(out, device="cpu", precision="fp32", tta="none")
    if not np.allclose(check.predict_preprocessed(images[:16]), (b if fp16 else a)[:16], atol=1e-6):
        raise RuntimeError(f"{out}: the written bundle does not reproduce the packed model")
    _publish(root, name, description)
    scored = "validation" if evaluation["source"] == "validation" else "cross-validated"
    console.print(
        f"{name}: wrote {out} ({weight_bytes / 1e6:.1f} MB weights), {scored} macro-F1 "
        f"{evaluation['macro_f1']:.3f} on {evaluation['n']} cells"
    )
    return out


def _cv_evaluation(
    cv_dir: Path, bundle_dir: Path, meta: BundleMetadata, console: Console
) -> tuple[dict[str, Any], list[str]]:
    """The evaluation block of a model refitted on every cell: the pooled out-of-fold scores of
    its cross-validation (the bundle's TTA, each fold calibrated on the others), and the cells.

    Raises:
        ValueError: the bundle is not the finished, calibrated refit of that cross-validation.
    """
    fix = f"pack {cv_dir}/refit/last after marrowscope cv --refit --out {cv_dir} has finished"
    calibration = meta.inference.calibration or {}
    if not (bundle_dir.parent / "summary.json").is_file() or "out-of-fold" not in str(
        calibration.get("source", "")
    ):
        raise ValueError(
            f"{bundle_dir} is not a finished refit calibrated on out-of-fold logits (its training "
            f"or calibration has not finished); {fix}"
        )
    cv_config = saved_config(cv_dir)
    differ = [
        k
        for k in _RECIPE_KEYS
        if _recipe_part((meta.config or {}).get(k), k) != _recipe_part(cv_config.get(k), k)
    ]
    if differ:
        raise ValueError(
            f"{bundle_dir} was not trained with the recipe {cv_dir} cross-validated ({', '.join(differ)} "
            f"differ); {fix}"
        )
    tta = meta.inference.tta
    calibrate = bool(((meta.config or {}).get("inference") or {}).get("calibrate", True))
    oof = out_of_fold_probs(cv_dir, tta, calibrate=calibrate)
    if oof["classes"] != list(meta.classes):
        raise ValueError(
            f"{cv_dir} cross-validated the classes {oof['classes']}, the model predicts "
            f"{list(meta.classes)}; {fix}"
        )
    console.print(
        f"evaluating by the {oof['folds']}-fold cross-validation in {cv_dir}: {len(oof['paths'])} "
        "out-of-fold cells"
    )
    metrics = score(oof["probs"], oof["labels"], oof["classes"], focus=None)
    evaluation = {k: metrics[k] for k in _EVAL_KEYS if k in metrics}
    evaluation.update(
        source="cross-validation",
        folds=oof["folds"],
        n_train_per_fold=oof["n_train"],
        tta=tta,
        temperature="cross-fitted per fold" if calibrate else 1.0,
        grouped=bool(((cv_config.get("data") or {}).get("split") or {}).get("group_column")),
    )
    return evaluation, list(oof["paths"])


def update_card(
    name: str,
    *,
    description: str,
    card: Mapping[str, Any],
    out_root: Path | None = None,
) -> Path:
    """Replace the prose of a packed model's card (its weights and measurements stay), re-render
    ``MODEL_CARD.md`` and update the sha256 index.

    Raises:
        BundleError: ``name`` is not a packed model under ``out_root``.
    """
    root = Path(bundle_mod.PRETRAINED_DIR if out_root is None else out_root)
    out = root / name
    model, meta = load_bundle(out, device="cpu")
    if meta.pretrained is None:
        raise BundleError(f"{out}: not a packed model (no 'pretrained' section in its metadata)")
    pretrained = {**meta.pretrained, "description": description, "card": dict(card)}
    dtype = torch.float16 if meta.weights_dtype == "float16" else torch.float32
    _unpublish(root, name)
    save_bundle(out, model, meta.replace(pretrained=pretrained), weights_dtype=dtype)
    _publish(root, name, description)
    return out

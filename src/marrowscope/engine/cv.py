"""K-fold cross-validation of a training recipe: every image is validated once, by a model that
never saw it.

Output folder layout::

    OUT/folds.csv          path, label, fold (the fold assignment; stratified by class)
    OUT/fold-K/            a normal training run folder (``fit``) with fold K as validation
    OUT/fold-K/oof.npz     that model's logits for fold K: every TTA view (d8), labels, paths;
                           ``logits`` from the best-epoch checkpoint, ``logits_last`` from the
                           last epoch's
    OUT/cv_summary.json    per-fold and pooled numbers (see :func:`summarize`)
    OUT/cv_report.md       the same as tables
    OUT/refit/             with ``refit``: the recipe trained on every image (a training run
                           folder without a validation split), its temperature fitted on the
                           pooled out-of-fold logits of the folds' last epochs

Each fold's model is scored on its fold with no test-time augmentation, with 4 flips and with
the 8 rotations/reflections (d8), all from one set of logits. Calibration is cross-fitted: the
temperature applied to fold K is fitted on the out-of-fold logits of the *other* folds, so the
reported expected calibration error is not measured on the data it was fitted on.

The best-epoch checkpoint of a fold is chosen on that fold's own images, which flatters its score
a little; the last epoch's weights are chosen by nothing, so the summary scores them too
(``last_checkpoint``): that is the estimate without any selection on the scored images.

``fold_seed`` fixes the fold assignment independently of the training seed, so several training
seeds (an ensemble) can be scored on the same folds; ``train_fraction`` trains each fold on a
stratified subset of its training images (a learning curve) while scoring the same folds.

The run is resumable: finished folds are reused, an interrupted fold is resumed after its last
finished epoch. Resuming needs the same recipe, fold count, fold seed and training fraction
(``OUT/cv_config.json``; the run-time settings in :data:`RUNTIME_KEYS` may change) and the same
fold assignment: data added, removed or relabelled since ``OUT/folds.csv`` was written is refused,
as the finished folds would score some images twice and others never.

``refit`` then trains the recipe once more on every image (scikit-learn's refit): the model to
use or ship, whose expected accuracy is the cross-validated one, measured on models that saw
(k-1)/k of the images. As the refit's last epoch is the model, the estimate to quote for it is the
``last_checkpoint`` block; :func:`out_of_fold_probs` gives its pooled out-of-fold predictions.

Under torchrun every fold trains data-parallel (:func:`~marrowscope.engine.train.fit`); rank 0
writes the folder, scores the out-of-fold images and writes the summary.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
import zlib
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

import marrowscope
from marrowscope.config import ConfigError, ExperimentConfig, to_dict
from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow, require_utf8_paths
from marrowscope.data.recorded import ManifestRows
from marrowscope.data.split import assign_folds
from marrowscope.engine.data import class_order, load_split_images, manifest_rows
from marrowscope.engine.distributed import DistContext
from marrowscope.engine.distributed import setup as setup_distributed
from marrowscope.engine.train import calibration_report, fit
from marrowscope.inference.predictor import Predictor
from marrowscope.metrics.classification import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from marrowscope.models.bundle import load_bundle, read_metadata, save_bundle
from marrowscope.reports.cv_report import cv_report, mean_std
from marrowscope.reports.tables import to_rich
from marrowscope.utils.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = [
    "RUNTIME_KEYS",
    "TTA_VIEWS",
    "config_differences",
    "cross_validate",
    "out_of_fold_probs",
    "saved_config",
    "summarize",
]

RUNTIME_KEYS = (
    "name",
    "compare",
    "preprocess.cache_dir",
    "preprocess.workers",
    "train.device",
    "train.num_workers",
    "train.threads",
    "train.channels_last",
)
"""Config keys (dotted; a section covers its keys) that do not change a cross-validation's
results: where and how fast it runs. A folder is resumed with other values of these."""

_FIT_RUNTIME_KEYS = tuple(k for k in RUNTIME_KEYS if "." in k)
"""The run-time keys a resumed fold takes from the current config instead of its saved one."""

TTA_VIEWS = {"none": [0], "flips": [0, 1, 5, 4], "d8": list(range(8))}
"""Indices into the d8 view order of :func:`~marrowscope.inference.predictor.tta_views`
(rot0, rot0+hflip, rot90, rot90+hflip, rot180 = both flips, rot180+hflip = vflip, ...);
``flips`` lists them in the order of the ``flips`` mode: identity, hflip, vflip, both."""


def _fold_rows(
    rows: list[ManifestRow],
    folds: list[int],
    k: int,
    *,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> list[ManifestRow]:
    """Fold ``k`` as validation, the other folds as training; with ``train_fraction`` < 1 only
    that fraction of each class's training images (at least one, chosen with ``seed`` and ``k``)
    is kept."""
    out = [
        dc_replace(r, split="val" if f == k else "train") for r, f in zip(rows, folds, strict=True)
    ]
    if train_fraction >= 1.0:
        return out
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(out):
        if r.split == "train":
            by_class.setdefault(r.label, []).append(i)
    drop: set[int] = set()
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: out[i].path)
        rng = np.random.default_rng([int(seed) % 2**63, k, zlib.crc32(label.encode())])
        order = rng.permutation(len(idx))
        keep = max(1, round(len(idx) * train_fraction))
        drop.update(idx[j] for j in order[keep:])
    return [r for i, r in enumerate(out) if i not in drop]


def _write_folds(rows: list[ManifestRow], folds: list[int], path: Path) -> None:
    require_utf8_paths(r.path for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "fold"])
    for r, f in zip(rows, folds, strict=True):
        w.writerow([r.path, r.label, f])
    atomic_write_text(path, buf.getvalue())


def _oof_logits(bundle_dir: Path, images: list[np.ndarray], device: str) -> np.ndarray:
    """``(8, N, K)`` raw logits of the d8 views of ``images`` for the bundle's model."""
    predictor = Predictor.from_checkpoint(bundle_dir, device=device, tta="d8")
    return predictor.view_logits_preprocessed(images, tta="d8")


def cross_validate(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    folds: int = 5,
    fold_seed: int | None = None,
    train_fraction: float = 1.0,
    refit: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` once per fold and score every image out of fold; with ``refit``, then train
    it on every image (``OUT/refit``).

    ``data.split`` fractions are ignored (the folds replace them); ``data.split.group_column``
    makes the folds grouped (no patient/slide in two folds).

    Args:
        cfg: the recipe.
        out_dir: the output folder (reused: finished folds are skipped, an interrupted fold is
            resumed).
        folds: number of folds (>= 2).
        fold_seed: seed of the fold assignment (default ``cfg.seed``): keep it fixed to score
            several training seeds on the same folds.
        train_fraction: train each fold on this stratified fraction (0 < f <= 1) of its training
            images; the scored folds stay the same (a learning curve).
        refit: after the folds, train the recipe on every image into ``OUT/refit`` (resumable)
            and calibrate it on the folds' last-epoch out-of-fold logits.
        console: where progress lines and the summary go.
        progress: show progress bars.

    Returns:
        The summary (also written to ``OUT/cv_summary.json``).
    """
    ctx = setup_distributed()
    console = ctx.console(console or Console())
    progress = progress and ctx.is_main
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(
            f"train_fraction must be in (0, 1], got {train_fraction}; use e.g. 0.5 for half of "
            "each fold's training images"
        )
    if refit and train_fraction != 1.0:
        raise ConfigError(
            f"refit trains on every image, which a learning-curve run (train_fraction "
            f"{train_fraction}) does not estimate; drop one of the two"
        )
    if refit and cfg.train.early_stopping_patience is not None:
        raise ConfigError(
            f"--refit trains train.epochs={cfg.train.epochs} epochs on every image, with no "
            "validation split to stop early on, so it would not be the recipe the folds measure "
            f"(train.early_stopping_patience={cfg.train.early_stopping_patience}); cross-validate "
            "with --set train.early_stopping_patience=null (and the epochs the folds stopped at)"
        )
    fold_seed = cfg.seed if fold_seed is None else int(fold_seed)
    out_dir = Path(out_dir)
    identity: dict[str, Any] = {"folds": folds, "config": to_dict(cfg)}
    # only non-default values are recorded, so folders written before these options resume
    if fold_seed != cfg.seed:
        identity["fold_seed"] = fold_seed
    if train_fraction != 1.0:
        identity["train_fraction"] = train_fraction
    # nothing is written before the data and the folds are known to be usable: a failed start
    # leaves the folder as it was (or absent)
    fresh = ctx.main_only(lambda: _check_identity(out_dir, identity, console))

    # rank 0 scans and splits; every rank gets the same rows
    base = ctx.main_only(lambda: manifest_rows(cfg, progress=progress))
    # (the identical copies manifest_rows left out stay listed in each fold's skipped.csv)
    rows = ManifestRows((dc_replace(r, split=None) for r in base), base.left_out)
    classes = class_order(cfg, rows)
    assignment = assign_folds(
        rows, folds=folds, seed=fold_seed, grouped=cfg.data.split.group_column is not None
    )
    if fresh:
        ctx.main_only(lambda: _start_folder(out_dir, identity, rows, assignment))
    else:
        ctx.main_only(lambda: _check_folds(out_dir / "folds.csv", rows, assignment))
    flat = _flatten(to_dict(cfg))
    runtime = [f"{k}={json.dumps(flat[k])}" for k in _FIT_RUNTIME_KEYS if k in flat]

    t_start = time.perf_counter()
    for k in range(folds):
        fold_dir = out_dir / f"fold-{k}"
        oof_path = fold_dir / "oof.npz"
        if not ctx.main_only(oof_path.is_file):
            fold_rows = ManifestRows(
                _fold_rows(rows, assignment, k, train_fraction=train_fraction, seed=fold_seed),
                rows.left_out,
            )
            data = load_split_images(fold_rows, classes, cfg, progress=progress, ctx=ctx)
            console.rule(
                f"fold {k + 1}/{folds}: train {len(data.splits['train'])}, "
                f"validate {len(data.splits['val'])}"
            )
            resume = ctx.main_only((fold_dir / "state.pt").is_file)
            result = fit(
                cfg,
                fold_dir,
                resume=resume,
                overrides=runtime if resume else (),
                data=data,
                console=console,
                progress=progress,
            )
            val = data.splits["val"]
            same = result.best_epoch == result.history[-1]["epoch"]
            ctx.main_only(lambda: _write_oof(oof_path, fold_dir, val, cfg.train.device, same))  # noqa: B023

    summary = ctx.main_only(
        lambda: _summarize_folder(out_dir, cfg, classes, folds, fold_seed, train_fraction, t_start)
    )
    print_summary(summary, console)
    console.print(f"cross-validation summary: {out_dir / 'cv_summary.json'}")
    if refit:
        _refit(cfg, rows, classes, out_dir, console=console, progress=progress, ctx=ctx)
    return summary


def _refit(
    cfg: ExperimentConfig,
    rows: ManifestRows,
    classes: list[str],
    out_dir: Path,
    *,
    console: Console,
    progress: bool,
    ctx: DistContext,
) -> None:
    """Train ``cfg`` on every row into ``OUT/refit`` (resumed if interrupted), then set its
    inference rule: the recipe's TTA and a temperature fitted on the pooled out-of-fold logits of
    the folds' last epochs (``inference.calibrate``), reported like a validation calibration."""
    refit_dir = out_dir / "refit"
    split = dc_replace(cfg.data.split, val=0.0, test=0.0)
    refit_cfg = dc_replace(cfg, data=dc_replace(cfg.data, split=split))
    if not ctx.main_only((refit_dir / "summary.json").is_file):
        everything = ManifestRows((dc_replace(r, split="train") for r in rows), rows.left_out)
        data = load_split_images(everything, classes, refit_cfg, progress=progress, ctx=ctx)
        console.rule(f"refit: train on all {len(data.splits['train'])} images")
        resume = ctx.main_only((refit_dir / "state.pt").is_file)
        fit(refit_cfg, refit_dir, resume=resume, data=data, console=console, progress=progress)
    ctx.main_only(lambda: _calibrate_refit(out_dir, refit_cfg, console))


def _refit_calibrated(refit_dir: Path) -> bool:
    """Whether ``refit_dir`` finished training and got its out-of-fold temperature."""
    if not (refit_dir / "summary.json").is_file():
        return False
    calibration = read_metadata(refit_dir / "last").inference.calibration or {}
    return "out-of-fold" in str(calibration.get("source", ""))


def _calibrate_refit(out_dir: Path, cfg: ExperimentConfig, console: Console) -> None:
    if _refit_calibrated(out_dir / "refit"):
        console.print(f"refit: {out_dir / 'refit' / 'last'} is finished and calibrated")
        return
    tta = cfg.inference.tta
    records = _load_oof(out_dir)
    idx = TTA_VIEWS[tta]
    views = np.concatenate([r["logits_last"][idx] for r in records], axis=1).astype(np.float64)
    labels = np.concatenate([r["labels"] for r in records]).astype(np.int64)
    classes = json.loads((out_dir / "cv_summary.json").read_text())["classes"]
    report = calibration_report(views, labels, classes, tta=tta, calibrate=cfg.inference.calibrate)
    report["source"] = f"out-of-fold logits of the {len(records)} folds' last epochs"
    temperature = report["temperature"]
    inference = {"tta": tta, "temperature": temperature, "calibration": report}
    for name in ("best", "last"):  # the same weights: a final fit chooses nothing
        bundle = out_dir / "refit" / name
        model, meta = load_bundle(bundle, device="cpu")
        save_bundle(bundle, model, meta.replace(inference=inference))
    fit_summary_path = out_dir / "refit" / "summary.json"
    fit_summary = json.loads(fit_summary_path.read_text())
    atomic_write_json(fit_summary_path, {**fit_summary, "calibration": report})
    console.print(
        f"refit: {out_dir / 'refit' / 'last'}, tta={tta}, temperature {temperature:.3f} fitted on "
        f"{labels.size} out-of-fold cells (ECE {report['before']['ece']:.3f} -> "
        f"{report['after']['ece']:.3f})"
    )


def _load_oof(out_dir: Path) -> list[dict[str, Any]]:
    """Every fold's out-of-fold record (``logits``, ``logits_last``, ``labels``, ``paths``)."""
    folds = int(json.loads((out_dir / "cv_config.json").read_text())["folds"])
    records = []
    for k in range(folds):
        path = out_dir / f"fold-{k}" / "oof.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: fold {k} of {out_dir} has not finished; run the same "
                "marrowscope cv command again to finish it"
            )
        rec = _read_oof(path)
        if "logits_last" not in rec:
            raise DataError(
                f"{path} has no last-epoch logits (it was written by a marrowscope older than "
                "the last-epoch scores); delete that file and run the same marrowscope cv "
                f"command again on {out_dir}: fold {k} is scored again from its saved weights"
            )
        records.append(rec)
    return records


def _read_oof(path: Path) -> dict[str, Any]:
    """One fold's ``oof.npz``: ``logits``, ``labels``, ``paths`` and, except in folders written
    before the last epoch was scored, ``logits_last``."""
    with np.load(path) as z:
        rec = {"logits": z["logits"], "labels": z["labels"], "paths": z["paths"].tolist()}
        if "logits_last" in z.files:
            rec["logits_last"] = z["logits_last"]
    return rec


def out_of_fold_probs(out_dir: str | Path, tta: str, *, calibrate: bool = True) -> dict[str, Any]:
    """The pooled out-of-fold predictions of a finished cross-validation's last epochs with
    ``tta`` views, each fold calibrated (``calibrate``) by the temperature fitted on the *other*
    folds: what a calibrated model trained on (k-1)/k of the images predicts for unseen cells.
    Their ECE is the summary's pooled ``ece_calibrated``; the summary's pooled accuracy and
    macro-F1 take the class at T = 1, which a temperature can change for a few cells when views
    are averaged.

    Returns:
        ``{"probs": (N, K), "labels": (N,), "paths": [...], "classes": [...], "folds": k,
        "n_train": [...]}``.

    Raises:
        FileNotFoundError / DataError (a ValueError): the folder is not a finished
            cross-validation, or a fold of it was scored by an older marrowscope.
    """
    out_dir = Path(out_dir)
    summary_path = out_dir / "cv_summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} is missing: {out_dir} is not a finished cross-validation (run "
            "marrowscope cv --out with that folder)"
        )
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown TTA mode {tta!r}; use one of {sorted(TTA_VIEWS)}")
    summary = json.loads(summary_path.read_text())
    records = _load_oof(out_dir)
    idx = TTA_VIEWS[tta]
    probs = [
        softmax(
            r["logits_last"][idx].astype(np.float64)
            / (_fold_temperature(records, k, "logits_last", idx) if calibrate else 1.0)
        ).mean(axis=0)
        for k, r in enumerate(records)
    ]
    return {
        "probs": np.concatenate(probs),
        "labels": np.concatenate([r["labels"] for r in records]).astype(np.int64),
        "paths": [p for r in records for p in r["paths"]],
        "classes": list(summary["classes"]),
        "folds": len(records),
        "n_train": summary.get("n_train"),
    }


def _fold_temperature(
    fold_records: list[dict[str, Any]], k: int, key: str, idx: list[int]
) -> float:
    """The temperature for fold ``k``: fitted on the other folds' ``key`` logits (views
    ``idx``); 1 with a single fold."""
    others = [r for j, r in enumerate(fold_records) if j != k]
    if not others:
        return 1.0
    return fit_temperature(
        np.concatenate([r[key][idx] for r in others], axis=1),
        np.concatenate([r["labels"] for r in others]),
    )


def _fold_progress(out_dir: Path) -> list[Path]:
    """What a resume would reuse in ``out_dir``: finished epochs and folds, and a refit."""
    found = sorted(out_dir.glob("fold-*/state.pt")) + sorted(out_dir.glob("fold-*/oof.npz"))
    if (out_dir / "refit").exists():
        found.append(out_dir / "refit")
    return found


def _check_identity(out_dir: Path, identity: dict[str, Any], console: Console) -> bool:
    """Whether ``out_dir`` is to be started afresh (True) or resumed (False); a folder that holds
    another cross-validation with finished work is refused. Writes nothing."""
    cfg_file = out_dir / "cv_config.json"
    progress = _fold_progress(out_dir)
    if not cfg_file.is_file():
        if progress:
            raise FileExistsError(
                f"{out_dir} holds trained folds ({progress[0]}) but no cv_config.json, so what "
                "they were trained with is unknown; choose a new --out folder"
            )
        return True
    saved = json.loads(cfg_file.read_text())
    differ = config_differences(saved, identity)
    if not differ:
        return not progress
    if not progress:
        # an earlier start that failed or stopped before its first finished epoch: nothing of it
        # would be reused, so it is started again with this command's settings
        console.print(
            f"[yellow]{out_dir} holds no finished epoch of the cross-validation it was started "
            f"with ({'; '.join(differ)}); starting it afresh"
        )
        return True
    raise FileExistsError(
        f"{out_dir} holds a cross-validation with another config, fold count, fold seed or "
        f"training fraction (saved -> now: {'; '.join(differ)}); repeat the command it was "
        f"started with to resume it, or choose a new --out folder (its settings: {cfg_file})"
    )


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each result-relevant difference between two ``cv_config.json``
    identities (``folds``, ``fold_seed``, ``train_fraction`` and the ``config`` keys outside
    :data:`RUNTIME_KEYS`); config keys added to marrowscope since ``saved`` have their defaults."""
    saved = dict(saved)
    if isinstance(saved.get("config"), dict):
        saved["config"] = _with_defaults(to_dict(ExperimentConfig()), saved["config"])
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        short = key.removeprefix("config.")
        if key.startswith("config.") and _is_runtime(short):
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(f"{short}: {_show(a, missing)} -> {_show(b, missing)}")
    return out


def _is_runtime(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


def _show(value: Any, missing: object) -> str:
    return "(not set)" if value is missing else json.dumps(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty section stays a value)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _start_folder(
    out_dir: Path, identity: dict[str, Any], rows: list[ManifestRow], assignment: list[int]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_folds(rows, assignment, out_dir / "folds.csv")
    atomic_write_json(out_dir / "cv_config.json", identity)


def _check_folds(path: Path, rows: list[ManifestRow], assignment: list[int]) -> None:
    """Refuse to resume when the fold assignment of the data now differs from the saved one."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing, so the finished folds of {path.parent} cannot be checked "
            "against the data; choose a new --out folder"
        )
    with path.open(newline="") as f:
        saved = {r["path"]: (r["label"], r["fold"]) for r in csv.DictReader(f)}
    now = {r.path: (r.label, str(k)) for r, k in zip(rows, assignment, strict=True)}
    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    moved = sorted(p for p in set(now) & set(saved) if now[p] != saved[p])
    if not (added or removed or moved):
        return
    parts = [
        f"{len(paths)} {what} (e.g. {', '.join(paths[:3])})"
        for what, paths in (
            ("added", added),
            ("removed", removed),
            ("in another class or fold", moved),
        )
        if paths
    ]
    raise DataError(
        f"the data no longer matches the folds {path.parent} was started with: "
        f"{len(added) + len(removed) + len(moved)} of the images differ from {path} "
        f"({'; '.join(parts)}); resuming would score some images twice and others never. "
        f"Restore the data as it was to resume, or choose a new --out folder"
    )


def saved_config(out_dir: str | Path) -> dict[str, Any]:
    """The recipe a cross-validation folder was run with (``cv_config.json``), with the config
    keys added to marrowscope since then at their defaults."""
    saved = json.loads((Path(out_dir) / "cv_config.json").read_text())["config"]
    return _with_defaults(to_dict(ExperimentConfig()), saved)


def _with_defaults(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys it lacks taken from ``defaults`` (recursively, per section)."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict) and value:
            out[key] = _with_defaults(value, out[key])
    return out


def _write_oof(oof_path: Path, fold_dir: Path, val: Any, device: str, best_is_last: bool) -> None:
    """The fold's out-of-fold logits (d8 views) of its best and last checkpoints."""
    logits = _oof_logits(fold_dir / "best", val.images, device)
    logits_last = logits if best_is_last else _oof_logits(fold_dir / "last", val.images, device)
    arrays = {
        "logits": logits,
        "logits_last": logits_last,
        "labels": np.asarray(val.labels),
        "paths": np.asarray(val.paths),
    }

    def write_npz(p: Path) -> None:
        with p.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(oof_path, write_npz)


def _summarize_folder(
    out_dir: Path,
    cfg: ExperimentConfig,
    classes: list[str],
    folds: int,
    fold_seed: int,
    train_fraction: float,
    t_start: float,
) -> dict[str, Any]:
    """Read every fold's out-of-fold logits and run summary; write the summary and report."""
    fold_records: list[dict[str, Any]] = []
    for k in range(folds):
        fold_dir = out_dir / f"fold-{k}"
        oof_path = fold_dir / "oof.npz"
        rec = _read_oof(oof_path)
        fit_summary = json.loads((fold_dir / "summary.json").read_text())
        rec["fit"] = fit_summary
        rec["history_last"] = _last_history(fold_dir / "metrics.csv")
        rec["n_train"] = _count_train(fold_dir / "split.csv")
        fold_records.append(rec)

    summary = summarize(fold_records, classes)
    summary.update(
        name=cfg.name,
        model=cfg.model.name,
        folds=folds,
        seed=cfg.seed,
        fold_seed=fold_seed,
        train_fraction=train_fraction,
        config=to_dict(cfg),
        wall_seconds_this_session=round(time.perf_counter() - t_start, 1),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=platform.processor() or platform.machine(),
        marrowscope_version=marrowscope.__version__,
    )
    atomic_write_json(out_dir / "cv_summary.json", summary)
    atomic_write_text(out_dir / "cv_report.md", cv_report(summary))
    return summary


def _last_history(path: Path) -> dict[str, float]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    out: dict[str, float] = {}
    for key in ("val_macro_f1", "val_macro_f1_raw", "train_accuracy", "val_accuracy"):
        if last.get(key):
            out[key] = float(last[key])
    return out


def _count_train(path: Path) -> int:
    with path.open(newline="") as f:
        return sum(1 for r in csv.DictReader(f) if r["split"] == "train")


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def summarize(fold_records: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Per-fold and pooled out-of-fold scores for each TTA variant, with cross-fitted calibration.

    Args:
        fold_records: per fold ``{"logits": (8, N, K), "labels": (N,), "paths": [...],
            "fit": summary.json dict, "history_last": last metrics row}``, optionally
            ``"logits_last"`` (the last epoch's weights; scored as ``last_checkpoint`` when every
            fold has it).
        classes: class names in index order.

    Returns:
        ``{"variants": {tta: {"folds": [...], "mean_std": {...}, "pooled": {...}}},
        "last_checkpoint": the same for the last epoch's weights (or None), "last_epoch": ...,
        "best_epochs": ..., "train_seconds": ...}``.
    """
    has_last = all("logits_last" in r for r in fold_records)
    ema = [r["history_last"] for r in fold_records]
    return {
        "classes": classes,
        "n_folds": len(fold_records),
        "n_train": [r.get("n_train") for r in fold_records],
        "variants": _score_variants(fold_records, classes, "logits"),
        "last_checkpoint": (
            _score_variants(fold_records, classes, "logits_last") if has_last else None
        ),
        "last_epoch": {
            "val_macro_f1": _mean_std([h.get("val_macro_f1", np.nan) for h in ema]),
            "val_macro_f1_raw_weights": _mean_std([h.get("val_macro_f1_raw", np.nan) for h in ema]),
        },
        "best_epochs": [int(r["fit"]["best_epoch"]) for r in fold_records],
        "train_seconds": _mean_std([float(r["fit"]["train_seconds"]) for r in fold_records]),
    }


def _score_variants(
    fold_records: list[dict[str, Any]], classes: list[str], key: str
) -> dict[str, Any]:
    """Scores of the logits under ``key`` for each TTA variant (see :func:`summarize`)."""
    variants: dict[str, Any] = {}
    for tta, idx in TTA_VIEWS.items():
        per_fold: list[dict[str, Any]] = []
        pooled_probs: list[np.ndarray] = []
        pooled_calibrated: list[np.ndarray] = []
        pooled_labels: list[np.ndarray] = []
        for k, rec in enumerate(fold_records):
            views = rec[key][idx].astype(np.float64)
            labels = rec["labels"].astype(np.int64)
            temperature = _fold_temperature(fold_records, k, key, idx)
            p1 = softmax(views).mean(axis=0)
            pt = softmax(views / temperature).mean(axis=0)
            m = classification_metrics(labels, p1.argmax(1), classes)
            per_fold.append(
                {
                    "fold": k,
                    "n": int(labels.size),
                    "accuracy": m["accuracy"],
                    "balanced_accuracy": m["balanced_accuracy"],
                    "macro_f1": m["macro_f1"],
                    "per_class_f1": {c: m["per_class"][c]["f1"] for c in classes},
                    "ece": expected_calibration_error(p1, labels),
                    "nll": negative_log_likelihood(p1, labels),
                    "temperature": temperature,
                    "ece_calibrated": expected_calibration_error(pt, labels),
                    "nll_calibrated": negative_log_likelihood(pt, labels),
                }
            )
            pooled_probs.append(p1)
            pooled_calibrated.append(pt)
            pooled_labels.append(labels)
        probs = np.concatenate(pooled_probs)
        calibrated = np.concatenate(pooled_calibrated)
        labels = np.concatenate(pooled_labels)
        pooled = classification_metrics(labels, probs.argmax(1), classes)
        keys = (
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "ece",
            "ece_calibrated",
            "nll",
            "nll_calibrated",
        )
        mean_std = {key: _mean_std([f[key] for f in per_fold]) for key in keys}
        mean_std["per_class_f1"] = {
            c: _mean_std([f["per_class_f1"][c] for f in per_fold]) for c in classes
        }
        variants[tta] = {
            "folds": per_fold,
            "mean_std": mean_std,
            "pooled": {
                "n": pooled["n"],
                "accuracy": pooled["accuracy"],
                "balanced_accuracy": pooled["balanced_accuracy"],
                "macro_f1": pooled["macro_f1"],
                "per_class": pooled["per_class"],
                "confusion_matrix": pooled["confusion_matrix"],
                "ece_calibrated": expected_calibration_error(calibrated, labels),
            },
        }
    return variants


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """One table: each TTA variant's mean ± std over folds."""
    rows = [
        {
            "TTA": tta,
            "accuracy": mean_std(v["mean_std"]["accuracy"]),
            "macro-F1": mean_std(v["mean_std"]["macro_f1"]),
            "pooled macro-F1": v["pooled"]["macro_f1"],
            "ECE calibrated": mean_std(v["mean_std"]["ece_calibrated"]),
        }
        for tta, v in summary["variants"].items()
    ]
    console.print(to_rich(rows, title=f"{summary['n_folds']}-fold cross-validation"))

"""Training: config -> run folder with split, metrics, curves and checkpoint bundles; resumable.

Run folder layout::

    RUN_DIR/config.yaml    resolved config
    RUN_DIR/split.csv      the split manifest (reuse with data.manifest=RUN_DIR/split.csv)
    RUN_DIR/metrics.csv    one row per epoch
    RUN_DIR/curves.png     training curves (train vs validation accuracy and loss)
    RUN_DIR/best/          checkpoint bundle with the best validation macro-F1 (with its
                           softmax temperature fitted on the validation split and the TTA mode)
                           or, when there is no validation split, the last epoch's
    RUN_DIR/last/          checkpoint bundle after the last finished epoch
    RUN_DIR/state.pt       optimizer/scheduler/history for --resume
    RUN_DIR/summary.json   final numbers
    RUN_DIR/skipped.csv    images left out: unreadable, or identical copies (if any)

Every file is written atomically after each epoch; ``state.pt`` (weights, optimizer, scheduler,
history) is written last and is the commit point, so ``kill -9`` loses at most the epoch in
progress, and ``fit(..., resume=True)`` continues from the last committed epoch.

Under ``torchrun`` (several processes, one per GPU or per share of the CPU cores) the same
function trains data-parallel: ``train.batch_size`` is the global batch, each process takes its
share of it and of each epoch's shuffled samples, gradients are averaged by
``DistributedDataParallel``, validation is sharded and its counts summed, and only rank 0 writes
the run folder and prints. The plumbing is in :mod:`marrowscope.engine.distributed`.

With ``data.split.val: 0`` and ``data.split.test: 0`` every image trains: the *final fit* of a
recipe that cross-validation has already measured (``marrowscope cv --refit``). Nothing is
validated, so nothing is chosen: ``best/`` and ``last/`` both hold the last epoch, the
``val_*`` columns of ``metrics.csv`` stay empty, and the temperature stays 1 unless the caller
sets one (``cv --refit`` fits it on the folds' out-of-fold logits).
"""

from __future__ import annotations

import csv
import gc
import io
import logging
import math
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler

import marrowscope
from marrowscope.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    load_config,
    save_config,
    to_dict,
    validate,
)
from marrowscope.data.dataset import CellDataset
from marrowscope.data.manifest import read_manifest
from marrowscope.data.recorded import ManifestRows
from marrowscope.engine.data import PreparedData, manifest_rows, prepare_data, save_split
from marrowscope.engine.distributed import RANK_SEED_STRIDE, DistContext
from marrowscope.engine.distributed import setup as setup_distributed
from marrowscope.engine.loops import predict_logits, train_one_epoch
from marrowscope.inference.predictor import Predictor
from marrowscope.metrics.classification import (
    classification_metrics,
    classification_metrics_from_confusion,
    confusion_counts,
    cross_entropy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from marrowscope.models.bundle import load_bundle, save_bundle
from marrowscope.models.registry import build_model
from marrowscope.preprocess.ops import preprocess_params
from marrowscope.reports.plots import plot_training_curves
from marrowscope.transforms.augment import BatchMix, eval_transform, train_transform
from marrowscope.utils.io import atomic_write, atomic_write_json, atomic_write_text
from marrowscope.utils.progress import make_progress
from marrowscope.utils.runtime import (
    Precision,
    resolve_precision,
    seed_everything,
    set_threads,
)

log = logging.getLogger(__name__)

HISTORY_FIELDS = (
    "epoch",
    "stage",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "val_macro_f1_raw",
    "train_images_per_second",
    "epoch_seconds",
    "train_size",
)


@dataclass
class FitResult:
    """What :func:`fit` produced."""

    run_dir: Path
    best_dir: Path
    last_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_macro_f1: float
    classes: list[str]
    train_seconds: float
    stopped_early: bool
    params: int


def new_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """A fresh timestamped folder ``runs/<name>-YYYYmmdd-HHMMSS`` (not created); under torchrun
    rank 0 picks it and every process gets the same name."""

    def pick() -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = root / f"{name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = root / f"{name}-{stamp}-{n}"
        return path

    return setup_distributed().main_only(pick)


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = counts.sum() / (len(counts) * counts)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def lr_lambda_factory(  # type: ignore[no-untyped-def]
    total_steps: int, warmup_steps: int, min_ratio: float, hold_ratio: float | None = None
):
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak, per optimizer step; after
    ``total_steps``, ``hold_ratio`` of the peak if given (the constant rate of SWA epochs)."""

    def f(step: int) -> float:
        if hold_ratio is not None and step >= total_steps:
            return hold_ratio
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_size(cfg: ExperimentConfig, epoch: int) -> int:
    """Input side of the training crops in ``epoch`` (1-based): ``preprocess.size``, or during
    the progressive-resizing ramp a size growing linearly from ``train.progressive_size``."""
    t, full = cfg.train, cfg.preprocess.size
    if t.progressive_size is None:
        return full
    ramp = max(1, round(t.progressive_epochs * t.epochs))
    if epoch > ramp:
        return full
    size = t.progressive_size + (full - t.progressive_size) * (epoch - 1) / ramp
    return min(full, int(round(size / 8)) * 8)


def _loaders(
    data: PreparedData, cfg: ExperimentConfig, epoch: int, ctx: DistContext | None = None
) -> tuple[DataLoader, DataLoader | None]:
    """Train and validation loaders (``None`` without a validation split); the train order is
    seeded by (seed, epoch).

    With several processes (``ctx``), each takes its share of the epoch's shuffled (or
    class-balanced) training samples in batches of ``batch_size / world_size``, and a contiguous
    share of the validation images, without padding.
    """
    ctx = ctx or DistContext()
    t = cfg.train
    size = cfg.preprocess.size
    train = data.splits["train"]
    val = data.splits["val"]
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    ds_train = CellDataset(
        train.images, train.labels, train_transform(cfg.augment, train_size(cfg, epoch))
    )
    weights = None
    if t.imbalance == "sampler":
        counts = np.bincount(train.labels, minlength=len(data.classes)).astype(np.float64)
        weights = 1.0 / np.maximum(counts[np.asarray(train.labels)], 1.0)
    sampler: Any = None
    if ctx.distributed:
        # every rank draws from one generator seeded by seed * 1000 + epoch and takes its share
        sampler = ctx.train_sampler(ds_train, seed=cfg.seed * 1000, epoch=epoch, weights=weights)
    elif weights is not None:
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(train), replacement=True, generator=g
        )
    batch = ctx.per_rank_batch(t.batch_size)
    n_rank = len(sampler) if sampler is not None else len(train)
    train_loader = DataLoader(
        ds_train,
        batch_size=batch,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=t.num_workers,
        drop_last=n_rank > batch,
        generator=g,
    )
    if not val.labels:
        return train_loader, None
    ds_val: Any = CellDataset(val.images, val.labels, eval_transform(size))
    if ctx.distributed:
        ds_val = Subset(ds_val, ctx.shard(len(ds_val)))
    val_loader = DataLoader(ds_val, batch_size=max(t.batch_size, 64), shuffle=False, num_workers=0)
    return train_loader, val_loader


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, n_train // batch_size) if n_train > batch_size else 1


def _bundle_metadata(
    cfg: ExperimentConfig,
    data: PreparedData,
    epoch: int,
    metrics: dict[str, Any],
    weights_source: str | None,
) -> dict[str, Any]:
    return {
        "classes": list(data.classes),
        "weights_source": weights_source,
        "preprocess": preprocess_params(cfg.preprocess),
        "config": to_dict(cfg),
        "epoch": epoch,
        "metrics": metrics,
        "train_counts": dict(zip(data.classes, data.class_counts("train").tolist(), strict=True)),
        "inference": {"tta": cfg.inference.tta, "temperature": 1.0},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict (for ``state.pt``)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def _evaluate_split(
    model: nn.Module,
    loader: DataLoader,
    classes: list[str],
    device: torch.device,
    precision: Precision,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Classification metrics and mean cross-entropy (``loss``) of ``model`` on ``loader``.

    With several processes each scores its shard of the images; the confusion counts and the
    summed loss are added over the ranks, so every rank gets the numbers one process scoring
    every image would get (:func:`classification_metrics_from_confusion`).
    """
    ctx = ctx or DistContext()
    logits, labels = predict_logits(model, loader, device=device, precision=precision)
    k = len(classes)
    preds = logits.argmax(1) if labels.size else np.zeros(0, np.int64)
    loss_sum = cross_entropy(logits, labels) * labels.size if labels.size else 0.0
    total = ctx.all_sum(np.append(confusion_counts(labels, preds, k).ravel(), loss_sum))
    m = classification_metrics_from_confusion(total[:-1].reshape(k, k), classes)
    m["loss"] = float(total[-1] / m["n"])
    return m


def _make_ema(model: nn.Module, decay: float | None) -> Any:
    """timm's ``ModelEmaV3`` of ``model`` (with warm-up: short runs start averaging at once), or
    ``None`` when ``decay`` is ``None``."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def _make_swa(model: nn.Module, t: TrainConfig) -> Any:
    """``AveragedModel`` of ``model`` (weights and buffers) when ``t.swa_epochs`` > 0, else
    ``None``. The SWA settings were checked with the config (:class:`TrainConfig`)."""
    if not t.swa_epochs:
        return None
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, use_buffers=True)


def calibration_report(
    views: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    tta: str,
    calibrate: bool,
) -> dict[str, Any]:
    """The temperature minimising the NLL of ``views`` (``(V, N, K)`` logits of ``tta``'s views;
    1 without ``calibrate``), with accuracy, macro-F1, NLL and ECE before (T = 1) and after."""
    temperature = fit_temperature(views, labels) if calibrate else 1.0

    def scores(temp: float) -> dict[str, float]:
        probs = softmax(views / temp).mean(axis=0)
        m = classification_metrics(labels, probs.argmax(1), classes)
        return {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "nll": negative_log_likelihood(probs, labels),
            "ece": expected_calibration_error(probs, labels),
        }

    return {
        "tta": tta,
        "temperature": temperature,
        "val_images": int(labels.size),
        "before": scores(1.0),
        "after": scores(temperature),
    }


def finalize_inference(
    bundle_dir: Path,
    data: PreparedData,
    cfg: ExperimentConfig,
    *,
    device: torch.device,
    console: Console,
) -> dict[str, Any]:
    """Set the bundle's inference rule: TTA mode and a temperature fitted on the validation split.

    The validation images are predicted with the TTA views of ``cfg.inference.tta``; when
    ``cfg.inference.calibrate``, the temperature minimising the validation NLL is fitted and
    stored in ``metadata["inference"]``, and the bundle is rewritten (atomically). Validation
    accuracy, macro-F1, NLL and ECE before (T = 1) and after are returned and stored too.
    """
    model, meta = load_bundle(bundle_dir, device="cpu")
    val = data.splits["val"]
    tta = cfg.inference.tta
    predictor = Predictor.from_model(model, meta, device=device.type, tta=tta)
    views = predictor.view_logits_preprocessed(val.images)
    labels = np.asarray(val.labels, dtype=np.int64)
    report = calibration_report(
        views, labels, data.classes, tta=tta, calibrate=cfg.inference.calibrate
    )
    temperature = report["temperature"]
    inference = {"tta": tta, "temperature": temperature, "calibration": report}
    save_bundle(bundle_dir, model, meta.replace(inference=inference))
    b, a = report["before"], report["after"]
    console.print(
        f"inference: tta={tta}, temperature {temperature:.3f} (validation ECE "
        f"{b['ece']:.3f} -> {a['ece']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}; "
        f"macro-F1 with TTA {a['macro_f1']:.3f})"
    )
    return report


def _read_resume(
    run_dir: Path, overrides: list[str] | tuple[str, ...], console: Console
) -> tuple[
    ExperimentConfig, dict[str, Any] | None, ManifestRows | None, dict[str, tuple[Any, Any]]
]:
    """The saved config (with ``overrides``), ``state.pt`` (or ``None`` before the first finished
    epoch), the split manifest rows (or ``None``) of the run folder to resume, and what the
    overrides change (:func:`_changed_keys`); the rows carry the images the first start left out
    before the split (``skipped.csv`` rows not in the split), so a resume that rewrites
    ``skipped.csv`` keeps them listed."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"cannot resume: {run_dir} has no config.yaml (is it a marrowscope run folder?)"
        )
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides)
    state = None
    changed = _changed_keys(saved, cfg)
    state_path = run_dir / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_resumable(run_dir, saved, cfg, state, changed)
    else:
        console.print(f"[yellow]{run_dir} has no finished epoch yet; starting from epoch 1")
    split = run_dir / "split.csv"
    if not split.is_file():
        return cfg, state, None, changed
    rows = read_manifest(split)
    listed = {r.path for r in rows}
    skipped = run_dir / "skipped.csv"
    left_out: list[tuple[str, str]] = []
    if skipped.is_file():
        with open(skipped, newline="", encoding="utf-8") as f:
            left_out = [
                (r["path"], r["error"]) for r in csv.DictReader(f) if r["path"] not in listed
            ]
    return cfg, state, ManifestRows(rows, left_out), changed


# What the weights, optimizer and averages in state.pt were built for: fixed for the whole run.
RESUME_FIXED = ("model.name", "model.head_hidden", "preprocess.size", "data.classes")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(saved: ExperimentConfig, cfg: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """``key: (saved value, new value)`` for every config value the resume overrides change."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def _resume_fix(run_dir: Path, keys: list[str]) -> str:
    sets = " ".join(f"--set {k}=..." for k in keys)
    return (
        f"resume without changing {', '.join(keys)}, or start a new run with them: marrowscope "
        f"train --config {run_dir / 'config.yaml'} {sets} --run-dir NEW_RUN"
    )


def _check_resumable(
    run_dir: Path,
    saved: ExperimentConfig,
    cfg: ExperimentConfig,
    state: dict[str, Any],
    changed: dict[str, tuple[Any, Any]],
) -> None:
    """Refuse (before anything is read or written) resume overrides that ``state.pt`` cannot
    follow: another model, input size or class list, EMA/SWA or layer-wise learning-rate decay
    switched on or off (other optimizer parameter groups), or other data (a resumed run trains
    on the images its ``split.csv`` lists); ``changed``: :func:`_changed_keys` of the two."""
    fixed = {
        k: f"{k}={changed[k][1]} (the run has {changed[k][0]})"
        for k in RESUME_FIXED
        if k in changed
    }
    for k in changed:
        if k.startswith("data.") and k not in fixed:
            fixed[k] = (
                f"{k}={changed[k][1]} (the run trains on the images its split.csv lists, chosen "
                f"with {changed[k][0]}; if they moved, correct the paths in "
                f"{run_dir / 'split.csv'})"
            )
    if (saved.train.layer_decay is None) != (cfg.train.layer_decay is None):
        fixed["train.layer_decay"] = (
            f"train.layer_decay={cfg.train.layer_decay} (the run was trained "
            f"{'without' if saved.train.layer_decay is None else 'with'} layer-wise decay, which "
            "decides the optimizer's parameter groups; a new value between two set ones is fine)"
        )
    # EMA/SWA: what state.pt holds decides (its config.yaml could have been edited)
    for key, value, name in (
        ("train.ema_decay", cfg.train.ema_decay, "EMA"),
        ("train.swa_epochs", cfg.train.swa_epochs, "SWA"),
    ):
        had = state.get(name.lower()) is not None
        if had != bool(value is not None and value != 0):
            fixed[key] = (
                f"{key}={value} (the run was trained {'with' if had else 'without'} {name})"
            )
    if not fixed:
        return
    what = "; ".join(fixed.values())
    raise ConfigError(
        f"cannot resume {run_dir} with {what}: a resumed run keeps its model, input size, "
        "classes, data, weight averaging (EMA/SWA on or off) and layer-wise decay (on or off) "
        "from its first epoch; " + _resume_fix(run_dir, list(fixed))
    )


def _apply_configured_rates(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    configured: list[tuple[float, float]],
    step: int,
) -> None:
    """After a resume loaded the saved optimizer and scheduler, put back the peak learning rate
    and weight decay of each parameter group as the config has them: ``--resume RUN --set
    train.lr=...`` (or ``train.weight_decay``, ``train.backbone_lr_scale``, ``train.layer_decay``)
    then applies from the next step on, on the schedule of the config (also a changed
    ``train.epochs``); with the saved config the values are the saved ones, so nothing moves.
    ``step`` (finished epochs x the current steps per epoch) places the schedule: a changed
    ``train.batch_size`` or number of processes changes the steps per epoch, and the saved step
    count would put the rest of the run at the wrong point of the new schedule."""
    scheduler.last_epoch = step
    scheduler.base_lrs = [peak for peak, _ in configured]
    for group, (peak, decay), rate in zip(
        optimizer.param_groups, configured, scheduler.lr_lambdas, strict=True
    ):
        group["initial_lr"] = peak
        group["weight_decay"] = decay
        group["lr"] = peak * rate(scheduler.last_epoch)


def _check_new_run_dir(run_dir: Path) -> None:
    """Refuse a fresh run into a folder that holds someone else's files (a run folder of ours,
    even one interrupted before its first finished epoch, has ``state.pt`` or ``metrics.csv``)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file; choose a folder for the run")
    names = sorted(p.name for p in run_dir.iterdir())
    if not names or {"state.pt", "metrics.csv"} & set(names):
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise FileExistsError(
        f"{run_dir} is not empty ({shown}) and is not a marrowscope run folder (no state.pt or "
        "metrics.csv): training would overwrite its config.yaml, split.csv and summary.json; "
        f"choose a new or empty --run-dir, or pass --resume {run_dir} if it is a run that stopped "
        "before its first epoch"
    )


def _write_run_inputs(
    cfg: ExperimentConfig, data: PreparedData, run_dir: Path, console: Console
) -> None:
    """The resolved config, the split and the list of skipped images, into the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_split(data, run_dir / "split.csv")
    if data.skipped:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "error"])
        writer.writerows(data.skipped)
        atomic_write_text(run_dir / "skipped.csv", buf.getvalue(), escape=True)
        console.print(
            f"[yellow]{len(data.skipped)} image(s) left out (unreadable, or an identical copy of "
            f"another image of its class); see {run_dir / 'skipped.csv'}"
        )


def fit(
    cfg: ExperimentConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    data: PreparedData | None = None,
    console: Console | None = None,
    progress: bool = True,
    new_dir_only: bool = False,
) -> FitResult:
    """Train ``cfg`` into ``run_dir`` (or continue an interrupted run with ``resume=True``).

    Under torchrun every process calls this with the same arguments; they train data-parallel
    and rank 0 writes ``run_dir`` (see the module docstring).

    Args:
        cfg: the experiment; ignored on resume (the run folder's ``config.yaml`` is used).
        run_dir: the run folder (created if missing).
        resume: continue after the last finished epoch recorded in ``run_dir``.
        overrides: on resume, ``key=value`` changes to the saved config (e.g. ``train.epochs=60``
            to train longer).
        data: already prepared data (``compare`` shares one split between models).
        console: where the summary is printed.
        progress: show progress bars.
        new_dir_only: refuse a ``run_dir`` that already holds files but is not a run folder
            (the ``train`` command; ``cv`` and ``compare`` manage their own folders).

    Raises:
        ConfigError: a config value or rule is broken (before any data is read), or a resume
            override that ``state.pt`` cannot follow (before anything is written).
        FileExistsError: ``run_dir`` holds a run (without ``resume``), or with
            ``new_dir_only`` files that are not a run.
    """
    ctx = setup_distributed()
    console = ctx.console(console or Console())
    progress = progress and ctx.is_main
    wall_start = time.perf_counter()
    run_dir = Path(run_dir)
    state_path = run_dir / "state.pt"
    state: dict[str, Any] | None = None
    rows = None
    changed: dict[str, tuple[Any, Any]] = {}
    if resume:
        # rank 0 reads the run folder; every rank gets its config, state, split and changes
        cfg, state, rows, changed = ctx.main_only(lambda: _read_resume(run_dir, overrides, console))
    elif cfg is None:
        raise ValueError("fit() needs a config unless resume=True")
    elif ctx.main_only(state_path.exists):
        raise FileExistsError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose a new "
            "--run-dir"
        )
    elif new_dir_only:
        ctx.main_only(lambda: _check_new_run_dir(run_dir))
    # before any data is read (and before the run folder is made): every config value and rule;
    # from_dict checked them already, this catches a config built in code (dataclasses.replace)
    validate(cfg)
    if cfg.data.split.val == 0 and cfg.train.early_stopping_patience is not None:
        raise ConfigError(
            f"train.early_stopping_patience={cfg.train.early_stopping_patience} needs a validation "
            "split, but data.split.val is 0 (a final fit on every image); set "
            "train.early_stopping_patience=null or data.split.val above 0"
        )
    ctx.per_rank_batch(cfg.train.batch_size)
    ctx.main_only(lambda: run_dir.mkdir(parents=True, exist_ok=True))

    seed_everything(cfg.seed)
    set_threads(cfg.train.threads)
    # Tiny optimizer statistics can become denormal floats late in training, which x86 CPUs
    # handle slowly; flush them to zero (a negligible change to the numbers).
    torch.set_flush_denormal(True)
    device = ctx.device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.channels_last)
    ctx.check_sync_batchnorm(cfg.train.sync_batchnorm, device)

    if data is None:
        if rows is None and ctx.distributed:  # one scan and split, the same on every rank
            rows = ctx.main_only(lambda: manifest_rows(cfg, progress=progress))
        data = prepare_data(cfg, rows=rows, progress=progress, ctx=ctx)

    classes = data.classes
    t = cfg.train
    validating = bool(data.splits["val"].labels)
    if not validating and t.early_stopping_patience is not None:
        raise ConfigError(
            f"train.early_stopping_patience={t.early_stopping_patience} needs a validation split, "
            "but the data has no validation image; set train.early_stopping_patience=null or give "
            "validation images"
        )
    # On resume the weights come from state.pt: do not fetch ImageNet weights again.
    model = build_model(
        cfg.model,
        len(classes),
        input_size=cfg.preprocess.size,
        load_pretrained=False if state is not None else None,
    )
    params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ctx.prepare_model(model, sync_batchnorm=t.sync_batchnorm)

    train_counts = data.class_counts("train")
    weight = class_weights(train_counts).to(device) if t.imbalance == "weighted_loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=t.label_smoothing)
    # parameter groups, EMA and SWA are built on the unwrapped model (DDP only wraps the
    # training forward/backward, below)
    optimizer = torch.optim.AdamW(
        model.param_groups(t.lr, t.backbone_lr_scale, t.weight_decay, t.layer_decay),
        lr=t.lr,
        weight_decay=t.weight_decay,
    )
    n_train = len(data.splits["train"])
    steps = _steps_per_epoch(ctx.samples_per_rank(n_train), ctx.per_rank_batch(t.batch_size))
    swa = _make_swa(model, t)
    swa_start = t.epochs - t.swa_epochs + 1  # first averaged epoch (> epochs: no SWA)
    # classic SWA (swa_lr set): the cosine schedule ends where averaging starts
    schedule_epochs = t.epochs if t.swa_lr is None else swa_start - 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda_factory(
            steps * schedule_epochs,
            int(round(steps * t.warmup_epochs)),
            t.min_lr_ratio,
            hold_ratio=t.swa_lr,
        ),
    )
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 else None
    mixer = BatchMix(cfg.augment, len(classes)) if BatchMix.enabled(cfg.augment) else None
    ema = _make_ema(model, t.ema_decay)

    weights_source = state.get("weights_source") if state is not None else model.weights_source
    history: list[dict[str, Any]] = []
    start_epoch = 1
    best_f1 = -1.0
    best_epoch = 0
    bad_epochs = 0
    elapsed_before = 0.0
    # the rates and weight decay the config asks for (the state's optimizer replaces them)
    configured = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    if state is not None:  # on every rank: weights, EMA/SWA, optimizer, scheduler, counters
        # (_check_resumable refused the known misfits; anything else that does not fit the
        # state is one clear error too, and the run folder is still untouched)
        try:
            model.load_state_dict(state["model"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
            if swa is not None:
                swa.load_state_dict(state["swa"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            given = f", with --set {', '.join(changed)}" if changed else ""
            raise ConfigError(
                f"cannot resume {run_dir}: its state.pt does not fit the config "
                f"({run_dir / 'config.yaml'}{given}): {first}; resume with the settings the run "
                f"was trained with, or start a new run: marrowscope train --config "
                f"{run_dir / 'config.yaml'} --set ... --run-dir NEW_RUN"
            ) from e
        _apply_configured_rates(optimizer, scheduler, configured, state["epoch"] * steps)
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            console.print(f"Changed for the rest of the run: {what} (from the next epoch on)")
        history = state["history"]
        start_epoch = state["epoch"] + 1
        best_f1 = state["best_val_macro_f1"]
        best_epoch = state["best_epoch"]
        bad_epochs = state["bad_epochs"]
        elapsed_before = state.get("train_seconds", 0.0)
        console.print(f"Resuming {run_dir} after epoch {state['epoch']} (best epoch {best_epoch})")
    # the config and split go into the run folder only now that the saved state has loaded
    ctx.main_only(lambda: _write_run_inputs(cfg, data, run_dir, console))

    processes = (
        f", {ctx.world_size} processes (global batch {t.batch_size})" if ctx.distributed else ""
    )
    console.print(
        f"[bold]{cfg.name}[/]: {cfg.model.name} on {len(classes)} classes, "
        f"train {n_train} / val {len(data.splits['val'])} / test {len(data.splits['test'])} images, "
        f"{device.type} {precision.name}{' channels_last' if precision.channels_last else ''}, "
        f"{torch.get_num_threads()} threads{processes}"
    )
    stopped_early = False
    global_step = (start_epoch - 1) * steps

    def ema_step() -> None:
        nonlocal global_step
        global_step += 1
        assert ema is not None
        ema.update(model, step=global_step)

    def commit(
        epoch: int, saved: nn.Module, meta: dict[str, Any], improved: bool, seconds: float
    ) -> None:
        """Rank 0: the epoch's bundles, metrics and (last, the commit point) state.pt."""
        if improved:
            save_bundle(run_dir / "best", saved, meta)
        save_bundle(run_dir / "last", saved, meta)
        _write_history(history, run_dir / "metrics.csv")
        _save_state(
            state_path,
            {
                "epoch": epoch,
                "model": _cpu_state(model),
                "ema": None if ema is None else _cpu_state(ema.module),
                "swa": None if swa is None else _cpu_state(swa),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best_val_macro_f1": best_f1,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "train_seconds": seconds,
                "weights_source": weights_source,
            },
        )

    t0 = time.perf_counter()
    trainer: nn.Module = model
    wrapped_stage: str | None = None
    with make_progress(enabled=progress, console=console) as bar:
        epoch_task = bar.add_task(
            "epochs", total=t.epochs, completed=start_epoch - 1, stats="", unit="epoch"
        )
        for epoch in range(start_epoch, t.epochs + 1):
            if t.early_stopping_patience is not None and bad_epochs >= t.early_stopping_patience:
                stopped_early = True
                break
            stage = "head" if epoch <= t.freeze_epochs else "full"
            model.freeze_backbone(stage == "head")
            if stage != wrapped_stage:  # DDP averages what is trainable when it is built
                trainer = model  # drop the previous wrapper and its gradient hooks first
                gc.collect()
                trainer, wrapped_stage = ctx.wrap(model, device), stage
            torch.manual_seed(cfg.seed * 1000 + epoch + ctx.rank * RANK_SEED_STRIDE)
            train_loader, val_loader = _loaders(data, cfg, epoch, ctx)
            e0 = time.perf_counter()
            stats = train_one_epoch(
                trainer,
                train_loader,
                optimizer,
                loss_fn=loss_fn,
                device=device,
                precision=precision,
                scheduler=scheduler,
                scaler=scaler,
                grad_clip=t.grad_clip,
                progress=bar if progress else None,
                task_name=f"epoch {epoch}/{t.epochs} ({stage})",
                total=len(train_loader.sampler),  # type: ignore[arg-type]
                batch_transform=mixer,
                on_step=ema_step if ema is not None else None,
            )
            stats = ctx.reduce_stats(stats)
            ctx.sync_buffers(model, None if ema is None else ema.module)
            averaged = ema.module if ema is not None else None
            if swa is not None and epoch >= swa_start:
                swa.update_parameters(model)
                averaged = swa.module
            row = {
                "epoch": epoch,
                "stage": stage,
                "lr": optimizer.param_groups[-1]["lr"],
                "train_loss": stats.loss,
                "train_accuracy": stats.accuracy,
                "train_images_per_second": stats.images_per_second,
                "train_size": train_size(cfg, epoch),
            }
            epoch_summary: dict[str, Any] = {"train_accuracy": stats.accuracy}
            if val_loader is not None:
                val = val_raw = _evaluate_split(model, val_loader, classes, device, precision, ctx)
                if averaged is not None:
                    val = _evaluate_split(averaged, val_loader, classes, device, precision, ctx)
                row.update(
                    val_loss=val["loss"],
                    val_accuracy=val["accuracy"],
                    val_balanced_accuracy=val["balanced_accuracy"],
                    val_macro_f1=val["macro_f1"],
                    val_macro_f1_raw=val_raw["macro_f1"],
                )
                epoch_summary.update(
                    val_accuracy=val["accuracy"],
                    val_macro_f1=val["macro_f1"],
                    val_balanced_accuracy=val["balanced_accuracy"],
                    val_per_class=val["per_class"],
                )
                improved = val["macro_f1"] > best_f1 + 1e-9
                score = val["macro_f1"]
            else:  # a final fit: nothing to choose on, every epoch replaces the previous one
                improved, score = True, float("nan")
            row["epoch_seconds"] = time.perf_counter() - e0
            history.append(row)
            meta = _bundle_metadata(cfg, data, epoch, epoch_summary, weights_source)
            saved = averaged if averaged is not None else model
            if improved:
                best_f1, best_epoch, bad_epochs = score, epoch, 0
            else:
                bad_epochs += 1
            seconds = elapsed_before + time.perf_counter() - t0
            # every rank scored the same numbers; rank 0 writes, then all go on together
            ctx.main_only(lambda: commit(epoch, saved, meta, improved, seconds))  # noqa: B023
            scored = (
                f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f} "
                f"macro-F1 {row['val_macro_f1']:.3f}{'  (best)' if improved else ''}"
                if val_loader is not None
                else "no validation split"
            )
            bar.update(
                epoch_task,
                advance=1,
                stats=(
                    f"val acc {row['val_accuracy']:.3f} macro-F1 {row['val_macro_f1']:.3f}"
                    + (" *" if improved else "")
                    if val_loader is not None
                    else f"train acc {stats.accuracy:.3f}"
                ),
            )
            (bar.console if progress else console).print(
                f"epoch {epoch:>3} \\[{stage}] loss {stats.loss:.3f} acc {stats.accuracy:.3f} | "
                f"{scored} | {stats.images_per_second:.1f} img/s"
            )
    train_seconds = elapsed_before + time.perf_counter() - t0
    if not history:
        raise RuntimeError(f"no epoch was trained in {run_dir} (train.epochs={t.epochs})")

    def finish() -> dict[str, Any] | None:
        """Rank 0: curves, the inference rule of the best bundle (temperature, TTA)."""
        if not (run_dir / "best").exists():
            raise RuntimeError(f"no best checkpoint was written in {run_dir}")
        plot_training_curves(history, run_dir / "curves.png")
        if not validating:
            console.print(
                "no validation split: the last epoch is the model (best/ = last/), its temperature "
                "stays 1 (marrowscope cv --refit fits it on the out-of-fold logits)"
            )
            return None
        return finalize_inference(run_dir / "best", data, cfg, device=device, console=console)

    calibration = ctx.main_only(finish)
    result = FitResult(
        run_dir=run_dir,
        best_dir=run_dir / "best",
        last_dir=run_dir / "last",
        history=history,
        best_epoch=best_epoch,
        best_val_macro_f1=best_f1,
        classes=classes,
        train_seconds=train_seconds,
        stopped_early=stopped_early,
        params=params,
    )
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    summary = {
        "name": cfg.name,
        "model": cfg.model.name,
        "classes": classes,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best": best_row,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds_this_session": round(time.perf_counter() - wall_start, 1),
        "stopped_early": stopped_early,
        "calibration": calibration,
        "params": params,
        "device": device.type,
        "precision": precision.name,
        "processes": ctx.world_size,
        "machine": platform.processor() or platform.machine(),
        "marrowscope_version": marrowscope.__version__,
    }
    ctx.main_only(lambda: atomic_write_json(run_dir / "summary.json", summary))
    print_summary(result, console)
    return result


def print_summary(result: FitResult, console: Console) -> None:
    """A one-screen summary of a finished training run."""
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    last = result.history[-1]
    table = Table(title=f"Training finished: {result.run_dir}", show_header=True)
    table.add_column("")
    table.add_column("train acc", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("val macro-F1", justify="right")
    table.add_column("val loss", justify="right")
    for label, r in (
        (f"best (epoch {result.best_epoch})", best),
        (f"last (epoch {last['epoch']})", last),
    ):
        table.add_row(
            label,
            *(
                "—" if r.get(k) is None else f"{r[k]:.3f}"
                for k in ("train_accuracy", "val_accuracy", "val_macro_f1", "val_loss")
            ),
        )
    console.print(table)
    minutes = result.train_seconds / 60
    console.print(
        f"{len(result.history)} epoch(s) in {minutes:.1f} min"
        + (" (early stop)" if result.stopped_early else "")
        + f"; {result.params / 1e6:.1f} M parameters"
    )
    console.print(f"best checkpoint: {result.best_dir}   curves: {result.run_dir / 'curves.png'}")

"""``compare``: train and evaluate every listed model on one split; the paper's Tables 1-3.

Report folder layout::

    OUT/report.md                 Tables 1-3 with captions and figure links
    OUT/table1_accuracy.csv       training / validation / test accuracy per model
    OUT/table2_<focus>.csv        precision / recall / F1 of the focus class (HAC in the paper)
    OUT/table3_per_class.csv      precision / recall / F1 per class per model
    OUT/comparison.png, OUT/per_class_f1.png
    OUT/curves/<model>.png        training curves
    OUT/confusion/<model>.png     test-split confusion matrices
    OUT/split.csv                 the one split every model used
    OUT/runs/<model>/             each model's run folder (bundles, metrics.csv, ...)
    OUT/eval/<model>/             each model's test-split evaluation (metrics.json, report.md, ...)

Under torchrun every model trains data-parallel (:func:`~marrowscope.engine.train.fit`); rank 0
evaluates the test split and writes the report.
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from marrowscope.config import ConfigError, ExperimentConfig, load_config, replace, to_dict
from marrowscope.data import DataError
from marrowscope.data.manifest import ManifestRow, read_manifest
from marrowscope.engine.data import PreparedData, manifest_rows, prepare_data, save_split
from marrowscope.engine.distributed import setup as setup_distributed
from marrowscope.engine.evaluate import score, write_evaluation
from marrowscope.engine.train import fit
from marrowscope.inference.predictor import Predictor
from marrowscope.reports.markdown import comparison_report
from marrowscope.reports.plots import plot_model_comparison, plot_per_class_f1
from marrowscope.reports.tables import (
    TABLE2_COLUMNS,
    table1_accuracy,
    table2_focus,
    table3_per_class,
    write_csv,
)
from marrowscope.utils.io import atomic_write_json, atomic_write_text

_SHARED_SECTIONS = ("data", "preprocess")


def model_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The experiment for one model of a comparison: ``model.name`` plus its per-model overrides.

    Raises:
        ConfigError: an override of ``data.*`` or ``preprocess.*`` (the models share one split
            and one preprocessed copy of the images, so it could not be applied), of the model's
            name, or one that breaks a config rule; the message starts with
            ``compare.model_overrides.NAME``.
    """
    where = f"compare.model_overrides.{name}"
    overrides = [f"model.name={name}", f"name={cfg.name}-{name}"]
    own = cfg.compare.model_overrides.get(name) or {}
    for key, value in own.items():
        if key.split(".")[0] in _SHARED_SECTIONS:
            raise ConfigError(
                f"{where}.{key}: the models of a comparison share one split "
                f"and one preprocessing, so a per-model {key} cannot apply; set it for all models "
                "or train this one apart (marrowscope train --set ...)"
            )
        if key in ("name", "model.name"):
            raise ConfigError(
                f"{where}.{key}: a model of a comparison is named by its entry in compare.models; "
                f"remove {key} from the overrides (list another model in compare.models instead)"
            )
        overrides.append(f"{key}={json.dumps(value)}")
    try:
        return replace(cfg, overrides)
    except ConfigError as e:
        prefix = where if own else f"compare.models: {name}"
        raise ConfigError(f"{prefix}: {e}") from None


def model_configs(
    cfg: ExperimentConfig, *, source: str | Path | None = None
) -> dict[str, ExperimentConfig]:
    """Every model's experiment (:func:`model_config`), by model name in ``compare.models`` order
    (``model.name`` alone when the list is empty).

    An entry of ``compare.model_overrides`` for a model not in ``compare.models`` is an error
    unless it names a real model (one left out of this run, e.g. with
    ``--set compare.models=...``): a misspelt name would otherwise be ignored silently.

    Raises:
        ConfigError: a misnamed or broken override; ``source`` (the config file) is named.
    """
    models = list(cfg.compare.models) or [cfg.model.name]
    where = f" (in {source})" if source is not None else ""
    for name in cfg.compare.model_overrides:
        if name not in models and not _known_model(name):
            close = difflib.get_close_matches(name, models, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"compare.model_overrides.{name}: {name!r} is none of compare.models "
                f"({', '.join(models)}) nor a known model{hint} Rename the entry to the model it "
                f"is meant for, or remove it{where}"
            )
    try:
        return {name: model_config(cfg, name) for name in models}
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def _known_model(name: str) -> bool:
    """Whether ``name`` is a model the registry can build (paper_cnn, an alias or a timm name)."""
    from marrowscope.models.registry import ModelError, resolve_timm_name

    if name.strip() == "paper_cnn":
        return True
    try:
        resolve_timm_name(name)
    except ModelError:
        return False
    return True


def _model_row(
    name: str,
    mcfg: ExperimentConfig,
    run_dir: Path,
    data: PreparedData,
    out: Path,
    focus: str,
    console: Console,
    progress: bool,
) -> dict[str, Any]:
    """Evaluate one trained model on the test split and gather its row for the tables."""
    summary = json.loads((run_dir / "summary.json").read_text())
    predictor = Predictor.from_checkpoint(run_dir / "best", device=mcfg.train.device)
    test = data.splits["test"]
    probs = predictor.predict_preprocessed(test.images, progress=progress)
    labels = np.asarray(test.labels, dtype=np.int64)
    metrics = score(probs, labels, data.classes, focus=focus, seed=mcfg.seed)
    eval_dir = out / "eval" / name
    write_evaluation(
        eval_dir,
        metrics,
        probs=probs,
        labels=labels,
        paths=test.paths,
        classes=data.classes,
        title=f"{name} — test split",
        extra={"checkpoint": str(run_dir / "best"), "split": "test", "images": len(labels)},
    )
    (out / "curves").mkdir(exist_ok=True)
    (out / "confusion").mkdir(exist_ok=True)
    shutil.copyfile(run_dir / "curves.png", out / "curves" / f"{name}.png")
    shutil.copyfile(eval_dir / "confusion_matrix.png", out / "confusion" / f"{name}.png")
    best = summary["best"]
    console.print(
        f"[bold]{name}[/]: val acc {best['val_accuracy']:.3f}, test acc {metrics['accuracy']:.3f}, "
        f"test macro-F1 {metrics['macro_f1']:.3f}"
    )
    return {
        "model": name,
        "train_accuracy": best["train_accuracy"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "epochs": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "train_seconds": summary["train_seconds"],
        "params": summary["params"],
        "metrics": metrics,
        "val_metrics": predictor.bundle_metadata_.metrics,
    }


def compare(
    cfg: ExperimentConfig,
    out: Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    source: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train every model of ``cfg.compare.models`` on one split and write the paper's tables.

    A report folder that already holds trained model runs is refused unless ``resume=True``:
    then a finished model run is reused and an interrupted one continues from its last epoch,
    each only when its recorded config (``runs/<model>/config.yaml``) and split
    (``runs/<model>/split.csv``) are those of this comparison, so the tables never mix models
    trained otherwise or scored on their own training images.

    Args:
        cfg: the experiment (``compare.models``, ``compare.model_overrides``, ...).
        out: the report folder.
        resume: reuse or continue the model runs already in ``out``.
        console: where progress and results are printed.
        progress: show progress bars.
        source: the config file ``cfg`` came from, named in config errors.

    Raises:
        ConfigError: a config value or rule is broken, the split has no validation or test
            images, or (on resume) a model run was trained with another config or split.
        FileExistsError: ``out`` already holds trained model runs and ``resume`` is false.
    """
    ctx = setup_distributed()
    console = ctx.console(console or Console())
    progress = progress and ctx.is_main
    # every model's config is checked (its overrides included) before any data is read
    configs = model_configs(cfg, source=source)
    models = list(configs)
    if cfg.data.split.val == 0:
        raise ConfigError(
            "compare reports each model's best epoch on the validation split, but "
            "data.split.val is 0; set data.split.val above 0 (e.g. 0.15)"
        )
    if cfg.data.split.test == 0 and not cfg.data.manifest:
        raise ConfigError(
            "compare scores every model on the test split, but data.split.test is 0; set "
            "data.split.test above 0 (e.g. 0.15)"
        )
    out = Path(out)
    ctx.main_only(lambda: _check_out(out, resume=resume))
    # rank 0 scans and splits (cheap: no image is read yet); every rank gets the same rows
    split_rows = ctx.main_only(lambda: manifest_rows(cfg, progress=progress))
    _check_split_rows(cfg, split_rows)
    if resume:
        ctx.main_only(lambda: _check_resumable(out, configs, split_rows))
    ctx.main_only(lambda: out.mkdir(parents=True, exist_ok=True))
    data = prepare_data(cfg, rows=split_rows, progress=progress, ctx=ctx)
    if not data.splits["test"].labels:
        raise DataError(
            "no image of the test split could be read (see the warnings above); compare scores "
            "every model on the test split"
        )
    ctx.main_only(lambda: save_split(data, out / "split.csv"))
    focus = cfg.compare.focus_class
    rows = []
    for i, name in enumerate(models, 1):
        console.rule(f"[bold]model {i}/{len(models)}: {name}")
        mcfg = configs[name]
        run_dir = out / "runs" / name
        finished, interrupted = ctx.main_only(lambda: _run_state(run_dir))  # noqa: B023
        if resume and finished:
            console.print(f"{name}: already trained in {run_dir}, reusing it")
        else:
            if not interrupted:  # nothing trained there yet (refused above otherwise)
                ctx.main_only(lambda: _remove(run_dir))  # noqa: B023
            fit(
                mcfg,
                run_dir,
                resume=interrupted,
                # the settings that may differ on resume (_RUNTIME_KEYS) are this run's
                overrides=_runtime_overrides(mcfg) if interrupted else (),
                data=data,
                console=console,
                progress=progress,
            )
        rows.append(
            ctx.main_only(
                lambda: _model_row(name, mcfg, run_dir, data, out, focus, console, progress)  # noqa: B023
            )
        )
    ctx.main_only(lambda: _write_report(cfg, rows, data, out, focus))
    console.print(f"[bold green]Report:[/] {out / 'report.md'}")
    return rows


_RUNTIME_KEYS = (
    "name",
    "compare",
    "train.device",
    "train.threads",
    "train.num_workers",
    "preprocess.workers",
    "preprocess.cache_dir",
)
"""Config keys (or sections) that do not change what a model learns: a reused or continued model
run may have been trained with other values (another device, the comparison's model list)."""


def _runtime_overrides(cfg: ExperimentConfig) -> list[str]:
    """``key=value`` overrides that carry this run's :data:`_RUNTIME_KEYS` settings of ``cfg``
    into a continued model run (its ``name`` and ``compare`` section stay as recorded)."""
    flat = _flatten(to_dict(cfg))
    return [
        f"{key}={json.dumps(flat[key])}"
        for key in _RUNTIME_KEYS
        if key in flat and key not in ("name", "compare")
    ]


def _remove(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)


def _run_state(run_dir: Path) -> tuple[bool, bool]:
    """(finished, interrupted) of a model's run folder."""
    finished = (run_dir / "summary.json").is_file() and (run_dir / "best").is_dir()
    return finished, not finished and (run_dir / "state.pt").is_file()


def _trained_runs(out: Path) -> list[Path]:
    """The model run folders under ``out/runs`` that hold at least one trained epoch."""
    runs = out / "runs"
    if not runs.is_dir():
        return []
    return sorted(
        d
        for d in runs.iterdir()
        if d.is_dir() and any((d / f).exists() for f in ("summary.json", "state.pt", "best"))
    )


def _check_out(out: Path, *, resume: bool) -> None:
    """Refuse to train over the model runs of an earlier comparison unless resuming."""
    trained = _trained_runs(out)
    if trained and not resume:
        raise FileExistsError(
            f"{out} already holds trained model runs ({', '.join(d.name for d in trained)}) of "
            "an earlier comparison; pass --resume to reuse the finished ones and continue the "
            f"interrupted ones (with the same config), choose a new --out, or delete {out / 'runs'} "
            "to train them all again"
        )


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (sections of the config only)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model_overrides":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(recorded: ExperimentConfig, wanted: ExperimentConfig) -> list[str]:
    """``key: recorded -> wanted`` for each config key that changes what a model learns."""
    old, new = _flatten(to_dict(recorded)), _flatten(to_dict(wanted))
    keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return [
        f"{k}: {old.get(k)!r} (recorded) -> {new.get(k)!r} (now)"
        for k in keys
        if not any(k == r or k.startswith(f"{r}.") for r in _RUNTIME_KEYS)
    ]


def _split_key(rows: list[ManifestRow]) -> dict[str, tuple[str, str | None]]:
    return {r.path: (r.label, r.split) for r in rows}


def _split_differences(recorded: list[ManifestRow], wanted: list[ManifestRow]) -> list[str]:
    """A few ``path: recorded -> now`` lines where two splits disagree (and how many in all)."""
    old, new = _split_key(recorded), _split_key(wanted)
    paths = [p for p in dict.fromkeys([*new, *old]) if old.get(p) != new.get(p)]
    paths.sort(key=lambda p: p in old and p in new)  # images added or removed first

    def show(entry: tuple[str, str | None] | None) -> str:
        return "absent" if entry is None else f"{entry[0]}/{entry[1]}"

    lines = [f"{p}: {show(old.get(p))} (recorded) -> {show(new.get(p))} (now)" for p in paths[:3]]
    if len(paths) > 3:
        lines.append(f"... {len(paths)} images in all")
    return lines


def _check_resumable(
    out: Path, configs: dict[str, ExperimentConfig], rows: list[ManifestRow]
) -> None:
    """Refuse to reuse or continue a model run trained with another config or split."""
    for name, mcfg in configs.items():
        run_dir = out / "runs" / name
        finished, interrupted = _run_state(run_dir)
        if not (finished or interrupted):
            continue
        fix = (
            "run compare --resume with the config and --set values of that run, or choose a new "
            f"--out, or delete {run_dir} to train this model again"
        )
        recorded_cfg = run_dir / "config.yaml"
        if not recorded_cfg.is_file():
            raise ConfigError(
                f"cannot resume {run_dir}: it has no config.yaml, so what it was trained with is "
                f"unknown; delete {run_dir} to train this model again"
            )
        changed = _differences(load_config(recorded_cfg), mcfg)
        if changed:
            raise ConfigError(
                f"cannot resume {run_dir}: it was trained with another config than this "
                f"comparison asks for ({'; '.join(changed)}); {fix}"
            )
        split_file = run_dir / "split.csv"
        if not split_file.is_file():
            split_file = out / "split.csv"  # the comparison's own record of the split
        if not split_file.is_file():
            raise ConfigError(
                f"cannot resume {run_dir}: neither it nor {out} records the split it was trained "
                f"on, so its test images could be training images; delete {run_dir} to train "
                "this model again"
            )
        changed = _split_differences(read_manifest(split_file), rows)
        if changed:
            raise ConfigError(
                f"cannot resume {run_dir}: this comparison's split differs from the split it was "
                f"trained on ({split_file}: {'; '.join(changed)}), so the test images could "
                "include its training images (did the data folder, the manifest or the seed "
                f"change?); {fix}"
            )


def _check_split_rows(cfg: ExperimentConfig, rows: list[ManifestRow]) -> None:
    """Refuse a split without validation or test images before any image is preprocessed."""
    for split, use in (
        ("val", "reports each model's best epoch on the validation split"),
        ("test", "scores every model on the test split"),
    ):
        if not any(r.split == split for r in rows):
            where = f"manifest {cfg.data.manifest}" if cfg.data.manifest else "the split"
            raise DataError(
                f"{where} has no {split} image, but compare {use}; give it {split} rows (or leave "
                "its split column empty and set data.split.val / data.split.test above 0)"
                if cfg.data.manifest
                else f"{where} has no {split} image, but compare {use}; add images or raise "
                f"data.split.{split}"
            )


def _write_report(
    cfg: ExperimentConfig,
    rows: list[dict[str, Any]],
    data: PreparedData,
    out: Path,
    focus: str,
) -> None:
    """Tables 1-3, charts, report.md and results.json of a comparison."""
    t1, t2, t3 = table1_accuracy(rows), table2_focus(rows, focus), table3_per_class(rows)
    write_csv(t1, out / "table1_accuracy.csv")
    write_csv(t2, out / f"table2_{focus}.csv", columns=TABLE2_COLUMNS)
    write_csv(t3, out / "table3_per_class.csv")
    plot_model_comparison(rows, out / "comparison.png")
    plot_per_class_f1(
        {r["model"]: {c: v["f1"] for c, v in r["metrics"]["per_class"].items()} for r in rows},
        out / "per_class_f1.png",
    )
    counts = {s: len(data.splits[s]) for s in ("train", "val", "test")}
    notes = [
        f"One split for every model (seed {cfg.seed}): train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']} images; classes {', '.join(data.classes)}.",
        "Training and validation accuracy are those of each model's best epoch (highest validation "
        "macro-F1); training accuracy is measured on augmented images during the epoch, as in the paper.",
    ]
    if focus not in data.classes:
        notes.append(f"The focus class {focus} is not among these classes, so Table 2 is empty.")
    if data.skipped:
        notes.append(
            f"{len(data.skipped)} image(s) were left out (unreadable, or an identical copy of "
            "another image of its class); see each run's skipped.csv."
        )
    atomic_write_text(
        out / "report.md",
        comparison_report(
            rows,
            focus_class=focus,
            title=f"marrowscope compare: {cfg.name}",
            config_summary={"config": to_dict(cfg), "notes": notes},
        ),
    )
    atomic_write_json(
        out / "results.json",
        [{k: v for k, v in r.items() if k not in ("val_metrics",)} for r in rows],
    )

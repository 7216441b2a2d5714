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

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from marrowscope.config import ConfigError, ExperimentConfig, replace, to_dict
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
            and one preprocessed copy of the images, so it could not be applied).
    """
    overrides = [f"model.name={name}", f"name={cfg.name}-{name}"]
    for key, value in (cfg.compare.model_overrides.get(name) or {}).items():
        if key.split(".")[0] in _SHARED_SECTIONS:
            raise ConfigError(
                f"compare.model_overrides.{name}.{key}: the models of a comparison share one split "
                f"and one preprocessing, so a per-model {key} cannot apply; set it for all models "
                "or train this one apart (marrowscope train --set ...)"
            )
        overrides.append(f"{key}={json.dumps(value)}")
    return replace(cfg, overrides)


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
) -> list[dict[str, Any]]:
    """Train every model of ``cfg.compare.models`` on one split and write the paper's tables.

    With ``resume=True`` models whose run already finished are not trained again, and an
    interrupted model run continues from its last epoch.
    """
    ctx = setup_distributed()
    console = ctx.console(console or Console())
    progress = progress and ctx.is_main
    models = list(cfg.compare.models) or [cfg.model.name]
    # every model's config is checked (its overrides included) before any data is read
    configs = {name: model_config(cfg, name) for name in models}
    if cfg.data.split.val == 0:
        raise ConfigError(
            "compare reports each model's best epoch on the validation split, but "
            "data.split.val is 0; set data.split.val above 0 (e.g. 0.15)"
        )
    out = Path(out)
    ctx.main_only(lambda: out.mkdir(parents=True, exist_ok=True))
    # rank 0 scans and splits (None in one process: prepare_data does it)
    split_rows = (
        ctx.main_only(lambda: manifest_rows(cfg, progress=progress)) if ctx.distributed else None
    )
    data = prepare_data(cfg, rows=split_rows, progress=progress, ctx=ctx)
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
            if not resume:
                ctx.main_only(lambda: _remove(run_dir))  # noqa: B023
            fit(
                mcfg,
                run_dir,
                resume=resume and interrupted,
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


def _remove(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)


def _run_state(run_dir: Path) -> tuple[bool, bool]:
    """(finished, interrupted) of a model's run folder."""
    finished = (run_dir / "summary.json").is_file() and (run_dir / "best").is_dir()
    return finished, (run_dir / "state.pt").is_file()


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
        notes.append(f"{len(data.skipped)} unreadable image(s) were skipped.")
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

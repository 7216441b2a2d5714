"""The ``marrowscope`` command line. Heavy modules are imported inside commands so --help is instant."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from marrowscope.defaults import DEFAULT_DETECTOR
from marrowscope.metrics.counting import (
    DEFAULT_EVIDENCE,
    DEFAULT_GALLERY,
    DEFAULT_HAC_MIN_COUNT,
    DEFAULT_HAC_MIN_PERCENT,
    DEFAULT_THRESHOLD,
)

app = typer.Typer(
    name="marrowscope",
    help="Classify single-cell bone-marrow cytology images: train, evaluate and compare models; "
    "predict, explain and count new samples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Inspect image folders and write subset/split manifests.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
P = ParamSpec("P")

Device = Annotated[
    str,
    typer.Option(
        help="Where the network runs: auto, cpu or cuda.",
    ),
]
TrainDevice = Annotated[
    str | None,
    typer.Option(
        help="Where training runs: auto, cpu or cuda (default: train.device of the config).",
    ),
]
Nproc = Annotated[
    str | None,
    typer.Option(
        help="Train data-parallel in N processes on this machine (auto: one per GPU, 1 without "
        "GPUs), launched through torch.distributed.run; for several machines run torchrun "
        "yourself (docs/scale-out.md).",
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        help="torch, onnx (needs `marrowscope export CK`) or int8 (OpenVINO; needs "
        "`marrowscope export CK --format int8` and marrowscope\\[int8]).",
    ),
]
BACKEND_NAMES = ("torch", "onnx", "int8", "openvino")
"""Accepted --backend values (openvino is another name for int8)."""
Decode = Annotated[
    str | None,
    typer.Option(
        help="Where images are decoded: auto (the default: JPEG and PNG in threads, other formats "
        "in worker processes), processes (every file in a worker process: a crashing decoder "
        "costs only its file) or threads (a crashing decoder ends the run). Threads are faster "
        "next to a fast backend such as int8: no copy between processes.",
        show_default=False,
    ),
]


def _check_decode(decode: str | None) -> str:
    """``decode`` checked (None: ``auto``)."""
    from marrowscope.inference.batching import DECODE_MODES

    if decode is None:
        return "auto"
    if decode not in DECODE_MODES:
        raise typer.BadParameter(
            f"--decode must be {', '.join(DECODE_MODES[:-1])} or {DECODE_MODES[-1]}, got {decode!r}"
        )
    return decode


def _check_backend(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise typer.BadParameter(
            f"--backend must be torch, onnx or int8 (alias openvino), got {backend!r}"
        )


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint bundle folder (RUN_DIR/best) or a shipped model name (bm8, pbc6; see "
        "`marrowscope models`)."
    ),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that carry a message meant for the user (shown without a traceback)."""
    from marrowscope.config import ConfigError
    from marrowscope.utils.image import ImageReadError

    errors: list[type[BaseException]] = [
        ConfigError,
        ImageReadError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
    ]
    for mod, names in (
        ("marrowscope.data", ("DataError",)),
        ("marrowscope.models.registry", ("ModelError",)),
        ("marrowscope.models.weights", ("PretrainedWeightsError",)),
        ("marrowscope.models.bundle", ("BundleError",)),
        ("marrowscope.metrics.counting", ("CountError",)),
        ("marrowscope.engine.distributed", ("DistributedError",)),
        ("marrowscope.inference.fields", ("FieldError",)),
        ("marrowscope.utils.runtime", ("DeviceError",)),
    ):
        module = importlib.import_module(mod)
        errors.extend(getattr(module, n) for n in names)
    return tuple(errors)


def _rank_prefix() -> str:
    """``[rank N] `` in a process of a multi-process torchrun job, else nothing."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and world not in ("", "0", "1") else ""


def _record_for_torchrun(e: BaseException) -> None:
    """In a torchrun worker, write the error where the launcher reads it (so its failure report
    names this process's exception, as ``torch.distributed.elastic``'s ``@record`` does)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()
    # Written whole or not at all: when one rank fails, torchrun stops the others with SIGTERM
    # and reads the error file of every process that ended; a survivor stopped halfway through
    # writing its own leaves an empty file, and torchrun's report then fails on it (a
    # JSONDecodeError instead of naming the rank that failed first).
    partial = f"{path}.{os.getpid()}.partial"
    os.environ["TORCHELASTIC_ERROR_FILE"] = partial  # where the handler writes
    try:
        handler.record_exception(e)
        os.replace(partial, path)
    except OSError as err:  # the user's own error is what must come out, not this one
        with contextlib.suppress(OSError):
            os.remove(partial)
        err_console.print(
            f"{_rank_prefix()}warning: could not write torchrun's error file {path}: {err}",
            markup=False,
        )
    finally:
        os.environ["TORCHELASTIC_ERROR_FILE"] = path


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; user errors become one red line and exit code 2."""
    try:
        return fn()
    except KeyboardInterrupt:
        err_console.print(f"{_rank_prefix()}interrupted", style="red", markup=False)
        raise typer.Exit(130) from None
    except Exception as e:
        _record_for_torchrun(e)
        if os.environ.get("MARROWSCOPE_DEBUG") or not isinstance(e, _user_errors()):
            raise
        from rich.markup import escape

        # escaped: a message may hold brackets (pip install 'marrowscope[ray]', [rank 1])
        err_console.print(f"[bold red]{escape(_rank_prefix())}error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None


def _launched(nproc: str | None, command: str, options: list[tuple[str, Any]]) -> bool:
    """With ``--nproc`` above 1: run ``marrowscope COMMAND OPTIONS`` in that many processes
    (``torchrun --standalone``) and return True once they all finished; else False (run here).

    ``options``: ``(flag, value)``; ``None``/``False`` are left out, ``True`` is the bare flag,
    a list repeats the flag.
    """
    if nproc is None:
        return False
    from marrowscope.engine.distributed import launch, resolve_nproc

    n = resolve_nproc(nproc)
    if n == 1:
        return False
    args = [command]
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    err_console.print(
        f"launching {n} processes: torchrun --standalone --nproc-per-node {n} -m marrowscope "
        + " ".join(args)
    )
    launch(n, args)
    return True


def _handled(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorator for a command: its user errors become one red line and exit code 2 (:func:`_run`)."""

    @functools.wraps(fn)
    def command(*args: P.args, **kwargs: P.kwargs) -> T:
        return _run(lambda: fn(*args, **kwargs))

    return command


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    # Pillow warns about any image above ~89 M pixels as it opens it; marrowscope's own limits
    # (50 M pixels for a crop or a field) are lower and refuse such a file with a message that
    # names it, the limit and the fix, so Pillow's warning would only repeat that as noise.
    # Set here, once, before any command starts a thread.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@app.command()
@_handled
def version() -> None:
    """Print the marrowscope version."""
    import marrowscope

    console.print(marrowscope.__version__)


@app.command()
@_handled
def models() -> None:
    """List the trained models that ship with marrowscope: classes, input size, measured accuracy."""

    from rich.table import Table

    from marrowscope.models.bundle import (
        PRETRAINED_DIR,
        pretrained_bundle,
        pretrained_index,
        read_metadata,
    )

    index = pretrained_index()
    if not index:
        console.print("no trained model ships with this installation")
        return
    table = Table(title="Shipped models (use the name wherever a checkpoint is expected)")
    for col in ("name", "classes", "input", "architecture", "macro-F1 (measured on)", "size"):
        table.add_column(col)
    for name in index:
        # checked by sha256 as loading checks them: a damaged or replaced file is one clear
        # error (naming the file and the fix), never numbers read from an altered metadata.json
        meta = read_metadata(pretrained_bundle(name))
        pre = meta.pretrained or {}
        ev = pre.get("evaluation", {})
        lo, hi = ev.get("ci95", {}).get("macro_f1", (float("nan"), float("nan")))
        table.add_row(
            name,
            " ".join(meta.classes),
            f"{meta.input_size} px",
            meta.arch,
            f"{ev.get('macro_f1', float('nan')):.3f} [{lo:.3f}, {hi:.3f}] ("
            + (
                f"{ev.get('folds')}-fold CV, {ev.get('n'):,} cells)"
                if ev.get("source") == "cross-validation"
                else f"validation, {ev.get('n'):,} cells)"
            ),
            f"{pre.get('weights_mb', 0):.1f} MB",
        )
    console.print(table)
    console.print(f"model cards: {PRETRAINED_DIR}/NAME/MODEL_CARD.md")
    from marrowscope.models.detector import (
        detector_index,
        pretrained_detector,
        read_detector_metadata,
    )

    detectors = detector_index()
    if detectors:
        dt = Table(title="Shipped white-cell detectors (marrowscope detect --detector NAME)")
        for col in ("name", "description", "val recall / precision (IoU 0.5, worst origin)"):
            dt.add_column(col)
        for name, entry in detectors.items():
            meta = read_detector_metadata(pretrained_detector(name))
            per = (meta.extra.get("evaluation") or {}).get("iou_0.5", {})
            origins = [v for k, v in per.items() if k != "all"]
            worst = (
                f"{min(v['recall'] for v in origins):.3f} / {min(v['precision'] for v in origins):.3f}"
                if origins
                else "not measured"
            )
            label = f"{name} (default)" if name == DEFAULT_DETECTOR else name
            dt.add_row(label, str(entry.get("description", "")), worst)
        console.print(dt)


# ------------------------------------------------------------------------------------------ data


@data_app.command("scan")
@_handled
def data_scan(
    root: Annotated[
        str, typer.Argument(help="Folder with one sub-folder per class (or builtin:bm-sample).")
    ],
    check: Annotated[
        bool, typer.Option(help="Decode every image to find unreadable files.")
    ] = True,
    workers: Annotated[int, typer.Option(help="Worker processes (0 = one per core).")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the scan as JSON.")
    ] = None,
) -> None:
    """Per-class counts, image sizes, unreadable and byte-identical files of a folder-per-class
    tree."""

    from rich.markup import escape

    from marrowscope.data.sample import resolve_root
    from marrowscope.data.scan import describe_duplicates, format_scan, scan_folder
    from marrowscope.utils.io import atomic_write_json, printable

    if workers < 0:
        raise typer.BadParameter(
            f"must be >= 0 (0 = one per core), got {workers}", param_hint="--workers"
        )
    res = scan_folder(
        resolve_root(root),
        check_images=check,
        workers=workers,
        utf8_names=True,
        find_duplicates=True,
    )
    console.print(format_scan(res))
    sizes = ", ".join(
        f"{w}x{h}: {n}" for (w, h), n in sorted(res.sizes.items(), key=lambda kv: -kv[1])
    )
    if sizes:
        console.print(f"image sizes: {sizes}")
    for p, why in res.unreadable:
        name = printable(str(p))  # a name that is not UTF-8 cannot be printed as it is
        console.print(f"[yellow]unreadable:[/] {why if name in why else f'{name}: {why}'}")
    if res.empty_classes:
        console.print(f"[yellow]empty class folders:[/] {', '.join(res.empty_classes)}")
    if res.ignored:
        console.print(f"{len(res.ignored)} non-image file(s) ignored")
    for line in describe_duplicates(res):
        console.print(f"[yellow]{escape(printable(line))}")
    if json_out:
        atomic_write_json(
            json_out,
            {
                "root": str(res.root),
                "counts": res.counts,
                "sizes": {f"{w}x{h}": n for (w, h), n in res.sizes.items()},
                "unreadable": [{"path": str(p), "error": m} for p, m in res.unreadable],
                "empty_classes": res.empty_classes,
                "ignored": [str(p) for p in res.ignored],
                "duplicates": [
                    {"paths": list(g.paths), "classes": list(g.labels), "conflict": g.conflict}
                    for g in res.duplicates or []
                ],
            },
        )


@data_app.command("manifest")
@_handled
def data_manifest(
    source: Annotated[
        str, typer.Argument(help="Folder per class, builtin:bm-sample, or a manifest CSV.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated classes, in model order.")
    ] = None,
    max_per_class: Annotated[int | None, typer.Option(help="Cap per class (seeded draw).")] = None,
    min_per_class: Annotated[int, typer.Option(help="Fewer usable images is an error.")] = 10,
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.15,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.15,
    group_column: Annotated[
        str | None, typer.Option(help="Manifest column with patient/slide ids: split by group.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the cap and the split.")] = 42,
) -> None:
    """Write a subset + stratified (or grouped) train/val/test split manifest (path,label,split,group)."""

    from marrowscope.config import from_dict
    from marrowscope.data.manifest import class_names, write_manifest
    from marrowscope.engine.data import manifest_rows

    if out.is_dir():
        raise typer.BadParameter(
            f"{out} is a folder; pass the CSV file to write, e.g. {out / 'manifest.csv'}",
            param_hint="--out",
        )
    is_csv = source.lower().endswith(".csv")
    if is_csv and out.exists() and Path(source).exists() and os.path.samefile(source, out):
        from marrowscope.data import DataError

        raise DataError(
            f"--out {out} is the source manifest {source}: writing it would replace your "
            "manifest (only path,label,split,group are written: other columns would be lost, "
            f"relative paths made absolute); write the split elsewhere, e.g. --out "
            f"{Path(out).with_name(Path(out).stem + '-split.csv')}"
        )
    cfg = from_dict(
        {
            "seed": seed,
            "data": {
                "root": None if is_csv else source,
                "manifest": source if is_csv else None,
                "classes": classes,
                "max_per_class": max_per_class,
                "min_per_class": min_per_class,
                "split": {"val": val, "test": test, "group_column": group_column},
            },
        }
    )
    rows = manifest_rows(cfg)
    write_manifest(rows, out)
    from collections import Counter

    per = Counter((r.label, r.split) for r in rows)
    for c in class_names(rows):
        console.print(
            f"{c:>6}: " + ", ".join(f"{s} {per[(c, s)]}" for s in ("train", "val", "test"))
        )
    console.print(f"wrote {len(rows)} rows to {out}")


# ----------------------------------------------------------------------------------------- train


@app.command()
@_handled
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Experiment YAML.")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/<name>-<time>).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a config key: key.sub=value.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run folder after its last epoch.")
    ] = None,
    device: TrainDevice = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    nproc: Nproc = None,
) -> None:
    """Train a model; writes config, split, metrics, curves and best/last checkpoint bundles.

    Data-parallel on several GPUs/processes: --nproc N, or torchrun ... -m marrowscope train."""

    if resume is not None and (config is not None or run_dir is not None):
        raise typer.BadParameter(
            f"--resume continues {resume} with its own {resume / 'config.yaml'}, in that folder: "
            "leave out --config and --run-dir (change what a resumed run may change with --set, "
            "e.g. --set train.epochs=60)",
            param_hint="--config/--run-dir",
        )
    if _launched(
        nproc,
        "train",
        [
            ("--config", config),
            ("--run-dir", run_dir),
            ("--set", list(set_ or [])),
            ("--resume", resume),
            ("--device", device),
            ("--no-progress", no_progress),
        ],
    ):
        return

    from marrowscope.config import load_config
    from marrowscope.engine.train import fit, new_run_dir

    overrides = list(set_ or [])
    if device:  # a run-time setting: a resumed run may move to another device
        overrides.append(f"train.device={device}")
    if resume is not None:
        fit(
            None,
            resume,
            resume=True,
            overrides=overrides,
            progress=not no_progress,
            console=console,
        )
        return
    if config is None:
        raise FileNotFoundError("pass --config configs/<name>.yaml (or --resume RUN_DIR)")
    cfg = load_config(config, overrides)
    fit(
        cfg,
        run_dir or new_run_dir(cfg.name),
        progress=not no_progress,
        console=console,
        new_dir_only=True,
    )


# -------------------------------------------------------------------------------------------- cv


@app.command()
@_handled
def cv(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (reused to resume).")],
    folds: Annotated[int, typer.Option(help="Number of folds (stratified by class).")] = 5,
    fold_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the fold assignment (default: the config's seed)."),
    ] = None,
    train_fraction: Annotated[
        float,
        typer.Option(help="Train each fold on this fraction of its training images (0-1]."),
    ] = 1.0,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Then train the recipe on every image (OUT/refit/last), calibrated on the "
            "out-of-fold logits: the model to use, with the cross-validated estimate.",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a config key: key.sub=value.")
    ] = None,
    device: TrainDevice = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    nproc: Nproc = None,
) -> None:
    """K-fold cross-validation of a recipe: out-of-fold accuracy, macro-F1, per-class F1, TTA
    variants and calibration (mean ± std over folds), for the best-epoch and the last-epoch
    weights; resumable. --fold-seed keeps the folds fixed across training seeds;
    --train-fraction gives a learning curve; --refit then trains the final model on all images."""

    if not 0.0 < train_fraction <= 1.0:
        raise typer.BadParameter(
            f"{train_fraction} is not in (0, 1]; use e.g. 0.5 for half of each fold's training "
            "images",
            param_hint="--train-fraction",
        )

    if _launched(
        nproc,
        "cv",
        [
            ("--config", config),
            ("--out", out),
            ("--folds", folds),
            ("--fold-seed", fold_seed),
            ("--train-fraction", train_fraction),
            ("--refit", refit),
            ("--set", list(set_ or [])),
            ("--device", device),
            ("--no-progress", no_progress),
        ],
    ):
        return

    from marrowscope.config import load_config
    from marrowscope.engine.cv import cross_validate

    overrides = list(set_ or [])
    if device:
        overrides.append(f"train.device={device}")
    cfg = load_config(config, overrides)
    cross_validate(
        cfg,
        out,
        folds=folds,
        fold_seed=fold_seed,
        train_fraction=train_fraction,
        refit=refit,
        console=console,
        progress=not no_progress,
    )


# -------------------------------------------------------------------------------------- evaluate


@app.command()
@_handled
def evaluate(
    checkpoint: CheckpointArg,
    data: Annotated[
        str, typer.Argument(help="Folder per class, builtin:bm-sample, or manifest CSV.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write metrics.json, report.md, ...")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Manifest split to use (default: test if any).")
    ] = None,
    map_: Annotated[
        list[str] | None, typer.Option("--map", help="Rename a data class: SRC=DST (repeatable).")
    ] = None,
    drop_unknown: Annotated[
        bool, typer.Option(help="Leave out classes the checkpoint does not know.")
    ] = False,
    focus: Annotated[
        str | None, typer.Option(help="Class for the focus block (default HAC).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    device: Device = "auto",
    tta: Annotated[
        str | None,
        typer.Option(help="Test-time augmentation none, flips or d8 (default: the bundle's)."),
    ] = None,
) -> None:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class table, confusion matrix, 95% CIs."""

    from marrowscope.engine.evaluate import evaluate_bundle, parse_class_map
    from marrowscope.reports.tables import (
        PER_CLASS_DASH_NOTE,
        has_dash,
        per_class_table,
        to_rich,
    )

    m = evaluate_bundle(
        checkpoint,
        Path(data),
        out_dir=out,
        split=split,
        class_map=parse_class_map(map_ or []),
        drop_unknown=drop_unknown,
        focus=focus,
        batch_size=batch_size,
        device=device,
        tta=tta,
        console=console,
    )
    ci = m["ci95"]
    per_class = per_class_table(m)
    console.print(to_rich(per_class, title=f"{checkpoint} on {data} ({m['n']} images)"))
    console.print(
        f"accuracy {m['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}]  "
        f"macro-F1 {m['macro_f1']:.3f} [{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}]  "
        f"balanced accuracy {m['balanced_accuracy']:.3f}  weighted F1 {m['weighted_f1']:.3f}"
    )
    absent = [c for c, v in m["per_class"].items() if not v["support"]]
    if absent:
        console.print(
            f"macro-F1 and balanced accuracy are over the {len(m['per_class']) - len(absent)} "
            f"classes with images here; {', '.join(absent)} (no image) left out; over all "
            f"model classes, counting those as 0: macro-F1 {m['macro_f1_all_classes']:.3f}"
        )
    if has_dash(per_class):
        console.print(PER_CLASS_DASH_NOTE)
    if out:
        console.print(f"report: {out / 'report.md'}")


# --------------------------------------------------------------------------------------- compare


@app.command()
@_handled
def compare(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Experiment YAML with compare.models.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override: key.sub=value.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Reuse the finished model runs in --out and continue interrupted ones (only "
            "those trained with the same config and split; without it, runs in --out are refused)."
        ),
    ] = False,
    device: TrainDevice = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    nproc: Nproc = None,
) -> None:
    """Train and evaluate every listed model on one split; write the paper's Tables 1-3 + charts."""

    if _launched(
        nproc,
        "compare",
        [
            ("--config", config),
            ("--out", out),
            ("--set", list(set_ or [])),
            ("--resume", resume),
            ("--device", device),
            ("--no-progress", no_progress),
        ],
    ):
        return

    from marrowscope.config import load_config
    from marrowscope.engine.compare import compare as run_compare
    from marrowscope.engine.train import new_run_dir

    overrides = list(set_ or [])
    if device:
        overrides.append(f"train.device={device}")
    cfg = load_config(config, overrides)
    target = out or new_run_dir(f"compare-{cfg.name}")
    run_compare(
        cfg, target, resume=resume, progress=not no_progress, console=console, source=config
    )


# ---- whole fields of view (issue 14)

DetectorOpt = Annotated[
    str,
    typer.Option(
        "--detector",
        help="White-cell detector: a shipped name ('marrowscope models' lists them), 'classical' "
        "(stain thresholding, no model) or a detector bundle folder.",
    ),
]
UmPerPxOpt = Annotated[
    str,
    typer.Option(
        "--um-per-px",
        help="The fields' scale in micrometres per pixel; 'auto' measures it on each field's red "
        "cells (7.5 um across), 'model' assumes the classifier's training scale.",
    ),
]
MinScoreOpt = Annotated[
    float | None,
    typer.Option(
        help="Keep white cells scoring at least this (default: the detector's fitted value)."
    ),
]


def _load_detector(name: str, min_score: float | None) -> Any:
    from marrowscope.inference.fields import FieldDetector

    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise typer.BadParameter(
            f"must be between 0 and 1, got {min_score}", param_hint="--min-score"
        )
    return FieldDetector.load(name, min_score=min_score)


def _parse_um_per_px(value: str, predictor: Any) -> float | None:
    """``auto`` -> None (measure), ``model`` -> the classifier's training scale, else a number."""
    from marrowscope.inference.fields import crop_spec

    text = value.strip().lower()
    if text == "auto":
        return None
    if text == "model":
        if predictor is None:
            raise typer.BadParameter("'model' needs a classifier", param_hint="--um-per-px")
        return crop_spec(predictor).um_per_px
    try:
        number = float(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a number, 'auto' or 'model'", param_hint="--um-per-px"
        ) from None
    if not 0.01 <= number <= 2.0:
        raise typer.BadParameter(
            f"{number} um/px is not a plausible microscope scale (about 0.05-0.1 at 100x oil)",
            param_hint="--um-per-px",
        )
    return number


def _warn_field_like(paths: list[str], detector: str, advice: str) -> None:
    """Warn when images given as single cells (``paths``, decoded) look like whole fields."""
    from rich.markup import escape

    from marrowscope.engine.count import field_like_images
    from marrowscope.inference.fields import FieldDetector
    from marrowscope.models.bundle import BundleError

    try:
        det = FieldDetector.load(detector)
    except BundleError:
        return  # no detector installed: nothing to check with
    odd = field_like_images(paths, det)
    if odd:
        shown = ", ".join(f"{escape(Path(p).name)} ({n} white cells)" for p, n in odd[:3])
        err_console.print(
            f"[yellow]warning:[/] {len(odd)} of the images checked look like whole fields (red "
            f"cells all around, no white cell filling the middle), not single-cell crops: "
            f"{shown}; {advice}"
        )


@app.command()
@_handled
def detect(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="Classifier for the cells found: a bundle folder or a shipped name (bm8, pbc6); "
            "'none' for boxes only."
        ),
    ],
    fields: Annotated[
        list[str], typer.Argument(help="Field images, folders (recursive) or quoted glob patterns.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    detector: DetectorOpt = DEFAULT_DETECTOR,
    um_per_px: UmPerPxOpt = "auto",
    min_score: MinScoreOpt = None,
    overlays: Annotated[bool, typer.Option(help="Draw an overlay PNG per field.")] = True,
    device: Device = "auto",
    backend: Backend = "torch",
    tta: Annotated[
        str | None,
        typer.Option(help="Test-time augmentation none, flips or d8 (default: the bundle's)."),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Find the white cells of whole fields of view (and classify them): detections.csv (one row
    per cell: field, box, score, class, confidence), fields.csv (one row per field: cells found,
    scale used, error), detections.json and overlays/*.png (overlays an earlier run left there
    are removed). Exit code 1 when no field could be used."""

    from rich.markup import escape

    from marrowscope.engine.detect import detect_fields
    from marrowscope.inference import Predictor
    from marrowscope.inference.batching import collect_inputs
    from marrowscope.utils.io import printable

    _check_backend(backend)
    det = _load_detector(detector, min_score)
    predictor = None
    if checkpoint.strip().lower() not in ("none", "-"):
        predictor = Predictor.from_checkpoint(checkpoint, device=device, backend=backend, tta=tta)
    text = um_per_px.strip().lower()
    scale = None if text == "model" else _parse_um_per_px(um_per_px, predictor)
    if text == "model" and predictor is None:
        raise typer.BadParameter("'model' needs a classifier", param_hint="--um-per-px")
    collected = collect_inputs(fields)
    paths = collected.paths
    skipped = collected.skipped_summary()
    if skipped:
        err_console.print(f"[yellow]note:[/] {escape(skipped)}")

    def report(o: Any) -> None:
        for w in o.warnings:
            err_console.print(f"[yellow]warning:[/] {escape(printable(o.path))}: {escape(w)}")
        if o.error:
            err_console.print(f"[yellow]skipped:[/] {escape(printable(o.error))}")

    run = detect_fields(
        paths,
        det,
        out,
        predictor=predictor,
        um_per_px=scale,
        use_model_scale=text == "model",
        overlays=overlays,
        progress=not no_progress,
        on_field=report,
    )
    empty = [o for o in run.outcomes if o.error is None and not o.cells]
    errors = [o for o in run.outcomes if o.error]
    n = len(run.outcomes)
    console.print(
        f"{n} field(s): {run.cells} white cell(s) found"
        + (f"; {len(empty)} field(s) with no white cell (count 0)" if empty else "")
        + (f"; {len(errors)} field(s) could not be used (see fields.csv)" if errors else "")
        + f" - {n / max(run.seconds, 1e-9):.1f} fields/s ({det.name_}"
        + (f" + {escape(str(checkpoint))}" if predictor is not None else "")
        + ")"
    )
    if predictor is not None and run.cells:
        from collections import Counter

        per = Counter(c.label for o in run.outcomes for c in o.cells)
        console.print(
            "classes: " + ", ".join(f"{k} {per[k]}" for k in predictor.classes_ if per[k])
        )
    console.print(
        f"wrote {escape(str(run.files['detections']))}, {escape(str(run.files['fields']))}"
        + (f", {escape(str(Path(out) / 'overlays'))}/" if overlays else "")
    )
    if n and len(errors) == n:
        raise typer.Exit(1)


# ---- explain / count commands (issue 4)


@app.command()
@_handled
def explain(
    checkpoint: CheckpointArg,
    images: Annotated[
        list[str], typer.Argument(help="Image files, folders (recursive) or quoted glob patterns.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays + contact sheet.")],
    class_: Annotated[
        str | None,
        typer.Option("--class", help="Explain this class instead of each predicted class."),
    ] = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per Grad-CAM pass.")] = 16,
    method: Annotated[
        str | None,
        typer.Option(
            help="Class activation map method: gradcam-elementwise (the default, measured "
            "best: docs/explain.md), gradcam, layercam, gradcam++ or hirescam."
        ),
    ] = None,
) -> None:
    """Activation maps (element-wise Grad-CAM unless --method says otherwise): an overlay PNG per
    image and a contact sheet with label and confidence; explain.csv lists them."""

    from rich.markup import escape

    from marrowscope.explain.gradcam import DEFAULT_METHOD, check_method, class_index
    from marrowscope.explain.sheets import explain_to_folder
    from marrowscope.inference import Predictor
    from marrowscope.inference.batching import collect_inputs
    from marrowscope.utils.progress import make_progress

    if batch_size < 1:
        raise typer.BadParameter(f"must be >= 1; got {batch_size}", param_hint="--batch-size")
    method = check_method(method or DEFAULT_METHOD)  # unknown method: fail before any work
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    if class_ is not None:
        class_index(predictor.classes_, class_)  # unknown class: fail before any work
    collected = collect_inputs(images)
    paths = collected.paths
    with make_progress(transient=True) as bar:
        task = bar.add_task("Grad-CAM", total=len(paths), stats="")
        summary = explain_to_folder(
            predictor,
            paths,
            out,
            target_class=class_,
            batch_size=batch_size,
            method=method,
            on_progress=lambda n: bar.advance(task, n),
        )
    for path, why in summary.failed:
        msg = why if str(path) in why else f"{path}: {why}"
        err_console.print(f"[yellow]skipped:[/] {escape(msg)}")
    done = len(summary.overlays)
    console.print(
        f"{done} overlay(s) in {escape(str(out))}"
        + (f", {len(summary.failed)} unreadable image(s) skipped" if summary.failed else "")
    )
    for sheet in summary.sheets:
        console.print(f"contact sheet: {escape(str(sheet))}")
    skipped = collected.skipped_summary()
    if skipped:
        console.print(f"[yellow]note:[/] {escape(skipped)}")
    if done == 0:
        raise typer.Exit(1)


@app.command()
@_handled
def count(
    checkpoint: CheckpointArg,
    sample_dir: Annotated[
        Path, typer.Argument(help="One patient sample: a folder of single-cell images.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: ./count-<sample name>)."),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(help="Top probability below which a cell is unidentified (not counted)."),
    ] = DEFAULT_THRESHOLD,
    hac_percent: Annotated[
        float, typer.Option(help="Flag when HAC cells are >= this % of identified cells.")
    ] = DEFAULT_HAC_MIN_PERCENT,
    hac_count: Annotated[
        int, typer.Option(help="Flag when >= this many cells are HAC.")
    ] = DEFAULT_HAC_MIN_COUNT,
    evidence: Annotated[
        int, typer.Option(help="Top HAC cells shown with Grad-CAM.")
    ] = DEFAULT_EVIDENCE,
    gallery: Annotated[
        int, typer.Option(help="Cells shown per class in the report.")
    ] = DEFAULT_GALLERY,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    workers: Annotated[
        int, typer.Option(help="Decoding threads or processes (0 = one per core).")
    ] = 0,
    tta: Annotated[
        str | None,
        typer.Option(help="Test-time augmentation none, flips or d8 (default: the bundle's)."),
    ] = None,
    backend: Backend = "torch",
    decode: Decode = None,
    fields: Annotated[
        bool,
        typer.Option(
            "--fields",
            help="The images are whole fields of view: find the white cells in each, crop them at "
            "the classifier's scale and count them (writes detections.csv, fields.csv, overlays/).",
        ),
    ] = False,
    detector: DetectorOpt = DEFAULT_DETECTOR,
    um_per_px: UmPerPxOpt = "auto",
    min_score: MinScoreOpt = None,
) -> None:
    """Differential count of one sample + hairy-cell flag: report.html, count.json, cells.csv.

    A sample is a folder of single-cell images, or with --fields a folder of whole fields of
    view. The thresholds are research settings, not a clinical decision rule. Exit code 1 when
    no image (field) of the sample could be used.
    """

    from rich.markup import escape
    from rich.table import Table

    from marrowscope.engine.count import count_fields, count_sample, write_count_outputs
    from marrowscope.inference import Predictor
    from marrowscope.reports.detect_files import check_overlays
    from marrowscope.utils.io import printable

    _check_backend(backend)
    decode_mode = _check_decode(decode)
    if fields and decode is not None:
        raise typer.BadParameter(
            "--decode is for a folder of cell images; fields (--fields) are decoded one at a time"
        )
    predictor = Predictor.from_checkpoint(
        checkpoint, device=device, backend=backend, batch_size=batch_size, tta=tta
    )
    folder = Path(sample_dir).expanduser()
    target = out or Path(f"count-{folder.resolve().name or folder}")  # the sample's name
    if fields:
        det = _load_detector(detector, min_score)
        scale = _parse_um_per_px(um_per_px, predictor)
        check_overlays(target)  # refused before any work when its overlays/ is someone else's
        res = count_fields(
            predictor,
            sample_dir,
            det,
            um_per_px=scale,
            use_model_scale=um_per_px.strip().lower() == "model",
            threshold=threshold,
            hac_min_percent=hac_percent,
            hac_min_count=hac_count,
            evidence=evidence,
        )
    else:
        res = count_sample(
            predictor,
            sample_dir,
            threshold=threshold,
            hac_min_percent=hac_percent,
            hac_min_count=hac_count,
            evidence=evidence,
            workers=workers,
            decode=decode_mode,
        )
        _warn_field_like([c.path for c in res.cells], detector, "count fields with --fields")
    paths = write_count_outputs(res, target, gallery=gallery)
    totals = res.totals()
    if fields:
        console.print(
            f"{totals['fields']} field(s), {totals['cells_found']} white cell(s) found"
            + (
                f"; {totals['fields_without_cells']} field(s) with no white cell (count 0)"
                if totals["fields_without_cells"]
                else ""
            )
        )
        for f in res.fields:
            for w in f.warnings:
                err_console.print(f"[yellow]warning:[/] {escape(printable(f.path))}: {escape(w)}")
    table = Table(title=f"{escape(printable(res.sample))}: {totals['identified']} identified cells")
    for col in ("class", "count", "%"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in res.classes:
        table.add_row(c, str(res.counts[c]), f"{res.percents[c]:.1f}")
    console.print(table)
    console.print(
        f"unidentified (confidence < {threshold:g}): {totals['unidentified']}  "
        f"unreadable: {totals['unreadable']}"
    )
    for path, why in res.unreadable:
        msg = why if path in why else f"{path}: {why}"
        label = "could not be used" if fields else "unreadable"
        err_console.print(f"[yellow]{label}:[/] {escape(printable(msg))}")
    if fields:
        console.print(
            f"boxes: {escape(str(paths['detections']))}; overlays: {escape(str(target / 'overlays'))}"
        )
    colour = {"flagged": "bold red", "not flagged": "green"}.get(res.flag.status, "yellow")
    console.print(f"[{colour}]hairy-cell flag: {res.flag.status}[/] - {escape(res.flag.message)}")
    console.print(f"report: {escape(printable(str(paths['report'])))}")
    if res.n_images and len(res.unreadable) == res.n_images:
        err_console.print(
            f"[red]no {'field' if fields else 'image'} of this sample could be used[/] (every "
            "one is listed above and in cells.csv); the count is empty"
        )
        raise typer.Exit(1)


# ------------------------------------------------------------- inference commands (issue 4)


@app.command()
@_handled
def predict(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint bundle folder (RUN_DIR/best) or a shipped model name (bm8, pbc6, or "
            "builtin:bm8 where a local path bm8 exists; see `marrowscope models`); a .onnx file "
            "with --backend onnx, an int8 export folder with --backend int8."
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (recursive) and glob patterns; with --engine ray also "
            "manifests (.csv/.parquet with a path column) and object-storage URIs (s3://...)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Predictions file: .csv, .json or .parquet (--engine ray: a Parquet folder); "
            "without it, a table on the terminal.",
        ),
    ] = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    topk: Annotated[int, typer.Option(help="Ranked classes per image (top1..topk).")] = 3,
    workers: Annotated[
        int,
        typer.Option(
            help="local: decoding/preprocessing processes (0 = one per CPU core); ray: predictor "
            "actors (0 = one per --gpus-per-worker GPUs, else one per two CPUs)."
        ),
    ] = 0,
    backend: Backend = "torch",
    tta: Annotated[
        str | None,
        typer.Option(help="Test-time augmentation none, flips or d8 (default: the bundle's)."),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="local (this machine's processes) or ray (Ray Data tasks + an actor pool on a "
            "Ray cluster; pip install 'marrowscope\\[ray]'; docs/scale-out.md)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: auto (the cluster `ray start` made), ray://HOST:10001 (Ray "
            "Client); default: start Ray on this machine."
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option(help="--engine ray: GPUs per predictor actor (0 = CPU actors).")
    ] = 0.0,
    cpus_per_worker: Annotated[
        float,
        typer.Option(help="--engine ray: CPUs (torch threads) per predictor actor (e.g. 0.5)."),
    ] = 1.0,
    decode: Decode = None,
) -> None:
    """Classify images: one row per image with class, confidence, top-k and every probability
    (in --out; without it, a table of class, confidence and runner-up per image, and a tally)."""

    import time

    from rich.markup import escape

    import marrowscope
    from marrowscope.inference.batching import (
        GRAYSCALE_WARNING,
        collect_inputs,
        output_format,
        prediction_records,
        write_predictions,
    )
    from marrowscope.inference.predictor import Predictor
    from marrowscope.utils.io import printable

    if topk < 1:
        raise typer.BadParameter(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise typer.BadParameter(f"--batch-size must be >= 1, got {batch_size}")
    _check_backend(backend)
    decode_mode = _check_decode(decode)
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"--engine must be local or ray, got {engine!r}")
    if engine == "ray" and decode is not None:
        raise typer.BadParameter(
            "--decode is for --engine local; with --engine ray, Ray Data tasks decode"
        )
    if engine == "local" and (address is not None or gpus_per_worker or cpus_per_worker != 1.0):
        raise typer.BadParameter(
            "--address, --gpus-per-worker and --cpus-per-worker need --engine ray"
        )
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise typer.BadParameter(
            "--gpus-per-worker must be >= 0 and --cpus-per-worker > 0, got "
            f"{gpus_per_worker:g} and {cpus_per_worker:g}"
        )
    if engine == "ray":
        if out is None:
            raise typer.BadParameter("--engine ray writes a Parquet folder: give it with --out")
        _predict_ray(
            checkpoint,
            inputs,
            out,
            address=address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            batch_size=batch_size,
            topk=topk,
            backend=backend,
            tta=tta,
            progress=not no_progress,
        )
        return
    if out is not None:
        output_format(out)  # fail before the run: bad extension or no pyarrow
    collected = collect_inputs(inputs)
    paths = collected.paths
    pred = Predictor.from_checkpoint(
        checkpoint, device=device, backend=backend, batch_size=batch_size, tta=tta
    )
    start = time.perf_counter()
    predictions = list(
        pred.predict_paths(paths, workers=workers, progress=not no_progress, decode=decode_mode)
    )
    seconds = time.perf_counter() - start
    results = [(r.path, r.probs, r.error) for r in predictions]
    gray = [r.path for r in predictions if r.grayscale]
    records = prediction_records(
        results,
        pred.classes_,
        topk=topk,
        extra={
            "model": pred.model_name_,
            "arch": pred.arch,
            "marrowscope_version": marrowscope.__version__,
        },
        warnings=[GRAYSCALE_WARNING if r.grayscale else "" for r in predictions],
    )
    errors = [(p, e) for p, _, e in results if e]
    if out is None:
        _print_predictions(records)
    else:
        write_predictions(records, out)
    for _, e in errors[:5]:
        console.print(f"[yellow]unreadable:[/] {escape(e)}")
    if len(errors) > 5:
        where = f"the error column of {out}" if out is not None else "the table"
        console.print(f"[yellow]... {len(errors) - 5} more; see {where}")
    if gray:
        names = ", ".join(printable(os.path.basename(p)) for p in gray[:3])
        more = f" and {len(gray) - 3} more" if len(gray) > 3 else ""
        where = f"; flagged in the warning column of {out}" if out is not None else ""
        console.print(
            f"[yellow]warning:[/] {len(gray)} image(s) are grayscale ({escape(names)}{more}): "
            "the model was trained on stained colour images; predictions on them are "
            f"unreliable{escape(where)}"
        )
    skipped = collected.skipped_summary()
    if skipped:
        console.print(f"[yellow]note:[/] {escape(skipped)}")
    _warn_field_like(
        [p for p, _, e in results if not e],
        DEFAULT_DETECTOR,
        "find and classify their white cells with: marrowscope detect "
        f"{escape(str(checkpoint))} FIELDS... --out DIR (or count them with: marrowscope count "
        "CK FOLDER --fields)",
    )
    n_ok = len(results) - len(errors)
    share = pred.recheck_share()
    rechecked = (
        f", {pred.cells_rechecked_} uncertain cell(s) ({share:.1%}) re-checked in fp32"
        if share is not None and pred.recheck_margin_ > 0
        else ""
    )
    console.print(
        f"{len(results)} images, {len(errors)} error(s), {n_ok / max(seconds, 1e-9):.1f} "
        f"images/s ({seconds:.1f} s, {pred.backend} backend{rechecked}); "
        + (f"wrote {out}" if out is not None else "--out FILE.csv keeps every probability")
    )


def _print_predictions(records: list[dict[str, Any]]) -> None:
    """``predict`` without ``--out``: one table row per image (its path under the folder the
    images share, named in the caption), then how many of each class."""
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    folders = {os.path.dirname(os.path.abspath(r["path"])) for r in records}
    common = os.path.commonpath(sorted(folders)) if folders else ""
    table = Table(show_edge=False, caption=escape(f"images under {common}") if common else None)
    table.add_column("image", overflow="fold")
    table.add_column("class")
    table.add_column("confidence", justify="right")
    table.add_column("runner-up")
    for r in records:
        name = escape(os.path.relpath(os.path.abspath(r["path"]), common) if common else r["path"])
        if r["predicted"] is None:
            table.add_row(name, "[yellow]unreadable", "", "")
            continue
        second = f"{r['top2']} {r['p_top2']:.2f}" if r.get("top2") is not None else ""
        table.add_row(name, r["predicted"], f"{r['confidence']:.2f}", second)
    console.print(table)
    tally = Counter(r["predicted"] for r in records if r["predicted"] is not None)
    if tally:
        console.print(", ".join(f"{c} {n}" for c, n in tally.most_common()))


def _predict_ray(
    checkpoint: Path,
    inputs: list[str],
    out: Path,
    *,
    address: str | None,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    batch_size: int,
    topk: int,
    backend: str,
    tta: str | None,
    progress: bool,
) -> None:
    """``predict --engine ray``: the same rows on a Ray cluster (engine/ray_predict.py)."""
    from rich.markup import escape

    from marrowscope.engine.ray_predict import predict_with_ray

    res = predict_with_ray(
        checkpoint,
        inputs,
        out,
        address=address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        batch_size=batch_size,
        topk=topk,
        tta=tta,
        backend=backend,
        progress=progress,
    )
    for _, e in res.errors[:5]:
        console.print(f"[yellow]unreadable:[/] {escape(e)}")
    if len(res.errors) > 5:
        console.print(f"[yellow]... {len(res.errors) - 5} more; see the error column of {out}")
    skipped = res.skipped_summary()
    if skipped:
        console.print(f"[yellow]note:[/] {escape(skipped)}")
    cluster = ", ".join(f"{v:g} {k}" for k, v in res.cluster.items())
    console.print(
        f"{res.images} images, {len(res.errors)} error(s), {res.images_per_second:.1f} images/s "
        f"({res.seconds:.1f} s, ray engine, {res.actors} predictor actor(s) on {cluster}); "
        f"wrote {escape(res.out)}"
    )


@app.command()
@_handled
def export(
    checkpoint: CheckpointArg,
    format_: Annotated[
        str, typer.Option("--format", help="onnx (fp32, parity check) or int8 (OpenVINO).")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output: a .onnx file (default CHECKPOINT/model.onnx; for a shipped model "
            "~/.cache/marrowscope/onnx/NAME/model.onnx, where --backend onnx finds it), or for "
            "int8 a folder (default CHECKPOINT/int8; for a shipped model "
            "~/.cache/marrowscope/int8/NAME).",
        ),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    calibrate: Annotated[
        str | None,
        typer.Option(
            help="int8: calibrate on the cells under this folder (default: a stratified draw "
            "from the bundle's training split)."
        ),
    ] = None,
    calibration_size: Annotated[int, typer.Option(help="int8: calibration images to draw.")] = 300,
    guard_data: Annotated[
        str | None,
        typer.Option(
            help="int8: labelled cells for the accuracy guard, a folder per class (default: "
            "the bundle's validation split)."
        ),
    ] = None,
    guard_tta: Annotated[
        str | None,
        typer.Option(help="int8: test-time augmentation of the guard (default: the bundle's)."),
    ] = None,
    max_f1_drop: Annotated[
        float, typer.Option(help="int8: fail when macro-F1 drops by more than this.")
    ] = 0.005,
    min_agreement: Annotated[
        float, typer.Option(help="int8: fail when top-1 agreement with fp32 is below this.")
    ] = 0.99,
    force: Annotated[
        bool,
        typer.Option("--force", help="int8: write the model even if the accuracy guard fails."),
    ] = False,
    workers: Annotated[
        int, typer.Option(help="Decoding threads or processes (0 = one per core).")
    ] = 0,
    recheck: Annotated[
        str,
        typer.Option(
            help="int8: predict again in fp32 the cells whose top-two int8 probabilities are "
            "closer than a margin: auto (99th percentile of how much int8 moves that gap, "
            "measured on 600 other training cells; at most 15% of them re-checked), off, or a "
            "margin such as 0.1."
        ),
    ] = "auto",
) -> None:
    """Export to ONNX (fp32, parity check with PyTorch) or to int8 (OpenVINO static
    quantisation, with an accuracy guard against fp32 on held-out labelled cells)."""

    fmt = format_.lower()
    if fmt not in ("onnx", "int8", "openvino"):
        raise typer.BadParameter(f"unknown format {format_!r}; use onnx or int8")
    if fmt == "onnx":
        from marrowscope.export.onnx import export_checkpoint

        console.print(f"exporting {checkpoint} to ONNX and checking parity ...")
        target, rep = export_checkpoint(checkpoint, out=out, opset=opset)
        console.print(
            f"parity ONNX Runtime vs PyTorch fp32 (max abs probability difference, tolerance "
            f"{rep.tolerance:g}): random images {rep.random_max_abs_diff:.2e} (n={rep.n_random}), "
            f"real images {rep.real_max_abs_diff:.2e} (n={rep.n_real})"
        )
        console.print(f"wrote {target} ({rep.exporter} exporter, opset {rep.opset})")
        if out is None:
            console.print(f"use it with: marrowscope predict {checkpoint} IMAGES --backend onnx")
        return
    if calibration_size < 1:
        raise typer.BadParameter(
            f"must be >= 1, got {calibration_size}", param_hint="--calibration-size"
        )
    if not 0.0 <= min_agreement <= 1.0:
        raise typer.BadParameter(
            f"must be in [0, 1], got {min_agreement}", param_hint="--min-agreement"
        )
    if guard_tta is not None and guard_tta not in ("none", "flips", "d8"):
        raise typer.BadParameter(
            f"use none, flips or d8, got {guard_tta!r}", param_hint="--guard-tta"
        )
    if recheck not in ("auto", "off"):
        try:
            ok = 0.0 <= float(recheck) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise typer.BadParameter(
                f"use auto, off or a margin in [0, 1], got {recheck!r}", param_hint="--recheck"
            )

    from marrowscope.export.int8 import GuardFailedError, export_int8_checkpoint

    console.print(
        f"exporting {checkpoint} to int8 (OpenVINO + NNCF): calibrating on "
        f"{calibrate or 'the training split'}, then checking against fp32 on "
        f"{guard_data or 'the validation split'} ..."
    )
    try:
        res = export_int8_checkpoint(
            checkpoint,
            out=out,
            calibrate=calibrate,
            calibration_size=calibration_size,
            guard_data=guard_data,
            guard_tta=guard_tta,
            max_f1_drop=max_f1_drop,
            min_agreement=min_agreement,
            force=force,
            workers=workers,
            recheck=recheck,
        )
    except GuardFailedError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(3) from None
    g, one = res.guard, res.guard_single_view
    console.print(
        f"calibration: {res.calibration['n_used']} images of the {res.calibration['source']}"
    )
    console.print(
        f"guard ({res.guard_data}, test-time augmentation {res.guard_tta}): {g.summary()}"
    )
    console.print(f"guard, single view: {one.summary()}")
    rc = res.recheck or {}
    if rc.get("margin"):
        fit = (
            f"{rc['setting']}; on {rc['cells']} cells ({rc.get('fitted_on', '?')}) int8 alone "
            f"agrees with fp32 on {rc['agreement_int8']:.1%}, with the re-check "
            f"{rc['agreement_with_recheck']:.1%}, re-checking {rc['share']:.1%} of them"
        )
        checked = (
            f"; {res.guard_rechecked:.1%} of the guard cells were re-checked"
            if res.guard_rechecked is not None
            else ""
        )
        console.print(f"fp32 re-check of uncertain cells: margin {rc['margin']:g} ({fit}){checked}")
    else:
        console.print("fp32 re-check of uncertain cells: none (margin 0)")
    if res.streams is not None:
        rate = res.streams.get("images_per_s")
        timed = (
            f" (batch of {res.streams['batch']}: 1 stream {rate['1']} images/s, 2 streams "
            f"{rate['2']})"
            if rate
            else " (one thread: nothing to split)"
        )
        console.print(f"OpenVINO streams: {res.streams['streams']}{timed}")
    if res.forced:
        err_console.print(
            f"[bold yellow]warning:[/] the guard failed ({'; '.join(g.failures)}); written anyway "
            "because of --force (recorded in its metadata)"
        )
    console.print(f"wrote {res.path} (use it with --backend int8)")


@app.command()
@_handled
def benchmark(
    target: Annotated[
        str, typer.Argument(help="Checkpoint bundle folder, or a model name (random weights).")
    ],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,16,64",
    backends: Annotated[
        str, typer.Option(help="Comma-separated: torch-fp32, torch-bf16, onnx, int8.")
    ] = "torch-fp32,torch-bf16,onnx,int8",
    images: Annotated[
        str | None,
        typer.Option(help="Folder of images for the end-to-end runs (default: bundled sample)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write Markdown here.")] = None,
    min_time: Annotated[float, typer.Option(help="Seconds per measurement (at least).")] = 2.0,
    warmup: Annotated[int, typer.Option(help="Warm-up batches per measurement.")] = 2,
    end_to_end: Annotated[
        bool, typer.Option(help="Also time decode -> preprocess -> infer on image files.")
    ] = True,
    workers: Annotated[
        int, typer.Option(help="Decoding threads or processes (0 = one per core).")
    ] = 0,
    decode: Decode = None,
) -> None:
    """Images/s and per-batch latency (median, p95) per batch size x backend."""

    from marrowscope.engine.benchmark import (
        BACKENDS,
        format_table,
        run_benchmark,
        to_markdown,
    )
    from marrowscope.utils.io import atomic_write_text

    try:
        sizes = [int(v) for v in batch_sizes.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}"
        ) from None
    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise typer.BadParameter(
            f"--backends: unknown {', '.join(unknown) or '(none given)'}; use a comma-separated "
            f"subset of {','.join(BACKENDS)}"
        )
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"--batch-sizes must be positive, got {batch_sizes!r}")
    if workers < 0:
        raise typer.BadParameter(
            f"must be >= 0 (0 = one per core), got {workers}", param_hint="--workers"
        )
    decode_mode = _check_decode(decode)
    report = run_benchmark(
        target,
        batch_sizes=sizes,
        backends=names,
        images=images,
        warmup=warmup,
        min_time=min_time,
        end_to_end=end_to_end,
        workers=workers,
        decode=decode_mode,
        console=err_console,
    )
    console.print(format_table(report))
    for note in report.notes:
        console.print(f"- {note}")
    if out:
        atomic_write_text(out, to_markdown(report))
        console.print(f"wrote {out}")


# ---- review app (issue 5): `serve` and `users` live in cli/serve.py
from marrowscope.cli import serve as _serve  # noqa: E402

app.command("serve")(_serve.serve)
app.add_typer(_serve.users_app, name="users")


def _reflow_help(typer_app: typer.Typer) -> None:
    """Let the terminal wrap each command's help: join the lines of each docstring paragraph.

    Typer's Rich help keeps a docstring's line breaks, so a paragraph wrapped at 100 columns
    in the source came out ragged in an 80-column terminal ("fields of" / "view."). Paragraphs
    (blank-line separated) stay paragraphs; the first is the one-line summary of the command
    list.
    """
    for info in typer_app.registered_commands:
        text = info.help if info.help is not None else inspect.getdoc(info.callback)
        if text:
            paragraphs = text.split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)


for _app in (app, data_app, _serve.users_app):
    _reflow_help(_app)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    main()

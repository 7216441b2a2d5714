"""Inference speed of a checkpoint bundle or a bare model name, like timm's benchmark script.

For every batch size x backend (torch fp32 eager, torch bf16 autocast + channels_last, ONNX
Runtime fp32, OpenVINO int8) it measures images/s and the per-batch latency (median, p95):

* **network alone**: the forward pass on pre-made batches in the form ``predict`` gives each
  backend (float tensors; for int8, uint8 NHWC images, converted inside the OpenVINO graph);
* **end to end**: decode -> preprocess -> infer through :meth:`Predictor.predict_path_batches`
  (threads and/or worker processes as ``decode`` says, overlapped with inference) on a
  folder of image files (default: the bundled sample).

Each measurement runs ``warmup`` batches first, then repeats until at least ``min_time`` seconds
and ``min_iters`` batches have been timed. The per-step preprocessing cost (decode, the centre
crop when on, resize, NL-means denoise, sharpen) is measured too, so a report says what denoising
costs.
The int8 backend uses the checkpoint's int8 export (``marrowscope export CK --format int8``) when
there is one, and reports its accuracy guard (agreement, macro-F1 drop with its CI, largest
probability difference); otherwise it quantises a temporary copy calibrated on the benchmark's
images, without a guard (speed only). Every number is for one view per image: a bundle that predicts with test-time augmentation
(``inference.tta`` = ``flips`` / ``d8``) runs 4 / 8 forward passes per image, so divide by that.
Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table as RichTable

from marrowscope import __version__
from marrowscope.config import ModelConfig
from marrowscope.data.sample import SAMPLE_ROOT, resolve_root
from marrowscope.export.int8 import quantize_openvino, save_int8
from marrowscope.export.onnx import export_onnx
from marrowscope.inference.batching import (
    InputError,
    check_decode,
    collect_image_paths,
    iter_loaded,
)
from marrowscope.inference.openvino_runtime import RuntimeMissingError
from marrowscope.inference.predictor import (
    ONNX_NAME,
    Predictor,
    PredictorError,
    default_metadata,
    default_onnx_path,
)
from marrowscope.metadata import BundleMetadata
from marrowscope.models.bundle import BundleError, load_bundle, pretrained_bundle, shipped_name
from marrowscope.models.registry import Classifier, build_model
from marrowscope.preprocess.cache import resolve_workers
from marrowscope.preprocess.ops import config_from_params, preprocess_steps
from marrowscope.reports.benchmark_report import BENCH_FORMATS, benchmark_markdown, benchmark_rows
from marrowscope.reports.tables import to_rich
from marrowscope.utils.image import ImageReadError, read_image
from marrowscope.utils.io import printable
from marrowscope.utils.runtime import cpu_has_native_bf16

__all__ = [
    "BACKENDS",
    "BenchReport",
    "BenchRow",
    "format_table",
    "load_target",
    "machine_info",
    "run_benchmark",
    "to_markdown",
]

BACKENDS = ("torch-fp32", "torch-bf16", "onnx", "int8")
"""Backends that can be benchmarked."""

MODES = ("network", "end-to-end")


@dataclass(frozen=True)
class BenchRow:
    """One measurement (``images_per_s`` is ``None`` when it was skipped; ``note`` says why)."""

    backend: str
    mode: str
    batch_size: int
    images_per_s: float | None
    median_ms: float | None
    p95_ms: float | None
    batches: int = 0
    note: str = ""


@dataclass
class BenchReport:
    """Everything a benchmark measured, and on what."""

    target: str
    arch: str
    input_size: int
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    preprocess_ms: dict[str, float] = field(default_factory=dict)
    """Mean milliseconds per image of each preprocessing step (one process)."""
    denoise: bool = False
    notes: list[str] = field(default_factory=list)
    int8: dict[str, Any] | None = None
    """The int8 model's record: its export's ``int8`` metadata (calibration, accuracy guard), or
    how the temporary copy was made."""

    def row(self, backend: str, mode: str, batch_size: int) -> BenchRow | None:
        """The row of one measurement, if it exists."""
        for r in self.rows:
            if (r.backend, r.mode, r.batch_size) == (backend, mode, batch_size):
                return r
        return None


# --------------------------------------------------------------------------------------- setup


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Date, CPU, cores, threads and library versions, for the report."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    try:
        import openvino

        ov_version = openvino.__version__.split("-")[0]
    except ImportError:
        ov_version = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": resolve_workers(0),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "openvino": ov_version,
        "marrowscope": __version__,
        "platform": platform.platform(),
    }


def load_target(
    target: str, *, num_classes: int = 8, input_size: int = 224
) -> tuple[Classifier, BundleMetadata, Path | None]:
    """A checkpoint bundle folder, a shipped model's name, or a model name built with random
    weights.

    Returns:
        ``(model, metadata, bundle folder or None)``.

    Raises:
        BundleError: a folder that is not a valid bundle, or a path (a name with a path
            separator) that does not exist.
        ModelError: an unknown model name.
    """
    name = shipped_name(target)
    path = pretrained_bundle(name) if name is not None else Path(target).expanduser()
    if path.exists():
        model, meta = load_bundle(path, device="cpu")
        return model, meta, path
    if any(sep in str(target) for sep in ("/", "\\", os.sep)):  # meant as a folder, not a name
        raise BundleError(
            f"no such checkpoint folder {target}; check the path (a bundle folder such as "
            "RUN_DIR/best), or give a model name for random weights (see `marrowscope models`)"
        )
    model = build_model(
        ModelConfig(name=target, pretrained=False), num_classes, input_size=input_size
    )
    model.eval()
    return model, default_metadata(model), None


def _time_loop(
    step: Callable[[], Any], *, warmup: int, min_time: float, min_iters: int
) -> list[float]:
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _row(backend: str, mode: str, bs: int, times: Sequence[float], images: int) -> BenchRow:
    ms = np.asarray(times) * 1000.0
    return BenchRow(
        backend=backend,
        mode=mode,
        batch_size=bs,
        images_per_s=images / max(float(np.sum(times)), 1e-12),
        median_ms=float(statistics.median(ms)),
        p95_ms=float(np.percentile(ms, 95)),
        batches=len(times),
    )


def _int8_predictor(
    target: str,
    model: Classifier,
    meta: BundleMetadata,
    files: Sequence[Path],
    tmp: Path,
    console: Console,
    report: BenchReport,
) -> Predictor | str:
    """The int8 export of ``target`` if it has one, else a temporary copy calibrated on (up to
    64 of) the benchmark's images; a string when OpenVINO is missing."""
    try:
        pred = Predictor.from_checkpoint(target, backend="int8", tta="none")
        report.int8 = {"export": str(pred.int8_export_), **(pred.bundle_metadata_.int8 or {})}
        report.int8.pop("calibration", None)  # the file list is long; the export keeps it
        return pred
    except RuntimeMissingError as e:
        return f"skipped: {e}"
    except (PredictorError, BundleError) as e:
        console.print(f"no usable int8 export ({e}); quantising a temporary copy ...")
    calib_files = [str(f) for f in files[:: max(1, len(files) // 64)][:64]]
    cfg = config_from_params(dict(meta.preprocess or {}))
    arrays = [a for a, _ in iter_loaded(calib_files, cfg, meta.input_size) if a is not None]
    try:
        quantized = quantize_openvino(model, np.stack(arrays))
    except RuntimeMissingError as e:
        return f"skipped: {e}"
    info = {
        "runtime": "openvino",
        "temporary": True,
        "calibration": {
            "source": f"{len(arrays)} images of the benchmark's folder",
            "n": len(arrays),
        },
        "guard": None,
    }
    save_int8(quantized, meta.replace(int8=info), tmp / "int8")
    report.int8 = info
    return Predictor.from_checkpoint(tmp / "int8", backend="int8", tta="none")


def _predictors(
    model: Classifier,
    meta: BundleMetadata,
    bundle: Path | None,
    backends: Sequence[str],
    tmp: Path,
    console: Console,
    *,
    target: str = "",
    files: Sequence[Path] = (),
    report: BenchReport | None = None,
) -> dict[str, Predictor | str]:
    """A predictor per backend, or a string saying why that backend is skipped."""
    out: dict[str, Predictor | str] = {}
    for b in backends:
        if b == "torch-fp32":
            out[b] = Predictor.from_model(model, meta, device="cpu", precision="fp32", tta="none")
        elif b == "torch-bf16":
            if not cpu_has_native_bf16():
                out[b] = "skipped: this CPU has no native bf16 (AVX512-BF16/AMX)"
            else:
                out[b] = Predictor.from_model(
                    model, meta, device="cpu", precision="bf16", tta="none"
                )
        elif b == "onnx":
            pred = None
            if bundle is not None and default_onnx_path(bundle).is_file():
                try:
                    pred = Predictor.from_checkpoint(bundle, backend="onnx", tta="none")
                except PredictorError as e:
                    console.print(f"[yellow]not using {default_onnx_path(bundle)}: {e}")
            if pred is None:
                console.print("exporting to a temporary ONNX file (with the parity check) ...")
                onnx_file = tmp / ONNX_NAME
                rep = export_onnx(model, onnx_file, meta)
                console.print(
                    f"  parity: max abs probability difference {rep.max_abs_diff:.2g} "
                    f"({rep.exporter} exporter, opset {rep.opset})"
                )
                pred = Predictor.from_checkpoint(onnx_file, backend="onnx", tta="none")
            out[b] = pred
        elif b == "int8":
            assert report is not None
            out[b] = _int8_predictor(target, model, meta, files, tmp, console, report)
        else:
            raise ValueError(f"unknown backend {b!r}; use {', '.join(BACKENDS)}")
    return out


def _preprocess_cost(
    files: Sequence[Path], params: dict[str, Any], n: int = 24
) -> tuple[dict[str, float], list[Path]]:
    """Median ms per image of each preprocessing step that the bundle uses, in one process, after
    one untimed image (the first decode also loads Pillow's plugins), over the first ``n``
    readable files; and the unreadable files met on the way (skipped, as ``predict`` does)."""
    chain = preprocess_steps(config_from_params(params))
    steps: dict[str, list[float]] = {"decode": [], **{name: [] for name, _ in chain}}
    unreadable: list[Path] = []
    warmed = False
    for p in files:
        if len(steps["decode"]) >= n:
            break
        t0 = time.perf_counter()
        try:
            img = read_image(p)
        except ImageReadError:
            unreadable.append(p)
            continue
        if not warmed:  # untimed: the first decode also loads Pillow's plugins
            warmed = True
            for _, step in chain:
                img = step(img)
            t0 = time.perf_counter()
            img = read_image(p)
        steps["decode"].append(time.perf_counter() - t0)
        for name, step in chain:
            t0 = time.perf_counter()
            img = step(img)
            steps[name].append(time.perf_counter() - t0)
    return {k: 1000.0 * float(np.median(v)) for k, v in steps.items() if v}, unreadable


# ----------------------------------------------------------------------------------------- run


def run_benchmark(
    target: str,
    *,
    batch_sizes: Sequence[int] = (1, 16, 64),
    backends: Sequence[str] = BACKENDS,
    images: str | os.PathLike[str] | None = None,
    warmup: int = 2,
    min_time: float = 2.0,
    min_iters: int = 3,
    end_to_end: bool = True,
    workers: int = 0,
    decode: str = "auto",
    num_classes: int = 8,
    input_size: int = 224,
    console: Console | None = None,
) -> BenchReport:
    """Measure every batch size x backend, network alone and end to end.

    Args:
        target: checkpoint bundle folder or a model name (random weights).
        batch_sizes: batch sizes to measure.
        backends: subset of :data:`BACKENDS`.
        images: folder (or ``builtin:bm-sample``) of image files for the end-to-end runs and
            the preprocessing cost (default: the bundled sample).
        warmup: untimed batches (network) or untimed files in batches (end to end) first.
        min_time: seconds each measurement runs at least.
        min_iters: batches each network measurement times at least.
        end_to_end: also measure decode -> preprocess -> infer.
        workers: decoding threads or processes for the end-to-end runs (0 = one per core).
        decode: where the end-to-end runs decode: ``auto``, ``processes`` or ``threads``.
        num_classes: classes of a model built from a name.
        input_size: input size of a model built from a name.
        console: where progress lines go.

    Raises:
        ValueError: an unknown backend or a batch size < 1.
        InputError: an image folder without images.
    """
    console = console or Console(stderr=True)
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; use {', '.join(BACKENDS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    check_decode(decode)
    model, meta, bundle = load_target(target, num_classes=num_classes, input_size=input_size)
    size = meta.input_size
    pre = meta.preprocess or {}
    img_root = resolve_root(images) if images is not None else SAMPLE_ROOT
    files = collect_image_paths([img_root])
    report = BenchReport(
        target=str(target),
        arch=meta.arch,
        input_size=size,
        machine=machine_info(),
        settings={
            "batch_sizes": list(batch_sizes),
            "backends": list(backends),
            "warmup": warmup,
            "min_time_s": min_time,
            "images": str(img_root),
            "n_images": len(files),
            "workers": resolve_workers(workers),
            "decode": decode,
            "random_weights": bundle is None,
        },
        denoise=bool(pre.get("denoise")),
    )
    report.preprocess_ms, unreadable = _preprocess_cost(files, dict(pre))
    if unreadable:  # left out of every measurement, as predict skips them
        bad = set(unreadable)
        files = [f for f in files if f not in bad]
        if not files:
            raise InputError(
                f"all {len(unreadable)} images of {img_root} are unreadable "
                f"({_names(unreadable)}); pass --images with a folder of readable cell images"
            )
    skipped = set(unreadable)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="marrowscope-bench-") as tmp:
        preds = _predictors(
            model,
            meta,
            bundle,
            backends,
            Path(tmp),
            console,
            target=target,
            files=files,
            report=report,
        )
        for backend, pred in preds.items():
            for bs in batch_sizes:
                if isinstance(pred, str):
                    for mode in MODES if end_to_end else MODES[:1]:
                        report.rows.append(BenchRow(backend, mode, bs, None, None, None, 0, pred))
                    continue
                pred.batch_size = bs
                console.print(f"{backend:>10}  batch {bs:>3}  network alone ...")
                x_np = rng.random((bs, 3, size, size), dtype=np.float32)
                x: Any = x_np
                step = pred.logits
                if pred.backend == "torch":  # pre-made tensors in the layout the model runs
                    x = torch.from_numpy(x_np)
                    if pred.precision_.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                elif pred.backend == "int8":  # uint8 NHWC, as predict hands it over
                    x = rng.integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
                    step = pred._logits_uint8
                    if pred.recheck_margin_ > 0 and files:
                        # its fp32 re-check depends on the cells: real ones, re-check included
                        x, step = _recheck_step(pred, files, bs, rng)
                times = _time_loop(
                    lambda f=step, xx=x: f(xx),
                    warmup=warmup,
                    min_time=min_time,
                    min_iters=min_iters,
                )
                report.rows.append(_row(backend, "network", bs, times, bs * len(times)))
                if pred.backend == "int8" and pred.recheck_margin_ > 0 and files:
                    report.notes.append(
                        f"int8, batch {bs}, network alone: on {len(x)} real cells of the image "
                        f"folder with the export's fp32 re-check, which re-checked "
                        f"{pred.recheck_share():.1%} of them (margin {pred.recheck_margin_:g})"
                    )
                    pred.cells_checked_ = pred.cells_rechecked_ = 0
                if end_to_end:
                    console.print(f"{backend:>10}  batch {bs:>3}  end to end ...")
                    report.rows.append(
                        _end_to_end(
                            pred,
                            backend,
                            files,
                            bs,
                            warmup=warmup,
                            min_time=min_time,
                            workers=workers,
                            decode=decode,
                            unreadable=skipped,
                        )
                    )
                    share = pred.recheck_share() if pred.recheck_margin_ > 0 else None
                    if share is not None:
                        report.notes.append(
                            f"int8, batch {bs}, end to end: the fp32 re-check took "
                            f"{share:.1%} of the {len(files)} cells"
                        )
                        pred.cells_checked_ = pred.cells_rechecked_ = 0
    if skipped:
        ordered = sorted(skipped)
        note = (
            f"skipped {len(ordered)} unreadable image(s) of {img_root} ({_names(ordered)}); "
            "the end-to-end rates count readable images only"
        )
        report.notes.append(note)
        report.settings["n_unreadable"] = len(ordered)
    _add_notes(report, batch_sizes)
    return report


def _names(paths: Sequence[Path], show: int = 3) -> str:
    """The first ``show`` file names, and how many more."""
    more = f" and {len(paths) - show} more" if len(paths) > show else ""
    return ", ".join(printable(Path(p).name) for p in paths[:show]) + more


def _recheck_step(
    pred: Predictor, files: Sequence[Path], bs: int, rng: np.random.Generator
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """For an int8 export with an fp32 re-check: up to ``max(256, 4 * bs)`` real cells drawn from
    ``files`` (decoded and preprocessed once) and a step that predicts the next ``bs`` of them
    (int8, then fp32 for the uncertain ones; one view)."""
    pick = rng.choice(len(files), size=min(len(files), max(256, 4 * bs)), replace=False)
    size = pred.input_size
    loaded = iter_loaded([files[i] for i in sorted(pick)], pred.preprocess_config_, size)
    cells = np.stack([a for a, _ in loaded if a is not None])
    cursor = [0]

    def step(pool: np.ndarray) -> np.ndarray:
        start = cursor[0]
        idx = np.arange(start, start + bs) % len(pool)
        cursor[0] = (start + bs) % len(pool)
        return pred._probs_uint8(pool[idx])

    pred.cells_checked_ = pred.cells_rechecked_ = 0
    return cells, step


def _end_to_end(
    pred: Predictor,
    backend: str,
    files: Sequence[Path],
    bs: int,
    *,
    warmup: int,
    min_time: float,
    workers: int,
    decode: str,
    unreadable: set[Path] | None = None,
) -> BenchRow:
    """Whole passes over ``files`` (decode -> preprocess -> infer) until ``min_time``.

    Latency is the gap between consecutive batches as the caller sees them; throughput is
    readable images over the whole wall time (each pass starts its worker pool again, as
    ``predict`` does). Unreadable files are skipped, as ``predict`` does, and added to
    ``unreadable``.
    """
    if warmup > 0:  # the network is warm already; one batch warms the decoding path
        for _ in pred.predict_path_batches(
            files[:bs], workers=workers, progress=False, decode=decode
        ):
            pass
    gaps: list[float] = []
    n_images = 0
    start = time.perf_counter()
    while not gaps or time.perf_counter() - start < min_time:
        t_prev = time.perf_counter()
        for batch in pred.predict_path_batches(
            files, workers=workers, progress=False, decode=decode
        ):
            now = time.perf_counter()
            gaps.append(now - t_prev)
            t_prev = now
            n_images += sum(r.probs is not None for r in batch)
            if unreadable is not None:
                unreadable.update(Path(r.path) for r in batch if r.probs is None)
    total = time.perf_counter() - start
    return replace(_row(backend, "end-to-end", bs, gaps, n_images), images_per_s=n_images / total)


def _add_notes(report: BenchReport, batch_sizes: Sequence[int]) -> None:
    bs = max(batch_sizes)
    base = report.row("torch-fp32", "network", bs)
    net = [r for r in report.rows if r.mode == "network" and r.batch_size == bs and r.images_per_s]
    if base and base.images_per_s and net:
        best = max(net, key=lambda r: r.images_per_s or 0.0)
        report.notes.append(
            f"network alone, batch {bs}: best backend {best.backend} = "
            f"{best.images_per_s / base.images_per_s:.1f}x torch fp32 eager "  # type: ignore[operator]
            f"({best.images_per_s:.1f} vs {base.images_per_s:.1f} images/s)"
        )
    for r in report.rows:
        if r.mode != "end-to-end" or r.batch_size != bs or not r.images_per_s:
            continue
        n = report.row(r.backend, "network", bs)
        if n and n.images_per_s:
            report.notes.append(
                f"{r.backend}, batch {bs}: end to end = {100 * r.images_per_s / n.images_per_s:.0f}% "
                "of the network-alone rate"
            )
    _int8_note(report)
    pre = report.preprocess_ms
    if pre:
        total_pre = sum(pre.values())
        if "denoise" in pre:
            e2e = [
                r
                for r in report.rows
                if r.mode == "end-to-end" and r.batch_size == bs and r.images_per_s
            ]
            best_ms = 1000.0 / max(r.images_per_s for r in e2e) if e2e else None  # type: ignore[type-var]
            share = 100.0 * pre["denoise"] / total_pre
            line = (
                f"NL-means denoising (the bundle asks for it) costs {pre['denoise']:.1f} ms of CPU "
                f"time per image = {share:.0f}% of the preprocessing ({total_pre:.1f} ms/image)"
            )
            if best_ms:
                line += f"; the best end-to-end rate is {best_ms:.1f} ms/image (all cores)"
            report.notes.append(line)
        else:
            report.notes.append(
                f"preprocessing (decode + {', '.join(k for k in pre if k != 'decode') or 'nothing'}"
                f") costs {total_pre:.2f} ms of CPU time per image; the bundle does not denoise"
            )


def _int8_note(report: BenchReport) -> None:
    """A line on where the int8 model came from and what its accuracy guard measured."""
    info = report.int8
    if not info:
        return
    if info.get("temporary"):
        report.notes.append(
            f"int8: a temporary copy quantised for this benchmark ({info['calibration']['source']}"
            "), no accuracy guard: speed only; `marrowscope export CK --format int8` makes the "
            "checked one"
        )
        return
    g = info.get("guard") or {}
    if not g:
        report.notes.append(f"int8: export {info.get('export')} (no guard recorded)")
        return
    lo, hi = g["macro_f1_drop_ci95"]
    verdict = "passed" if g.get("passed") else "FAILED (written with --force)"
    report.notes.append(
        f"int8 export {info.get('export')}: accuracy guard {verdict} on {g['n']} cells of the "
        f"{g.get('data', '?')} (test-time augmentation {g.get('tta', '?')}): top-1 agreement "
        f"with fp32 {g['agreement']:.4f}, macro-F1 {g['macro_f1_reference']:.4f} -> "
        f"{g['macro_f1_candidate']:.4f} (drop {g['macro_f1_drop']:+.4f}, paired 95% CI "
        f"[{lo:+.4f}, {hi:+.4f}]), max probability difference {g['max_prob_diff']:.4f}"
        + _recheck_words(info.get("recheck"), g.get("rechecked_share"))
    )


def _recheck_words(recheck: dict[str, Any] | None, guard_share: float | None) -> str:
    if not recheck or not recheck.get("margin"):
        return "; no fp32 re-check"
    share = f", {guard_share:.1%} of the guard cells" if guard_share is not None else ""
    return (
        f"; with its fp32 re-check of cells whose top-two int8 probabilities are closer than "
        f"{recheck['margin']:g}{share}, which every int8 row includes (so its network-alone "
        "rows are timed on real cells of the image folder, not on random input)"
    )


# ------------------------------------------------------------------------------------- output


def format_table(report: BenchReport) -> RichTable:
    """A rich table of the measurements."""
    return to_rich(
        benchmark_rows(asdict(report)),
        title=f"{report.arch} ({report.input_size} px) on {report.machine['cpu']}, "
        f"{report.machine['torch_threads']} threads",
        colfmt=BENCH_FORMATS,
        wrap=("note",),
    )


def to_markdown(report: BenchReport) -> str:
    """The report as Markdown (:func:`marrowscope.reports.benchmark_report.benchmark_markdown`)."""
    return benchmark_markdown(asdict(report))

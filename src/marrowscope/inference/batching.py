"""Batch input and output for prediction: which files, decoded where, written how.

* :func:`collect_inputs` turns command-line inputs (files, folders, globs) into image paths, and
  names the files found there that were left out (not an image by extension);
  :func:`collect_image_paths` returns the paths alone.
* :func:`iter_loaded` decodes and preprocesses paths in threads or worker processes, a bounded
  number of chunks ahead of the consumer, so that decoding overlaps with inference; results come
  back in input order and a file that cannot be used becomes an error message, never an exception.
* :func:`prediction_records` and :func:`write_predictions` build and write the prediction table
  (CSV, JSON or Parquet, chosen by the file extension).

No torch here: worker processes only run numpy, Pillow and OpenCV code.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import glob
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marrowscope.config import PreprocessConfig
from marrowscope.data import DataError
from marrowscope.preprocess.cache import process_context, resolve_workers
from marrowscope.preprocess.ops import apply_preprocess, resize
from marrowscope.utils.image import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    decode_image,
    is_hidden,
    is_image_file,
    list_image_files,
    read_image,
)
from marrowscope.utils.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    printable,
    printable_data,
)

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "OUTPUT_FORMATS",
    "GRAYSCALE_WARNING",
    "CollectedInputs",
    "InputError",
    "skipped_summary",
    "DECODE_MODES",
    "Loaded",
    "check_decode",
    "collect_image_paths",
    "collect_inputs",
    "iter_loaded",
    "load_and_preprocess",
    "output_format",
    "prediction_records",
    "prediction_schema",
    "write_predictions",
]

OUTPUT_FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
"""Prediction file extension -> format."""

DECODE_MODES = ("auto", "processes", "threads")
"""Where :func:`iter_loaded` decodes.

* ``processes``: worker processes; a decoder that crashes the interpreter (a segfault in a C
  library on a malformed file) costs only its file.
* ``threads``: threads of this process (Pillow and OpenCV release the GIL while they decode). No
  copy of each image between processes and no context switch to another process, so faster
  next to a fast network (docs/benchmarks.md), but a crashing decoder ends the run.
* ``auto`` (the default): JPEG and PNG files (recognised by their first bytes, whatever their
  name) in threads, anything else in worker processes. Pillow decodes those two with
  libjpeg-turbo and zlib, the most used and most fuzzed image decoders there are; the rarer
  formats (TIFF, BMP, WebP, ...) keep the crash isolation (a chunk of files holding one of them
  goes to a worker process whole). Missing and empty files, on which no decoder runs, stay in
  threads.

Worker processes limit OpenCV to one thread each; threads leave OpenCV's own thread count alone
(it is process-wide), which matters only for a bundle that denoises."""

_THREAD_SAFE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
"""First bytes of the files ``auto`` decodes in threads: JPEG (and JPEG-based MPO) and PNG."""

_GLOB_CHARS = frozenset("*?[")

Loaded = tuple[np.ndarray | None, str | None]
"""``(preprocessed RGB HWC uint8 array, None)`` or ``(None, error message naming the file)``."""


class InputError(DataError):
    """Inputs that match no image, or an output file that cannot be written; names the fix."""


GRAYSCALE_WARNING = (
    "grayscale image: the model was trained on stained colour images; this prediction is unreliable"
)
"""The ``warning`` of a prediction row whose image carries no colour."""


# ------------------------------------------------------------------------------ input collection


@dataclass(frozen=True)
class CollectedInputs:
    """What :func:`collect_inputs` found.

    Attributes:
        paths: the image files, in input order.
        skipped: the other (not hidden) files under the folders and among the pattern matches,
            left out because their extension is not one of
            :data:`~marrowscope.utils.image.IMAGE_EXTENSIONS` (in any case: ``.JPG`` is an
            image); sorted within each input.
    """

    paths: list[Path]
    skipped: list[Path]

    def skipped_summary(self, shown: int = 3) -> str | None:
        """One line naming how many files were left out and a few of them (``None``: none)."""
        return skipped_summary([p.name for p in self.skipped], shown)


def skipped_summary(names: Sequence[str], shown: int = 3) -> str | None:
    """One line saying that the files ``names`` (base names, in order) were left out of an input
    listing because they are not images by extension, naming a few (``None``: none left out)."""
    if not names:
        return None
    listed = ", ".join(printable(n) for n in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (
        f"skipped {len(names)} file(s) that are not images by their extension "
        f"({listed}{more}); images are {' '.join(IMAGE_EXTENSIONS)} in any case; name a "
        "file explicitly to try it anyway, or convert it to PNG or JPEG"
    )


def collect_image_paths(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The image files of :func:`collect_inputs` (the skipped files are not reported)."""
    return collect_inputs(inputs).paths


def collect_inputs(inputs: Iterable[str | os.PathLike[str]]) -> CollectedInputs:
    """Expand files, folders (recursively) and glob patterns into a list of image files, and
    list the files found there that are not images by extension.

    A file named explicitly is always kept (if it is not an image, its prediction row carries the
    error). Folders and glob matches contribute files with one of
    :data:`~marrowscope.utils.image.IMAGE_EXTENSIONS` (case-insensitive) only; their other
    files are returned as ``skipped``. Order: the order of ``inputs``, sorted within each folder
    or pattern; duplicates are dropped.

    Raises:
        InputError: an input that is neither a file, a folder nor a pattern matching something;
            or no image at all.
    """
    out: dict[Path, None] = {}
    skipped: dict[Path, None] = {}
    given = [str(i) for i in inputs]
    for text in given:
        p = Path(text).expanduser()
        if p.is_file():
            out[p] = None
        elif p.is_dir():
            found, others = list_image_files(p)
            if not found:
                seen = (
                    f"; found {len(others)} other file(s), e.g. {others[0].name}" if others else ""
                )
                raise InputError(
                    f"{p}: no image files in this folder or its sub-folders (looked for "
                    f"{', '.join(IMAGE_EXTENSIONS)} in any case{seen}); check the path"
                )
            out.update(dict.fromkeys(found))
            skipped.update(dict.fromkeys(others))
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            found = []
            for m in map(Path, matches):
                if is_hidden(m.name) or "__MACOSX" in m.parts:
                    continue  # as a folder listing would
                if m.is_dir():
                    images, others = list_image_files(m)
                    found.extend(images)
                    skipped.update(dict.fromkeys(others))
                elif m.is_file() and is_image_file(m):
                    found.append(m)
                elif m.is_file():
                    skipped[m] = None
            if not found:
                raise InputError(
                    f"the pattern {text!r} matches no image file; check it (quote it so the "
                    "shell does not expand it, use ** for sub-folders)"
                )
            out.update(dict.fromkeys(found))
        else:
            raise InputError(f"{text}: no such file or folder; check the path")
    if not out:
        raise InputError("no input given: pass image files, folders or glob patterns")
    return CollectedInputs(paths=list(out), skipped=[q for q in skipped if q not in out])


# ------------------------------------------------------------------------ decode + preprocess


def load_and_preprocess(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig,
    size: int,
    *,
    read: Callable[[str], bytes] | None = None,
) -> Loaded:
    """Read one file and apply the bundle's preprocessing; never raises for a bad file.

    Args:
        path: image file.
        cfg: preprocessing parameters (from the checkpoint bundle).
        size: the model's input size; an image not at ``size`` after ``cfg`` is resized.
        read: how to get the file's bytes when it is not a local file (e.g. from object storage
            through ``pyarrow.fs``); it raises :class:`ImageReadError` for a file it cannot read.

    Returns:
        ``(array, None)`` or ``(None, message)`` where the message names the file.
    """
    try:
        rgb = read_image(path) if read is None else decode_image(read(str(path)), str(path))
        arr = apply_preprocess(rgb, cfg)
        if arr.shape[:2] != (size, size):
            arr = resize(arr, size)
        return arr, None
    except ImageReadError as e:
        return None, str(e)
    except (ValueError, MemoryError) as e:
        return None, f"{path}: cannot preprocess ({e})"
    except Exception as e:  # a decoder bug must not stop a run of thousands of files
        return None, f"{path}: unexpected {type(e).__name__} while reading ({e})"


def _load_chunk(paths: Sequence[str], cfg: PreprocessConfig, size: int) -> list[Loaded]:
    return [load_and_preprocess(p, cfg, size) for p in paths]


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the processes
    except ImportError:  # pragma: no cover
        pass


class _Pool:
    """A process (or thread) pool that can be rebuilt after a worker died."""

    def __init__(self, workers: int, kind: str = "processes") -> None:
        self.workers, self.kind = workers, kind
        self.executor = self._new()

    def _new(self) -> cf.Executor:
        if self.kind == "threads":
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="marrowscope-decode")
        return cf.ProcessPoolExecutor(
            self.workers, mp_context=process_context(), initializer=_init_worker
        )

    def rebuild(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._new()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def check_decode(decode: str) -> None:
    """Raises ValueError naming the accepted values when ``decode`` is not in
    :data:`DECODE_MODES`."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")


def _thread_safe(path: str) -> bool:
    """Whether ``decode="auto"`` decodes ``path`` in a thread: it starts like a JPEG or PNG file,
    or no decoder will run on it (it cannot be read, or it is empty: the error says so)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return True
    return not head or head.startswith(_THREAD_SAFE_SIGNATURES)


class _Pools:
    """The pools of one :func:`iter_loaded` run: threads and/or worker processes, made on first
    use, and which of them decodes a chunk of files."""

    def __init__(self, workers: int, decode: str) -> None:
        self.workers, self.decode = workers, decode
        self._pools: dict[str, _Pool] = {}

    def kind_for(self, chunk: Sequence[str]) -> str:
        """``threads`` or ``processes``; with ``auto``, a chunk holding one file of another
        format than JPEG or PNG goes to a worker process whole."""
        if self.decode != "auto":
            return self.decode
        return "threads" if all(_thread_safe(p) for p in chunk) else "processes"

    def get(self, kind: str, busy: Iterable[cf.Future[list[Loaded]]] = ()) -> _Pool:
        """The ``kind`` pool. Worker processes are forked once ``busy`` (the futures in flight)
        are done, so that no decoding thread is inside a C library when this process forks."""
        pool = self._pools.get(kind)
        if pool is None:
            if kind == "processes" and "threads" in self._pools:
                cf.wait(list(busy))
            pool = self._pools[kind] = _Pool(self.workers, kind)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def _isolate(pool: _Pool, paths: Sequence[str], cfg: PreprocessConfig, size: int) -> list[Loaded]:
    """Decode ``paths`` one at a time with nothing else in flight: a crash names its file."""
    out: list[Loaded] = []
    for p in paths:
        try:
            out.extend(pool.executor.submit(_load_chunk, [p], cfg, size).result())
        except BrokenProcessPool:
            pool.rebuild()
            out.append(
                (
                    None,
                    f"{p}: the image decoder crashed on this file (worker process died); "
                    "remove or re-export it",
                )
            )
    return out


def iter_loaded(
    paths: Sequence[str | os.PathLike[str]],
    cfg: PreprocessConfig,
    size: int,
    *,
    workers: int = 0,
    chunk_size: int = 16,
    prefetch: int | None = None,
    decode: str = "auto",
) -> Iterator[Loaded]:
    """Decode + preprocess ``paths`` in threads and/or worker processes (:data:`DECODE_MODES`);
    yield results in input order.

    At most ``prefetch`` chunks are in flight, so memory stays bounded however many files there
    are, and the workers run ahead while the consumer (the network) works. A worker process that
    dies (a crashing decoder) is replaced; the file responsible gets an error, the others are
    redone. A file decoded in a thread has no such protection.

    Args:
        paths: image files.
        cfg: preprocessing parameters.
        size: model input size (see :func:`load_and_preprocess`).
        workers: decoding threads (and worker processes); 0 = one per CPU core this process may
            use.
        chunk_size: files per task sent to a worker (>= 1).
        prefetch: chunks in flight (default ``2 * workers + 2``).
        decode: ``auto`` (JPEG and PNG in threads, other formats in processes), ``processes``
            or ``threads`` (:data:`DECODE_MODES`).

    Raises:
        ValueError: ``chunk_size`` below 1 or an unknown ``decode``.

    Yields:
        ``(array, None)`` or ``(None, message)`` per path, in order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_decode(decode)
    names = [str(p) for p in paths]
    if not names:
        return
    n_workers = min(resolve_workers(workers), max(1, -(-len(names) // chunk_size)))
    depth = max(1, prefetch if prefetch is not None else 2 * n_workers + 2)
    chunks = deque(names[i : i + chunk_size] for i in range(0, len(names), chunk_size))
    pools = _Pools(n_workers, decode)
    inflight: deque[tuple[list[str], cf.Future[list[Loaded]]]] = deque()
    try:
        while chunks or inflight:
            try:
                while chunks and len(inflight) < depth:
                    pool = pools.get(pools.kind_for(chunks[0]), (f for _, f in inflight))
                    fut = pool.executor.submit(_load_chunk, chunks[0], cfg, size)
                    inflight.append((chunks.popleft(), fut))
                results = inflight[0][1].result()
            except BrokenProcessPool:
                # A worker died (found here or by submit, while the consumer was busy). Keep
                # every chunk that finished, redo the dead pool's others one file at a time to
                # find the culprit; the threads' chunks finish before the pool is forked again.
                redo = list(inflight)
                inflight.clear()
                cf.wait([f for _, f in redo])
                procs = pools.get("processes")
                procs.rebuild()
                procs.executor.submit(int).result()  # fork the new workers now, nothing in flight
                for c, f in redo:
                    if f.exception() is None:
                        yield from f.result()
                    else:
                        yield from _isolate(procs, c, cfg, size)
                continue
            inflight.popleft()
            yield from results
    finally:
        for _, fut in inflight:
            fut.cancel()
        pools.close()


# ---------------------------------------------------------------------------------------- output


def output_format(path: str | os.PathLike[str]) -> str:
    """``csv``, ``json`` or ``parquet`` from the file extension; checks pyarrow for Parquet.

    Raises:
        InputError: another extension, or Parquet without pyarrow installed.
    """
    ext = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(ext)
    if fmt is None:
        raise InputError(
            f"{path}: unknown output format {ext or '(no extension)'!r}; end the file name in "
            ".csv, .json or .parquet"
        )
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(
                f"{path}: writing Parquet needs pyarrow: pip install pyarrow (or write .csv/.json)"
            ) from None
    return fmt


def prediction_records(
    results: Iterable[tuple[str, np.ndarray | None, str | None]],
    classes: Sequence[str],
    *,
    topk: int = 3,
    extra: Mapping[str, Any] | None = None,
    warnings: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """One flat record per image: path, predicted, confidence, top-k, every class, extra,
    warning, error.

    Args:
        results: ``(path, probabilities or None, error or None)`` per image.
        classes: class names in index order.
        topk: how many ranked classes (clamped to the number of classes).
        extra: constant columns added to every record (e.g. model name and version).
        warnings: per image, why its prediction is doubtful (e.g. :data:`GRAYSCALE_WARNING`),
            or ``None``/``""``; aligned with ``results``.

    Returns:
        Records with keys ``path, predicted, confidence, top1, p_top1, ..., p_<CLASS>...,
        <extra keys>, warning, error``; ``None`` for values that an unreadable image lacks,
        and ``""`` for the warning and error of an image that has none.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    k = min(topk, len(classes))
    extra = dict(extra or {})
    names = np.asarray(list(classes), dtype=object)
    results = list(results)
    notes = [None] * len(results) if warnings is None else list(warnings)
    if len(notes) != len(results):
        raise ValueError(f"{len(notes)} warnings for {len(results)} results; they must match")
    out = []
    for (path, probs, error), note in zip(results, notes, strict=True):
        rec: dict[str, Any] = {"path": path}
        if probs is None:
            rec.update(predicted=None, confidence=None)
            for j in range(1, k + 1):
                rec[f"top{j}"] = None
                rec[f"p_top{j}"] = None
            rec.update({f"p_{c}": None for c in classes})
        else:
            order = np.argsort(-probs, kind="stable")[:k]
            rec.update(predicted=str(names[order[0]]), confidence=float(probs[order[0]]))
            for j, idx in enumerate(order, start=1):
                rec[f"top{j}"] = str(names[idx])
                rec[f"p_top{j}"] = float(probs[idx])
            rec.update({f"p_{c}": float(v) for c, v in zip(classes, probs, strict=True)})
        rec.update(extra)
        rec["warning"] = note or ""
        rec["error"] = error or ""
        out.append(rec)
    return out


def prediction_schema(columns: Sequence[str]) -> pa.Schema:
    """The Parquet schema of prediction records with these columns (the keys of a
    :func:`prediction_records` record, in order): ``confidence`` and the ``p_*`` probabilities
    are float64, every other column a string (null for what an unreadable image lacks), so that
    every file of a prediction run, and a run with only unreadable images, has the same types."""
    import pyarrow as pa

    return pa.schema(
        [
            (c, pa.float64() if c == "confidence" or c.startswith("p_") else pa.string())
            for c in columns
        ]
    )


def _csv_text(records: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    if not records:
        return ""
    w = csv.DictWriter(buf, fieldnames=list(records[0]))
    w.writeheader()
    for r in records:
        w.writerow(
            {
                key: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v)
                for key, v in r.items()
            }
        )
    return buf.getvalue()


def write_predictions(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> str:
    """Write records atomically as CSV, JSON (a list of objects) or Parquet, by extension.

    Returns:
        The format written.

    Raises:
        InputError: unknown extension, or Parquet without pyarrow.
    """
    out = Path(path)
    fmt = output_format(out)
    if fmt == "csv":
        atomic_write_text(out, _csv_text(records), escape=True)
    elif fmt == "json":
        atomic_write_json(out, list(records), escape=True)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [printable_data(dict(r)) for r in records]  # names that are not UTF-8, escaped
        schema = prediction_schema(list(rows[0])) if rows else None
        table = pa.Table.from_pylist(rows, schema=schema)
        atomic_write(out, lambda tmp: pq.write_table(table, str(tmp)))
    return fmt

"""On-disk cache of preprocessed images, filled by parallel worker processes.

Each image is preprocessed once per parameter set: the entry lives at
``<root>/preprocess/<params_key>-d<DECODE_VERSION>/<sha[:2]>/<sha>.npy`` where ``sha`` is the
SHA-256 of the image file's bytes. Changing a pixel-changing parameter changes ``params_key`` (a fresh folder); editing
or replacing an image changes ``sha``; the same bytes under two paths share one entry. Entries are
written to a temporary file and renamed into place, and an entry that does not load cleanly with
the expected shape and dtype is recomputed, so a half-written file is never trusted.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from marrowscope.config import PreprocessConfig
from marrowscope.preprocess.ops import apply_preprocess, params_key, preprocess_params
from marrowscope.utils.image import ImageReadError, decode_image, read_file_bytes
from marrowscope.utils.io import atomic_write, atomic_write_json
from marrowscope.utils.progress import make_progress

CACHE_ENV = "MARROWSCOPE_CACHE"


def default_cache_root() -> Path:
    """``$MARROWSCOPE_CACHE`` if set, else ``~/.cache/marrowscope``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/marrowscope").expanduser()


def process_context() -> multiprocessing.context.BaseContext:
    """Start method for worker pools: ``fork`` on Linux, else the platform default.

    Forked workers need no importable ``__main__`` (so the API works from ``python -`` or an
    unguarded script), start fast, and only run numpy/OpenCV/Pillow code, never torch or CUDA.
    """
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        _quiet_opencv_at_fork()
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


_OPENCV_FORK_GUARD: list[int] = []


def _quiet_opencv_at_fork() -> None:
    """Stop OpenCV's thread pool around every fork of this process (registered once).

    OpenCV's pool is not fork-safe: a child forked while the parent's pool threads exist
    inherits the pool's state without its threads, and its first ``cv2.setNumThreads`` or
    parallel call can wait forever (seen after the field detector ran OpenCV in the parent).
    Before a fork the parent goes down to one thread, which joins the pool; afterwards it gets
    its thread count back.
    """
    if _OPENCV_FORK_GUARD:
        return
    try:
        import cv2
    except ImportError:  # pragma: no cover - a hard dependency
        return
    saved: list[int] = []

    def before() -> None:
        saved.append(cv2.getNumThreads())
        cv2.setNumThreads(1)

    def after_in_parent() -> None:
        if saved:
            cv2.setNumThreads(saved.pop())

    os.register_at_fork(before=before, after_in_parent=after_in_parent)
    _OPENCV_FORK_GUARD.append(1)


def resolve_workers(workers: int) -> int:
    """``0`` -> the CPUs this process may use; a negative number is an error."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {workers}")
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


DECODE_VERSION = 2
"""How files are decoded into the pixels preprocessing starts from; entries made by another
decoder live in another folder. 2: EXIF orientation applied (entries of version 1 hold the
stored, unrotated pixels of a rotated camera JPEG). It is not part of the bundle's recorded
preprocessing (:data:`~marrowscope.preprocess.ops.PREPROCESS_VERSION`): a model trained on
pixels of either decoder stays usable."""


def entries_key(cfg: PreprocessConfig) -> str:
    """The folder name of ``cfg``'s cache entries: :func:`params_key` and the decoder."""
    return f"{params_key(cfg)}-d{DECODE_VERSION}"


def _file_sha256(path: Path) -> tuple[str, bytes]:
    data = read_file_bytes(path)
    return hashlib.sha256(data).hexdigest(), data


class PreprocessCache:
    """Preprocessed images on disk, keyed by image content and preprocessing parameters.

    Args:
        cfg: preprocessing parameters; ``cfg.cache_dir`` overrides :func:`default_cache_root`.

    Attributes:
        cfg: the parameters.
        root: the cache root.
        dir: ``root / "preprocess" / entries_key(cfg)``: this parameter set's entries.
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()
        self.dir = self.root / "preprocess" / entries_key(cfg)
        self._params_written = False

    def __repr__(self) -> str:
        return f"PreprocessCache(dir={str(self.dir)!r})"

    def entry_path(self, sha: str) -> Path:
        """Cache file of the image whose bytes hash to ``sha``."""
        return self.dir / sha[:2] / f"{sha}.npy"

    # ------------------------------------------------------------------ single images

    def _load_entry(self, sha: str) -> np.ndarray | None:
        """The cached array if the entry exists and is valid, else None."""
        path = self.entry_path(sha)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None  # truncated / garbage: recompute
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3:
            return None
        if arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            return None
        if self.cfg.resize and arr.shape[:2] != (self.cfg.size, self.cfg.size):
            return None
        return arr

    def _save_entry(self, sha: str, arr: np.ndarray) -> None:
        if not self._params_written:
            params_file = self.dir / "params.json"
            if not params_file.exists():
                atomic_write_json(params_file, preprocess_params(self.cfg))
            self._params_written = True

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save must not append ".npy"
                np.save(f, arr, allow_pickle=False)

        # one write per image into shard folders of hundreds of entries: no folder listing
        # for a killed writer's temporary file each time (a killed fill leaves at most one
        # small one per worker)
        atomic_write(self.entry_path(sha), write, sweep=False)

    def _compute(self, sha: str, data: bytes, path: Path) -> np.ndarray:
        arr = apply_preprocess(decode_image(data, path), self.cfg)
        self._save_entry(sha, arr)
        return arr

    def get(self, path: str | Path) -> np.ndarray:
        """The preprocessed image of ``path`` (RGB HWC uint8), from the cache or computed now.

        Raises:
            ImageReadError: the file is missing, unreadable, or not a valid image.
        """
        p = Path(path)
        sha, data = _file_sha256(p)
        arr = self._load_entry(sha)
        if arr is None:
            arr = self._compute(sha, data, p)
        return arr

    # ------------------------------------------------------------------ many images

    def load_many(
        self,
        paths: Sequence[str | Path],
        *,
        workers: int = 0,
        progress: bool = True,
        description: str = "Preprocessing",
    ) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
        """Preprocessed images of ``paths``, in order; bad files become failures, never raise.

        Cached entries are loaded; the rest is computed in a process pool (in chunks), or in this
        process when ``workers == 1`` or only one image needs work.

        Args:
            paths: image files.
            workers: worker processes; 0 = one per CPU core, 1 = no pool.
            progress: show a rich progress bar (rate and ETA).
            description: label of the progress bar.

        Returns:
            ``(arrays, failures)``: ``arrays[i]`` is the image of ``paths[i]`` or ``None`` when it
            failed; ``failures`` lists ``(path, message)`` with the message naming the file.
        """
        n_workers = resolve_workers(workers)
        arrays: list[np.ndarray | None] = [None] * len(paths)
        failed: dict[int, str] = {}
        pending: dict[str, list[int]] = {}  # sha -> indices of paths with these bytes

        with make_progress(enabled=progress) as bar:
            task = bar.add_task(description, total=len(paths))
            for i, path in enumerate(paths):
                try:
                    sha, _ = _file_sha256(Path(path))
                except ImageReadError as e:
                    failed[i] = str(e)
                    bar.advance(task)
                    continue
                if sha in pending:
                    pending[sha].append(i)
                    continue
                arr = self._load_entry(sha)
                if arr is None:
                    pending[sha] = [i]
                else:
                    arrays[i] = arr
                    bar.advance(task)

            jobs = [(sha, str(paths[idx[0]])) for sha, idx in pending.items()]
            for sha, arr, error in self._compute_many(jobs, n_workers):
                for i in pending[sha]:
                    if arr is None:
                        failed[i] = error or f"{paths[i]}: could not be preprocessed"
                    else:
                        arrays[i] = arr
                bar.advance(task, len(pending[sha]))

        failures = [(str(paths[i]), failed[i]) for i in sorted(failed)]
        return arrays, failures

    def _compute_many(
        self, jobs: list[tuple[str, str]], n_workers: int
    ) -> Iterable[tuple[str, np.ndarray | None, str | None]]:
        """Yield ``(sha, array or None, error or None)`` for each ``(sha, path)`` job."""
        if not jobs:
            return
        n_workers = min(n_workers, len(jobs))
        if n_workers <= 1:
            for sha, path in jobs:
                yield _compute_one(self, sha, path)
            return
        chunk = max(1, min(64, len(jobs) // (n_workers * 4)))
        chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
        with cf.ProcessPoolExecutor(
            max_workers=n_workers, mp_context=process_context(), initializer=_init_worker
        ) as pool:
            futures = [pool.submit(_compute_chunk, self.cfg, self.root, c) for c in chunks]
            try:
                for fut in cf.as_completed(futures):
                    yield from fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


def _compute_one(
    cache: PreprocessCache, sha: str, path: str
) -> tuple[str, np.ndarray | None, str | None]:
    p = Path(path)
    try:
        sha_now, data = _file_sha256(p)
        arr = cache._load_entry(sha_now)  # another process may have filled it meanwhile
        if arr is None:
            arr = cache._compute(sha_now, data, p)
    except ImageReadError as e:
        return sha, None, str(e)
    return sha, arr, None


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _compute_chunk(
    cfg: PreprocessConfig, root: Path, jobs: list[tuple[str, str]]
) -> list[tuple[str, np.ndarray | None, str | None]]:
    cache = PreprocessCache(cfg)
    cache.root = root
    cache.dir = root / "preprocess" / entries_key(cfg)
    return [_compute_one(cache, sha, path) for sha, path in jobs]

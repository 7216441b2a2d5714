"""Batch prediction on a Ray cluster (Ray Data): many images, many machines, the same numbers.

The pipeline (``marrowscope predict CK INPUTS --engine ray --out preds.parquet/``)::

    image paths --(Ray tasks)--> read, decode, preprocess with the bundle's own parameters
      (:func:`~marrowscope.inference.batching.load_and_preprocess`, as ``--engine local``)
    --(actor pool, ``ActorPoolStrategy``)--> one :class:`~marrowscope.inference.Predictor` per
      actor, loaded once from the bundle shipped through the object store
    --> a Parquet folder: one row per image with the columns of ``--engine local``
      (:func:`~marrowscope.inference.batching.prediction_records`).

Inputs are image files, folders (recursive), glob patterns, manifests (a CSV or Parquet file with
a ``path`` column; relative paths are relative to the manifest), and object-storage URIs that
``pyarrow.fs`` understands (``s3://bucket/prefix/``, ``gs://...``, ``hdfs://...``,
``file:///...``). Local paths must be readable at the same path on every node of the cluster
(a shared file system); object storage needs no sharing. A file that cannot be read or decoded
becomes a row with its ``error`` set; it never fails the job.

Rows come in no particular order (Ray runs the batches in parallel): sort by ``path``.

Ray is an optional dependency (``pip install 'marrowscope[ray]'``); nothing here imports it at
module level, so the rest of marrowscope works without it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope import __version__
from marrowscope.config import PreprocessConfig
from marrowscope.inference.batching import (
    GRAYSCALE_WARNING,
    InputError,
    collect_inputs,
    load_and_preprocess,
    prediction_records,
    prediction_schema,
    skipped_summary,
)
from marrowscope.inference.predictor import BACKEND_ALIASES, Predictor
from marrowscope.models.bundle import pretrained_bundle, shipped_name
from marrowscope.preprocess.ops import is_grayscale
from marrowscope.utils.image import OUTPUT_MARKERS, ImageReadError, is_hidden, is_image_file
from marrowscope.utils.io import printable_data

__all__ = [
    "RAY_INSTALL_HINT",
    "RayEngineError",
    "RayPredictionSummary",
    "RayInputs",
    "expand_inputs",
    "predict_with_ray",
]

RAY_INSTALL_HINT = "pip install 'marrowscope[ray]'"
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
DECODE_BATCH = 32
"""Images per decode task."""
log = logging.getLogger(__name__)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RayEngineError(InputError):
    """The Ray engine cannot run: Ray missing, no cluster, bad inputs or output; names the fix."""


@dataclass(frozen=True)
class RayPredictionSummary:
    """What a Ray prediction run did.

    Attributes:
        out: the Parquet folder written.
        images: rows written (one per input image).
        errors: ``(path, error)`` of the images that could not be used.
        seconds: wall time of the Ray pipeline (decode, predict, write).
        actors: predictor actors in the pool.
        cluster: the cluster's resources when the run started (CPU, GPU, nodes).
        skipped: files under the folders, glob matches and URI prefixes given that were left
            out because they are not images by extension (:attr:`RayInputs.skipped`).
    """

    out: str
    images: int
    errors: list[tuple[str, str]]
    seconds: float
    actors: int
    cluster: dict[str, float]
    skipped: list[str] = field(default_factory=list)

    def skipped_summary(self, shown: int = 3) -> str | None:
        """One line naming how many files were left out and a few of them (``None``: none)."""
        return skipped_summary([_base_name(p) for p in self.skipped], shown)

    @property
    def images_per_second(self) -> float:
        """Images classified per second (unreadable ones not counted)."""
        ok = self.images - len(self.errors)
        return ok / self.seconds if self.seconds > 0 else 0.0


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an error that says how to install it.

    Raises:
        RayEngineError: Ray (or Ray Data) is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayEngineError(
            f"--engine ray needs Ray Data, which is not installed ({e}); install it with: "
            f"{RAY_INSTALL_HINT} (or use --engine local)"
        ) from None
    return ray


def is_uri(text: str) -> bool:
    """True for ``scheme://...`` (object storage, HDFS, ``file://``)."""
    return bool(_URI.match(text))


# ------------------------------------------------------------------------------------- inputs


@functools.lru_cache(maxsize=32)
def _root_filesystem(root: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, its path of root)`` for ``scheme://netloc``, made once per root
    (making an S3 client per file would be slow)."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(root + "/" if root.endswith("://") else root)
    return fs, base.rstrip("/")


def _split_uri(uri: str) -> tuple[Any, str, str, str]:
    """``(file system, path inside it, root, root's path)`` of ``scheme://netloc/rest``.

    Raises:
        RayEngineError: a scheme pyarrow.fs does not know, or a store it cannot reach.
    """
    scheme, rest = uri.split("://", 1)
    netloc, _, tail = rest.partition("/")
    root = f"{scheme}://{netloc}"
    try:
        fs, base = _root_filesystem(root)
    except Exception as e:  # ArrowInvalid (unknown scheme), OSError (credentials, network)
        raise RayEngineError(
            f"{uri}: pyarrow.fs cannot open this location ({type(e).__name__}: {e}); check the "
            "URI scheme (s3://, gs://, hdfs://, file://) and your storage credentials"
        ) from None
    tail = tail.rstrip("/")
    if not base:  # hdfs://host:port/path, file:///path
        return fs, f"/{tail}", root, base
    return fs, (f"{base}/{tail}" if tail else base), root, base


def _list_uri(uri: str) -> tuple[list[str], list[str]]:
    """The image files at an object-storage URI: the file itself, or every image below a
    folder/prefix; and the other files found below a folder/prefix (not images by extension).

    Listed as :func:`~marrowscope.utils.image.list_image_files` lists a local folder
    (recursive, sorted; hidden files and folders, ``__MACOSX`` and sub-folders marrowscope wrote
    as output left out, the location given itself always listed), so ``file:///data/cells``
    and ``/data/cells`` give the same cells.
    """
    import pyarrow.fs as pafs

    fs, path, root, base = _split_uri(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri], []
        if info.type != pafs.FileType.Directory:
            raise RayEngineError(f"{uri}: no such file or folder; check the path")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        # the names are decoded here (a name that is not UTF-8 fails on .path)
        found_files = [i.path for i in infos if i.type == pafs.FileType.File]
    except RayEngineError:
        raise
    except UnicodeDecodeError:
        raise RayEngineError(
            f"{uri}: a file or folder name below it is not UTF-8, which pyarrow.fs cannot list; "
            "rename it, or (on a file system every node mounts) give the folder as a local path"
        ) from None
    except OSError as e:
        raise RayEngineError(
            f"{uri}: cannot list it ({e}); check the path and credentials"
        ) from None
    prefix = path.rstrip("/") + "/"
    listed = {  # file path -> its parts below the location given
        f: tuple(f[len(prefix) :].split("/")) for f in found_files if f.startswith(prefix)
    }
    # sub-folders holding an output marker (the location given itself is always listed)
    outputs = {parts[:-1] for parts in listed.values() if parts[-1] in OUTPUT_MARKERS} - {()}
    files = sorted(
        root + full[len(base) :]
        for full, parts in listed.items()
        if not any(is_hidden(part) or part == "__MACOSX" for part in parts)
        and not any(parts[:k] in outputs for k in range(1, len(parts)))
    )
    if outputs:
        log.warning(
            "skipped %d folder(s) of marrowscope's own output below %s: not inputs",
            len(outputs),
            uri,
        )
    found = [f for f in files if is_image_file(f)]
    if not found:
        seen = f"; found {len(files)} other file(s), e.g. {_base_name(files[0])}" if files else ""
        raise RayEngineError(f"{uri}: no image files below this location{seen}; check the path")
    return found, [f for f in files if not is_image_file(f)]


def _base_name(path: str) -> str:
    """The last part of a local path or URI."""
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(path)


def _read_manifest_paths(manifest: Path) -> list[str]:
    """The ``path`` column of a CSV or Parquet manifest (relative paths: to its folder)."""
    import pyarrow as pa

    try:
        if manifest.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(
                manifest, convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()})
            )
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(manifest)
    except (OSError, pa.ArrowInvalid) as e:
        raise RayEngineError(
            f"{manifest}: cannot read this manifest ({e}); check the file"
        ) from None
    if "path" not in table.column_names:
        raise RayEngineError(
            f"{manifest}: a manifest needs a 'path' column (one image per row); it has "
            f"{', '.join(table.column_names) or 'no columns'}"
        )
    base = manifest.parent.absolute()
    out = []
    for value in table.column("path").to_pylist():
        if value is None or not str(value).strip():
            continue
        text = str(value).strip()
        out.append(text if is_uri(text) or os.path.isabs(text) else str(base / text))
    if not out:
        raise RayEngineError(f"{manifest}: the manifest lists no path")
    return out


@dataclass(frozen=True)
class RayInputs:
    """What :func:`expand_inputs` found.

    Attributes:
        paths: the image paths and URIs, in input order, without duplicates.
        skipped: files under the folders, glob matches and URI prefixes given that were left out
            because they are not images by extension (as ``--engine local`` reports them).
    """

    paths: list[str]
    skipped: list[str]


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> RayInputs:
    """Image paths and URIs from files, folders, globs, manifests and object-storage URIs.

    Local files, folders and globs are expanded as by ``--engine local``
    (:func:`~marrowscope.inference.batching.collect_inputs`, whose skipped files are kept); a
    ``.csv``/``.parquet`` file is a manifest of paths, each used as listed. Order: the order of
    ``inputs``; duplicates are dropped.

    Raises:
        RayEngineError: an input that matches nothing, or a manifest without a ``path`` column.
        InputError: as :func:`~marrowscope.inference.batching.collect_inputs`.
    """
    out: dict[str, None] = {}
    skipped: dict[str, None] = {}
    for item in inputs:
        text = str(item)
        if is_uri(text):
            found, others = _list_uri(text)
            out.update(dict.fromkeys(found))
            skipped.update(dict.fromkeys(others))
        elif Path(text).is_file() and Path(text).suffix.lower() in MANIFEST_SUFFIXES:
            out.update(dict.fromkeys(_read_manifest_paths(Path(text))))
        else:
            collected = collect_inputs([text])
            out.update(dict.fromkeys(str(p) for p in collected.paths))
            skipped.update(dict.fromkeys(str(p) for p in collected.skipped))
    if not out:
        raise RayEngineError("no input given: pass image files, folders, globs, a manifest or URIs")
    return RayInputs(paths=list(out), skipped=[p for p in skipped if p not in out])


# --------------------------------------------------------------------------- Ray Data stages


def _read_uri(uri: str) -> bytes:
    """The bytes of an object-storage file, or an :class:`ImageReadError` naming it."""
    try:
        fs, path, _, _ = _split_uri(uri)
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except FileNotFoundError:
        raise ImageReadError(uri, "file not found; check the path") from None
    except (OSError, RayEngineError) as e:
        raise ImageReadError(uri, f"cannot read it ({e}); check the path and credentials") from None


def decode_batch(
    batch: dict[str, np.ndarray], *, cfg: PreprocessConfig, size: int
) -> dict[str, np.ndarray]:
    """Ray task: ``{"path"}`` -> ``{"path", "image" (N, S, S, 3) uint8, "error"}``; an image that
    cannot be used gets zeros and its error message (never an exception)."""
    try:
        import cv2

        cv2.setNumThreads(1)  # the parallelism comes from the tasks
    except ImportError:  # pragma: no cover
        pass
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    errors: list[str] = []
    for i, p in enumerate(paths):
        arr, err = load_and_preprocess(p, cfg, size, read=_read_uri if is_uri(p) else None)
        if arr is not None:
            images[i] = arr
        errors.append(err or "")
    return {
        "path": np.asarray(paths, dtype=object),
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }


class PredictActor:
    """Ray Data actor: one :class:`Predictor`, built once from the shipped bundle; a batch of
    decoded images -> prediction rows (an Arrow table with the columns of ``--engine local``).

    Args:
        bundle: ``{"name": file or folder name, "folder": bool, "files": {file name: bytes}}``,
            or a 1-tuple holding an object reference to it (fetched here, so the actor's
            constructor arguments stay small).
        device: ``cpu`` or ``cuda``.
        batch_size: images per forward pass.
        precision: the Predictor's precision (``auto``, as ``--engine local``).
        tta: test-time augmentation (``None``: the bundle's).
        backend: ``torch``, ``onnx`` or ``int8`` (``bundle`` is then the int8 export folder).
        topk: ranked classes per row.
        threads: torch threads (the CPUs this actor reserved).
        model_name: the ``model`` column (the driver's :attr:`Predictor.model_name_`: the
            actor loads a copy from a temporary folder, whose path names nothing).
    """

    def __init__(
        self,
        bundle: Any,
        *,
        device: str,
        batch_size: int,
        precision: str,
        tta: str | None,
        backend: str,
        topk: int,
        threads: int,
        model_name: str | None = None,
    ) -> None:
        import ray
        import torch

        if isinstance(bundle, tuple):
            bundle = ray.get(bundle[0])
        torch.set_num_threads(max(1, threads))
        tmp = Path(tempfile.mkdtemp(prefix="marrowscope-bundle-"))
        try:
            if bundle["folder"]:
                target = tmp / bundle["name"]
                target.mkdir()
            else:
                target = tmp
            for name, data in bundle["files"].items():
                (target / name).write_bytes(data)
            path = target if bundle["folder"] else tmp / bundle["name"]
            self.predictor = Predictor.from_checkpoint(
                path,
                device=device,
                backend=backend,
                batch_size=batch_size,
                precision=precision,
                tta=tta,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the model is in memory now
        self.topk = topk
        self.extra = {
            "model": model_name or self.predictor.model_name_,
            "arch": self.predictor.arch,
            "marrowscope_version": __version__,
        }
        example = prediction_records(
            [("", None, "x")], self.predictor.classes_, topk=topk, extra=self.extra
        )
        self.schema = prediction_schema(list(example[0]))

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        errors = [str(e) for e in batch["error"]]
        ok = np.asarray([e == "" for e in errors], dtype=bool)
        probs = iter(
            self.predictor.predict_preprocessed(np.asarray(batch["image"])[ok]) if ok.any() else ()
        )
        results = [
            (str(path), next(probs) if good else None, err or None)
            for path, good, err in zip(batch["path"], ok, errors, strict=True)
        ]
        warnings = [
            GRAYSCALE_WARNING if good and is_grayscale(image) else ""
            for image, good in zip(batch["image"], ok, strict=True)
        ]
        records = prediction_records(
            results, self.predictor.classes_, topk=self.topk, extra=self.extra, warnings=warnings
        )
        return pa.Table.from_pylist(printable_data(records), schema=self.schema)


# ------------------------------------------------------------------------------ the run


def _bundle_payload(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's files as bytes (shipped to the actors through the object store, so remote
    nodes need no copy of the checkpoint)."""
    name = shipped_name(checkpoint)
    p = pretrained_bundle(name) if name is not None else Path(checkpoint)
    if p.is_file():  # an exported .onnx file
        return {"name": p.name, "folder": False, "files": {p.name: p.read_bytes()}}
    files = {
        f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file() and f.suffix != ".md"
    }
    return {"name": p.name or "bundle", "folder": True, "files": files}


def _connect(ray: Any, address: str | None) -> bool:
    """Start a local Ray (``address`` None) or connect to a cluster; True when this call started
    or connected it (and so shuts it down afterwards)."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            # "local": a new Ray for this run, not whatever cluster `ray start` left running
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray" if address is None else f"the Ray cluster at {address}"
        raise RayEngineError(
            f"cannot start or reach {where} ({type(e).__name__}: {str(e)[:300]}); start a cluster "
            "with `ray start --head` and pass --address auto, pass ray://HOST:10001 for a remote "
            "one, or leave out --address to start Ray on this machine"
        ) from None
    return True


def _actor_plan(
    ray: Any, workers: int, gpus_per_worker: float, cpus_per_worker: float, *, fixed: bool
) -> tuple[int, dict[str, float]]:
    """How many predictor actors, and the cluster's resources.

    Raises:
        RayEngineError: no GPU for GPU actors; or, on a cluster of fixed size (``fixed``: the
            local Ray this run started), actors that would take every CPU and leave none to the
            decode tasks (the job would wait forever).
    """
    res = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    res["nodes"] = float(len([n for n in ray.nodes() if n.get("Alive")]))
    if workers > 0:
        n = workers
    elif gpus_per_worker > 0:
        n = int(res.get("GPU", 0.0) // gpus_per_worker)
        if n < 1:
            raise RayEngineError(
                f"--gpus-per-worker {gpus_per_worker:g} but the cluster has "
                f"{res.get('GPU', 0.0):g} GPU(s); use --gpus-per-worker 0 for CPU actors"
            )
    else:
        # leave about half of the CPUs to the decode tasks
        n = max(1, int(res.get("CPU", 1.0) // (2 * cpus_per_worker)))
    cpus = res.get("CPU", 0.0)
    if n * cpus_per_worker > cpus - 1:
        msg = (
            f"{n} predictor actor(s) x {cpus_per_worker:g} CPU leave no CPU of the cluster's "
            f"{cpus:g} for the decode tasks; use fewer --workers or a smaller --cpus-per-worker "
            "(e.g. 0.5)"
        )
        if fixed:
            raise RayEngineError(msg)
        log.warning("%s, unless the cluster grows", msg)
    return n, res


def _check_out(out: str, address: str | None) -> None:
    if out.lower().endswith((".csv", ".json")):
        raise RayEngineError(
            f"{out}: the ray engine writes a folder of Parquet files; use --out NAME.parquet/ "
            "(or --engine local for CSV/JSON)"
        )
    if address is not None and address.startswith("ray://") and not is_uri(out):
        raise RayEngineError(
            f"{out}: with Ray Client (--address {address}) the cluster writes the output, not "
            "this machine; give --out as object storage (s3://bucket/preds/) or as file:///PATH "
            "on a file system the cluster's nodes share"
        )
    if not is_uri(out):
        p = Path(out)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise RayEngineError(
                f"{out} already exists; choose a new --out folder or remove it (prediction "
                "folders are never merged)"
            )


def predict_with_ray(
    checkpoint: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int = 0,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int = 64,
    topk: int = 3,
    tta: str | None = None,
    backend: str = "torch",
    precision: str = "auto",
    progress: bool = True,
) -> RayPredictionSummary:
    """Classify every input image on a Ray cluster and write a Parquet folder.

    Args:
        checkpoint: bundle folder, shipped model name, (``backend="onnx"``) ``.onnx`` file, or
            (``backend="int8"``) an int8 export folder.
        inputs: files, folders, globs, manifests (CSV/Parquet with ``path``) or URIs.
        out: the Parquet folder to write (local: written beside and renamed into place, so an
            interrupted run leaves no partial folder; a URI: written in place).
        address: ``None`` starts Ray on this machine; ``auto`` joins the cluster ``ray start``
            made; ``ray://HOST:10001`` connects through Ray Client. A Ray already initialised
            in this process is used as it is.
        workers: predictor actors; 0 = one per ``gpus_per_worker`` GPUs, or on CPUs one per two
            ``cpus_per_worker`` (the other half decodes).
        gpus_per_worker: GPUs per actor (fractions share a GPU); 0 = CPU actors.
        cpus_per_worker: CPUs (and torch threads) per actor.
        batch_size: images per forward pass.
        topk: ranked classes per row.
        tta: test-time augmentation (``None``: the bundle's).
        backend: ``torch``, ``onnx`` or ``int8`` (alias ``openvino``).
        precision: the Predictor's precision on each actor.
        progress: Ray Data's progress bars.

    Raises:
        RayEngineError: Ray missing, no cluster, bad inputs, or an existing output folder.
        BundleError: the checkpoint cannot be loaded (checked here, before Ray starts).
    """
    if topk < 1 or batch_size < 1 or workers < 0 or gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ValueError(
            "topk and batch_size must be >= 1, workers and gpus_per_worker >= 0 and "
            "cpus_per_worker > 0"
        )
    if BACKEND_ALIASES.get(backend, backend) == "int8" and gpus_per_worker > 0:
        raise RayEngineError(
            "the int8 backend runs on the CPU; use --gpus-per-worker 0, or --backend torch for "
            "GPU actors"
        )
    ray = import_ray()
    out_str = str(out)
    _check_out(out_str, address)
    # the same checks and the same preprocessing parameters as --engine local, on the driver
    predictor = Predictor.from_checkpoint(
        checkpoint, device="cpu", backend=backend, batch_size=batch_size, tta=tta
    )
    expanded = expand_inputs(inputs)
    paths = expanded.paths
    # int8: the export folder the driver resolved (CHECKPOINT/int8, or the cache for a shipped
    # model), not the bundle's top-level files, which hold no OpenVINO model
    int8_bin = getattr(predictor, "int8_path_", None) if predictor.backend == "int8" else None
    # onnx: the .onnx file the driver resolved (it carries the metadata; for a shipped model it
    # is in the per-user cache, not in the bundle folder)
    onnx_file = getattr(predictor, "onnx_path_", None) if predictor.backend == "onnx" else None
    payload = _bundle_payload(
        Path(int8_bin).parent
        if int8_bin is not None
        else onnx_file
        if onnx_file is not None
        else checkpoint
    )
    owned = _connect(ray, address)
    try:
        n_actors, resources = _actor_plan(
            ray, workers, gpus_per_worker, cpus_per_worker, fixed=owned and address is None
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        bundle_ref = ray.put(payload)
        ds = ray.data.from_items(
            [{"path": p} for p in paths],
            override_num_blocks=max(1, min(len(paths), math.ceil(len(paths) / DECODE_BATCH))),
        )
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"cfg": predictor.preprocess_config_, "size": predictor.input_size},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=1,
            # recycle a decode worker after 1000 tasks (bounds any leak in an image decoder);
            # an option actors lack, so Ray keeps decoding in tasks of its own instead of fusing
            # it into the predictor actors (which would decode one batch at a time, in turn)
            max_calls=1000,
        )
        ds = ds.map_batches(
            PredictActor,
            fn_constructor_kwargs={
                "bundle": (bundle_ref,),  # a reference, fetched by each actor
                "device": "cuda" if gpus_per_worker > 0 else "cpu",
                "batch_size": batch_size,
                "precision": precision,
                "tta": tta,
                "backend": backend,
                "topk": topk,
                "threads": max(1, int(cpus_per_worker)),
                "model_name": predictor.model_name_,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker if gpus_per_worker > 0 else None,
        )
        target = out_str
        staging = None
        if not is_uri(out_str):
            final = Path(out_str).absolute()
            staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            final.parent.mkdir(parents=True, exist_ok=True)
            target = str(staging)
        start = time.perf_counter()
        try:
            ds.write_parquet(target, min_rows_per_file=50_000)
            seconds = time.perf_counter() - start
            if staging is not None:
                final = Path(out_str).absolute()
                if final.is_dir():
                    final.rmdir()  # empty (checked above)
                os.replace(staging, final)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        # the path and error columns, read back where the output is (through Ray for a client)
        if address is not None and address.startswith("ray://"):
            written = ray.data.read_parquet(out_str, columns=["path", "error"]).to_arrow_refs()
            table = _concat(ray.get(written))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(out_str, columns=["path", "error"])
    finally:
        if owned:
            ray.shutdown()
    return dc_replace(
        _summarize(table, out_str, len(paths), seconds, n_actors, resources),
        skipped=expanded.skipped,
    )


def _concat(tables: list[Any]) -> Any:
    """One Arrow table from several (the blocks Ray read)."""
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else pa.table({"path": [], "error": []})


def _summarize(
    table: Any, out: str, expected: int, seconds: float, actors: int, resources: dict[str, float]
) -> RayPredictionSummary:
    if table.num_rows != expected:
        raise RuntimeError(
            f"{out}: {table.num_rows} rows written for {expected} inputs; the Ray job lost "
            "rows, run it again into a new folder"
        )
    errors = [
        (p, e)
        for p, e in zip(
            table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True
        )
        if e
    ]
    return RayPredictionSummary(
        out=out,
        images=table.num_rows,
        errors=sorted(errors),
        seconds=seconds,
        actors=actors,
        cluster=resources,
    )

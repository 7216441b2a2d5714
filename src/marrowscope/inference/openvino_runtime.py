"""The int8 backend's runtime: an OpenVINO model exported by ``marrowscope export --format int8``.

An int8 export is a folder (default ``CHECKPOINT/int8``; for a shipped model
``$MARROWSCOPE_CACHE/int8/NAME``, since the package folder may be read-only) holding
``model.xml`` + ``model.bin`` (the OpenVINO IR of the statically quantised network: input
``images``, float32 NCHW RGB in [0, 1] with a dynamic batch axis, normalisation inside; output
``logits``) and ``metadata.json`` (the bundle's metadata plus an ``int8`` section: runtime
versions, calibration images, the accuracy guard's numbers and the SHA-256 of the weights it was
made from).

Each export is a new version of the folder (:func:`~marrowscope.utils.io.versioned_folder`): the
files live in ``.v-<random>/``, the link ``.current`` names the current version, and
``model.xml`` etc. are links through it, so exports and ``predict`` runs can use one folder at
the same time; the int8 backend reads every file from one version
(:func:`~marrowscope.utils.io.current_version`). A folder written before versions (real files)
is read as it is, and becomes versioned at its next export.

OpenVINO is an optional dependency (``pip install 'marrowscope[int8]'``); importing this module
does not need it, running a model does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from marrowscope.models.bundle import BundleError, shipped_name
from marrowscope.preprocess.cache import default_cache_root

__all__ = [
    "INSTALL_HINT",
    "INT8_DIR",
    "INT8_XML",
    "INT8_BIN",
    "RECHECK_BIN",
    "RECHECK_XML",
    "OpenVINORunner",
    "default_int8_dir",
    "import_openvino",
]

INT8_DIR = "int8"
"""Name of the int8 export folder inside a checkpoint bundle folder."""
INT8_XML = "model.xml"
INT8_BIN = "model.bin"
RECHECK_XML = "model_fp32.xml"
"""The fp32 OpenVINO model of an int8 export that re-checks its uncertain cells (``recheck``)."""
RECHECK_BIN = "model_fp32.bin"
INSTALL_HINT = "pip install 'marrowscope[int8]'"
"""How to get the optional int8 runtime (OpenVINO) and quantiser (NNCF)."""


class RuntimeMissingError(BundleError):
    """The optional int8 runtime is not installed; the message says how to install it."""


def import_openvino() -> Any:
    """The ``openvino`` module.

    Raises:
        RuntimeMissingError: OpenVINO is not installed (names the install command).
    """
    try:
        import openvino
    except ImportError:
        raise RuntimeMissingError(
            f"the int8 backend runs on OpenVINO, which is not installed: {INSTALL_HINT} "
            "(or use --backend torch / onnx)"
        ) from None
    return openvino


def default_int8_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """Where ``marrowscope export CHECKPOINT --format int8`` writes by default, and where the
    int8 backend looks: ``CHECKPOINT/int8`` for a bundle folder, ``$MARROWSCOPE_CACHE/int8/NAME``
    (default ``~/.cache/marrowscope/int8/NAME``) for a shipped model (its name, ``builtin:NAME``
    or its folder: :func:`~marrowscope.models.bundle.shipped_name`)."""
    name = shipped_name(checkpoint, folder=True)
    if name is not None:
        return default_cache_root() / INT8_DIR / name
    return Path(checkpoint).expanduser() / INT8_DIR


class OpenVINORunner:
    """Runs an OpenVINO model on the CPU: ``(N, 3, S, S)`` float32 in [0, 1] -> ``(N, K)`` logits,
    or (:meth:`infer_uint8`) ``(N, S, S, 3)`` uint8 RGB -> logits.

    By default the model is compiled for latency (one stream of ``threads`` threads, fp32 for
    the layers left in float), which for most models and the batch sizes of ``predict``
    (16-64) measured as fast as two streams (docs/benchmarks.md). With ``streams=2`` it runs
    two streams of ``threads // 2`` threads and splits each batch of two or more images between
    them (one half per stream, at the same time): faster for networks whose layers are too
    small to keep every thread busy (EfficientNet-B5's depthwise convolutions), slower for a
    single image. The export measures which one a model runs faster with and records it
    (``streams`` in the int8 metadata). The uint8 path converts, scales (1/255) and transposes
    inside OpenVINO (its pre-processing step, fused with the first layer), so the decoded
    images go to the network without a float copy on the Python side.

    Args:
        xml: the ``model.xml`` file (``model.bin`` next to it).
        threads: inference threads (all streams together).
        streams: 1 or 2 (2 needs at least 2 threads; with fewer it runs as 1).
        static_shapes: run uint8 batches on fixed-shape compilations (:meth:`infer_uint8`).

    Raises:
        RuntimeMissingError: OpenVINO is not installed.
        BundleError: the files cannot be read or compiled (names the file and the fix).
    """

    STATIC_SHAPES = 6
    """Batch sizes the uint8 path keeps a fixed-shape compilation of (beyond: the dynamic one)."""

    def __init__(
        self, xml: Path, *, threads: int, streams: int = 1, static_shapes: bool = True
    ) -> None:
        if streams not in (1, 2):
            raise ValueError(f"streams must be 1 or 2, got {streams!r}")
        self._ov = ov = import_openvino()
        self._xml = xml
        self._core = ov.Core()
        threads = max(1, int(threads))
        self.streams = streams if threads >= 2 else 1
        self._config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": self.streams,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._float: Any = None
        try:
            model = self._core.read_model(str(xml))
            self.input_shape: list[int] = [
                -1 if d.is_dynamic else d.get_length() for d in model.input(0).partial_shape
            ]
            self._source = model.clone()  # kept: the files may be gone later (a Ray actor's copy)
            self._uint8 = self._compile(self._uint8_model(model))
        except Exception as e:
            raise self._load_error(e) from None
        self._uint8_requests = [self._uint8.create_infer_request() for _ in range(self.streams)]
        self._static_shapes = static_shapes
        self._static: dict[int, tuple[Any, list[Any]]] = {}

    def _load_error(self, e: Exception) -> BundleError:
        return BundleError(
            f"{self._xml}: cannot load the OpenVINO model ({type(e).__name__}: {str(e)[:300]}); "
            "the export is damaged or from another OpenVINO version; export it again with: "
            "marrowscope export CHECKPOINT --format int8"
        )

    def _compile(self, model: Any) -> Any:
        return self._core.compile_model(model, "CPU", self._config)

    def _run(self, compiled: Any, requests: list[Any], batch: np.ndarray) -> np.ndarray:
        """Logits of ``batch``: one request, or the batch split between the streams' requests
        running at the same time."""
        parts = self._parts(batch)
        return self._infer(list(zip(requests, parts, strict=False)))

    def _parts(self, batch: np.ndarray) -> list[np.ndarray]:
        """``batch`` whole, or split into one part per stream (two or more images)."""
        if self.streams == 1 or len(batch) < 2:
            return [batch]
        return np.array_split(batch, self.streams)

    @staticmethod
    def _infer(jobs: list[tuple[Any, np.ndarray]]) -> np.ndarray:
        """Run each ``(request, part)`` (together when there are several) and join their logits
        in order (copies: the output buffers are reused)."""
        if len(jobs) == 1:
            request, part = jobs[0]
            return np.array(request.infer({0: part})[0], dtype=np.float32, copy=True)
        for request, part in jobs:
            request.start_async({0: part})
        for request, _ in jobs:
            request.wait()
        return np.concatenate(
            [np.array(r.get_output_tensor(0).data, dtype=np.float32) for r, _ in jobs]
        )

    def _uint8_model(self, model: Any) -> Any:
        """``model`` taking uint8 NHWC RGB: convert to f32, divide by 255, NHWC -> NCHW."""
        ov = self._ov
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0)
        return ppp.build()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` float32 for float NCHW input."""
        if self._float is None:  # compiled on first use: predict only needs the uint8 path
            try:
                self._float = self._compile(self._source.clone())
            except Exception as e:
                raise self._load_error(e) from None
            self._float_requests = [self._float.create_infer_request() for _ in range(self.streams)]
        return self._run(
            self._float, self._float_requests, np.ascontiguousarray(x, dtype=np.float32)
        )

    def infer_uint8(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` float32 for ``(N, S, S, 3)`` uint8 RGB images.

        With ``static_shapes`` (the default) each part of a batch runs on a compilation of the
        model for exactly its number of images, made on first use and kept for up to
        :attr:`STATIC_SHAPES` sizes (the batch sizes of a run: ``predict`` uses one, plus its
        last batch); a fixed shape lets OpenVINO plan its memory and kernels once, which made
        the paper's small CNN about 12% faster here (docs/benchmarks.md). Other sizes use the
        dynamic-batch compilation; the logits are the same either way.
        """
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if not self._static_shapes or not len(batch):
            return self._run(self._uint8, self._uint8_requests, batch)
        parts = self._parts(batch)
        runs = [self._static_for(len(part)) for part in parts]
        if any(r is None for r in runs):
            return self._run(self._uint8, self._uint8_requests, batch)
        # part i runs on stream i's request of the compilation for its size
        jobs = [(run[1][i], part) for i, (run, part) in enumerate(zip(runs, parts, strict=True))]  # type: ignore[index]
        return self._infer(jobs)

    def _static_for(self, n: int) -> tuple[Any, list[Any]] | None:
        """The uint8 model compiled for batches of exactly ``n`` images, and one request per
        stream; ``None`` once :attr:`STATIC_SHAPES` sizes are held."""
        if n in self._static:
            return self._static[n]
        if len(self._static) >= self.STATIC_SHAPES:
            return None
        try:
            model = self._uint8_model(self._source.clone())
            size = self.input_shape[-1]
            model.reshape({model.input(0).get_any_name(): [n, size, size, 3]})
            compiled = self._compile(model)
        except Exception as e:
            raise self._load_error(e) from None
        self._static[n] = (compiled, [compiled.create_infer_request() for _ in range(self.streams)])
        return self._static[n]

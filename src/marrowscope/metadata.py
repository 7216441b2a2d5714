"""The typed metadata of a checkpoint bundle: one dataclass reads and writes ``metadata.json``.

Everything that uses a trained model downstream (predict, evaluate, count, export, serve, the
model card) needs the same few facts that travel with the weights: the architecture, the class
names in index order, the input size and normalisation, the preprocessing, how to predict (test-time
augmentation, softmax temperature). :class:`BundleMetadata` holds them with their types, and
:meth:`BundleMetadata.from_dict` is the one place that checks a ``metadata.json`` (or the copy
embedded in an exported ONNX model), as timm keeps a model's ``PretrainedCfg`` in one dataclass
that travels with the model.

Torch-free on purpose (an import-linter contract keeps it so): a model card, a report or a web page
can read a bundle's metadata without loading a deep-learning stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marrowscope import __version__
from marrowscope.config import ConfigError, ModelConfig, from_dict, to_dict
from marrowscope.utils.io import atomic_write_json, json_default

__all__ = [
    "BUNDLE_FORMAT",
    "TTA_MODES",
    "WEIGHTS_DTYPES",
    "BundleMetadata",
    "InferenceSettings",
    "MetadataError",
]

BUNDLE_FORMAT = 1
"""Version of the bundle layout written by this package; newer bundles are refused."""

TTA_MODES = ("none", "flips", "d8")
"""Test-time augmentations a bundle may ask for: none, the 4 flips, the 8 dihedral views."""

WEIGHTS_DTYPES = ("float32", "float16")
"""Storage types of a bundle's floating-point weights (they are always computed in float32)."""

_FIX = "re-save the checkpoint with a current marrowscope or use another one (e.g. RUN_DIR/last)"

# the keys with a field of their own; every other key is kept in ``extra`` and written back
_TYPED_KEYS = (
    "format",
    "marrowscope_version",
    "classes",
    "input_size",
    "mean",
    "std",
    "architecture",
    "arch",
    "preprocess",
    "inference",
    "weights_source",
    "weights_dtype",
    "config",
    "metrics",
    "epoch",
    "train_counts",
    "pretrained",
    "onnx",
    "int8",
)


class MetadataError(ValueError):
    """A bundle's metadata is missing a key, has a value of the wrong type, or is too new; the
    message names the file, the key and the fix."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a bundle predicts (``metadata["inference"]``)."""

    tta: str = "none"
    """Test-time augmentation, one of :data:`TTA_MODES`."""
    temperature: float = 1.0
    """Softmax temperature fitted on the validation split (1: uncalibrated)."""
    calibration: dict[str, Any] | None = None
    """What the calibration measured (NLL/ECE before and after, cells used), if it ran."""


@dataclass(frozen=True)
class BundleMetadata:
    """What ``metadata.json`` holds, typed; the only reader and writer of that file.

    Build one with :meth:`from_dict` / :meth:`read` (checked), change it with :meth:`replace`,
    write it with :meth:`write` / :meth:`to_dict`. Keys this version does not know are kept in
    ``extra`` and written back unchanged.
    """

    classes: tuple[str, ...]
    """Class names in the order of the model's outputs."""
    input_size: int
    """Side of the square image the network takes, px."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """Normalisation applied inside the model (RGB, inputs in [0, 1])."""
    architecture: ModelConfig
    """The model config the network is rebuilt from."""
    arch: str = ""
    """The registry name (``mobilenetv2_100``); defaults to ``architecture.name``."""
    preprocess: dict[str, Any] | None = None
    """Preprocessing parameters (``marrowscope.preprocess.ops.preprocess_params``); prediction
    needs them, a bare saved model may lack them."""
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    weights_source: str | None = None
    """Where the backbone's initial weights came from (e.g. an ImageNet file), if anywhere."""
    weights_dtype: str = "float32"
    """Storage type of the weights file, one of :data:`WEIGHTS_DTYPES`."""
    format: int = BUNDLE_FORMAT
    marrowscope_version: str = __version__
    """The marrowscope that wrote the bundle."""
    config: dict[str, Any] | None = None
    """The resolved experiment config of the training run."""
    metrics: dict[str, Any] | None = None
    """Validation metrics of the saved epoch."""
    epoch: int | None = None
    train_counts: dict[str, int] | None = None
    """Training images per class."""
    pretrained: dict[str, Any] | None = None
    """For a model that ships with marrowscope: its description, card prose and measurements."""
    onnx: dict[str, Any] | None = None
    """For the copy embedded in an exported ONNX model: the export's parity check and source."""
    int8: dict[str, Any] | None = None
    """For an int8 export (``marrowscope export --format int8``): the runtime and its versions,
    the calibration images, the source weights' SHA-256 and the accuracy guard's numbers."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys (``created``, ``torch_version``, ...), kept as they are."""

    def __post_init__(self) -> None:
        if not self.arch:
            object.__setattr__(self, "arch", self.architecture.name)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> BundleMetadata:
        """A copy with some fields changed (``inference`` may be given as a dict)."""
        if isinstance(changes.get("inference"), dict):
            changes["inference"] = _inference(changes["inference"], "inference")
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- dict/JSON

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``metadata.json`` (key order as marrowscope writes it)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "architecture":
                value = to_dict(value)
            elif f.name == "inference":
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            elif isinstance(value, tuple):
                value = list(value)
            elif value is None and f.name not in ("weights_source",):
                continue  # absent optional sections stay absent
            out[f.name] = value
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=json_default)

    @classmethod
    def from_dict(cls, data: Any, source: str = "metadata") -> BundleMetadata:
        """Check ``data`` (a parsed ``metadata.json``) and type it.

        Args:
            data: the parsed JSON object.
            source: the file it came from (named in every error).

        Raises:
            MetadataError: not an object, a newer ``format``, a missing key or a wrong value;
                the message names ``source``, the key and the fix.
        """
        if not isinstance(data, dict):
            raise MetadataError(f"{source}: expected a JSON object; {_FIX}")
        fmt = data.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise MetadataError(
                f"{source}: no valid 'format' number (got {fmt!r}); not a marrowscope bundle? {_FIX}"
            )
        if fmt > BUNDLE_FORMAT:
            raise MetadataError(
                f"{source}: bundle format {fmt} was written by marrowscope "
                f"{data.get('marrowscope_version', '?')}; this marrowscope {__version__} reads "
                f"format {BUNDLE_FORMAT} at most; upgrade: pip install -U marrowscope"
            )
        missing = [
            k for k in ("classes", "input_size", "mean", "std", "architecture") if k not in data
        ]
        if missing:
            raise MetadataError(f"{source}: missing key(s) {', '.join(missing)}; {_FIX}")
        check = _Checker(source)
        classes = data["classes"]
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
        ):
            raise MetadataError(
                f"{source}: 'classes' must list at least 2 class names (strings), got "
                f"{classes!r}; {_FIX}"
            )
        if len(set(classes)) != len(classes):
            raise MetadataError(f"{source}: 'classes' names a class twice: {classes}; {_FIX}")
        arch_cfg = data["architecture"]
        if not isinstance(arch_cfg, dict):
            raise MetadataError(
                f"{source}: 'architecture' must be a JSON object, got {arch_cfg!r}; {_FIX}"
            )
        try:
            architecture = from_dict({"model": arch_cfg}).model
        except (ConfigError, TypeError) as e:
            raise MetadataError(
                f"{source}: invalid 'architecture' ({e}); the bundle may come from another "
                "marrowscope version: pip install -U marrowscope"
            ) from None
        weights_dtype = data.get("weights_dtype", "float32")
        if weights_dtype not in WEIGHTS_DTYPES:
            raise MetadataError(
                f"{source}: 'weights_dtype' must be one of {', '.join(WEIGHTS_DTYPES)}, got "
                f"{weights_dtype!r}; {_FIX}"
            )
        return cls(
            classes=tuple(classes),
            input_size=check.positive_int(data, "input_size"),
            mean=check.triple(data, "mean", positive=False),
            std=check.triple(data, "std", positive=True),
            architecture=architecture,
            arch=check.optional(data, "arch", str) or "",
            preprocess=check.optional(data, "preprocess", dict),
            inference=_inference(check.optional(data, "inference", dict) or {}, source),
            weights_source=check.optional(data, "weights_source", str),
            weights_dtype=weights_dtype,
            format=fmt,
            marrowscope_version=str(data.get("marrowscope_version") or "unknown"),
            config=check.optional(data, "config", dict),
            metrics=check.optional(data, "metrics", dict),
            epoch=check.optional(data, "epoch", int),
            train_counts=check.optional(data, "train_counts", dict),
            pretrained=check.optional(data, "pretrained", dict),
            onnx=check.optional(data, "onnx", dict),
            int8=check.optional(data, "int8", dict),
            extra={k: v for k, v in data.items() if k not in _TYPED_KEYS},
        )

    @classmethod
    def from_json(cls, text: str, source: str = "metadata") -> BundleMetadata:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{source}: corrupt JSON ({e}); {_FIX}") from None
        return cls.from_dict(data, source)

    # ---------------------------------------------------------------------------------- files

    @classmethod
    def read(cls, path: str | Path) -> BundleMetadata:
        """Read and check a ``metadata.json`` file.

        Raises:
            MetadataError: a missing or unreadable file, corrupt JSON or bad content.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MetadataError(f"{path}: missing; the bundle is incomplete; {_FIX}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MetadataError(f"{path}: cannot read ({e}); {_FIX}") from None
        return cls.from_json(text, str(path))

    def write(self, path: str | Path) -> None:
        """Write ``metadata.json`` atomically.

        Raises:
            TypeError: a value (in ``metrics``, ``extra``...) that JSON cannot represent; checked
                before the file is touched.
        """
        data = self.to_dict()
        try:
            json.dumps(data, default=json_default)
        except (TypeError, ValueError) as e:
            raise TypeError(f"bundle metadata is not JSON serialisable: {e}") from None
        atomic_write_json(Path(path), data)


class _Checker:
    """Type checks of single keys, each error naming the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _fail(self, key: str, want: str, value: Any) -> MetadataError:
        return MetadataError(f"{self.source}: {key!r} must be {want}, got {value!r}; {_FIX}")

    def positive_int(self, data: dict[str, Any], key: str) -> int:
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self._fail(key, "a positive integer", v)
        return v

    def triple(
        self, data: dict[str, Any], key: str, *, positive: bool
    ) -> tuple[float, float, float]:
        v = data[key]
        ok = (
            isinstance(v, list)
            and len(v) == 3
            and all(
                isinstance(x, (int, float))
                and not isinstance(x, bool)
                and math.isfinite(x)
                and (x > 0 or not positive)
                for x in v
            )
        )
        if not ok:
            raise self._fail(key, f"3 {'positive ' if positive else ''}numbers (R, G, B)", v)
        r, g, b = (float(x) for x in v)
        return r, g, b

    def optional(self, data: dict[str, Any], key: str, tp: type) -> Any:
        v = data.get(key)
        if v is None:
            return None
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            names = {dict: "a JSON object", str: "a string", int: "an integer"}
            raise self._fail(key, names.get(tp, tp.__name__), v)
        return v


def _inference(data: dict[str, Any], source: str) -> InferenceSettings:
    tta = data.get("tta", "none")
    if tta not in TTA_MODES:
        raise MetadataError(
            f"{source}: inference.tta must be one of {', '.join(TTA_MODES)}, got {tta!r}; {_FIX}"
        )
    t = data.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise MetadataError(
            f"{source}: inference.temperature must be a positive number, got {t!r}; {_FIX}"
        )
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise MetadataError(
            f"{source}: inference.calibration must be a JSON object, got {calibration!r}; {_FIX}"
        )
    return InferenceSettings(tta=str(tta), temperature=float(t), calibration=calibration)

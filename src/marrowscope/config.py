"""Experiment configuration: frozen dataclasses loaded from YAML, overridden by ``--set``.

Config is data: no executable expressions. A YAML file maps onto :class:`ExperimentConfig`;
unknown keys are an error that names the key and the section, so a typo never silently falls
back to a default. ``--set a.b=value`` overrides are parsed with YAML scalar rules.

Relative paths in ``data.root`` / ``data.manifest`` are resolved against the current working
directory; the special root ``builtin:bm-sample`` names the real Matek sample shipped inside
the package (see :mod:`marrowscope.data.sample`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of each class (or of the groups) that go to validation and test; the rest trains."""

    val: float = 0.15
    test: float = 0.15
    group_column: str | None = None
    """Manifest column (patient / slide id): when set, no group is on both sides of a split."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and which of them to use (the paper's subset rules)."""

    root: str | None = None
    """Folder with one sub-folder per class (nested sub-folders allowed), or ``builtin:bm-sample``."""
    manifest: str | None = None
    """Existing manifest CSV (path,label[,split][,group]); used instead of scanning ``root``."""
    classes: tuple[str, ...] | None = None
    """Classes to keep, in this order (= the model's class order). ``None``: every class found."""
    max_per_class: int | None = None
    """Cap per class, drawn with the experiment seed (the paper: 1000)."""
    min_per_class: int = 10
    """A class with fewer usable images is an error (drop it with ``classes`` or lower this)."""
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass(frozen=True)
class PreprocessConfig:
    """The paper's OpenCV preprocessing; each step can be switched off. Cached on disk."""

    size: int = 224
    resize: bool = True
    denoise: bool = False
    denoise_h: float = 10.0
    denoise_h_color: float = 10.0
    denoise_template_window: int = 7
    denoise_search_window: int = 21
    sharpen: bool = False
    cache_dir: str | None = None
    """``None``: ``$MARROWSCOPE_CACHE`` or ``~/.cache/marrowscope``."""
    workers: int = 0
    """Worker processes for filling the cache; 0 = one per CPU core."""


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only random augmentation (torchvision.transforms.v2)."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    """Random multiples of 90 degrees (cells have no orientation); lossless."""
    rotation: float = 0.0
    """Extra random rotation in +/- degrees (the paper's RandomRotation)."""
    zoom: tuple[float, float] = (0.8, 1.0)
    """RandomResizedCrop area scale range; (1.0, 1.0) disables zoom."""
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.0
    hue: float = 0.0
    stain: float = 0.0
    """H&E/Romanowsky stain jitter in optical-density (HED) space: each stain channel is scaled by
    ``1 +/- stain`` and shifted by ``+/- stain / 5`` (Tellez et al. 2018); 0 disables it."""
    mixup_alpha: float = 0.0
    """Beta(alpha, alpha) MixUp of whole batches (soft labels); 0 disables it."""
    cutmix_alpha: float = 0.0
    """Beta(alpha, alpha) CutMix of whole batches; 0 disables it. With both, one is picked per batch."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when MixUp/CutMix is enabled)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which network: a registry name (the paper's 8) or any timm model name."""

    name: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights_file: str | None = None
    """Local ImageNet weights file (timm state dict); used instead of a download."""
    head_hidden: int = 256
    head_dropout: float = 0.3
    drop_rate: float = 0.0
    """Dropout inside the backbone (timm ``drop_rate``)."""
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    """Peak learning rate of the head; the backbone gets ``lr * backbone_lr_scale``."""
    backbone_lr_scale: float = 1.0
    layer_decay: float | None = None
    """Layer-wise learning-rate decay (timm-style, e.g. 0.9): the backbone layer ``k`` places
    below the head trains at ``lr * backbone_lr_scale * layer_decay**k``. ``None``: one rate for
    the whole backbone."""
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    imbalance: Literal["none", "weighted_loss", "sampler"] = "weighted_loss"
    freeze_epochs: int = 0
    """Stage 1: train the head only for this many epochs, then the whole network."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a better validation macro-F1. ``None``: never."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA, else fp32."""
    channels_last: bool = True
    num_workers: int = 0
    threads: int = 0
    """torch intra-op threads; 0 = leave torch's default (all cores)."""
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (timm ``ModelEmaV3``, with warm-up) and
    validate/save it instead of the raw weights; ``None`` disables it. Typical: 0.998."""
    progressive_size: int | None = None
    """Progressive resizing (fast.ai; EfficientNetV2): the first ``progressive_epochs`` of the
    epochs train on random crops resized to sizes that grow linearly from this size to
    ``preprocess.size`` (multiples of 8); the later epochs and every evaluation use
    ``preprocess.size``. A MobileNetV2 step at 176 px costs about half of one at 250 px on a CPU.
    ``None``: off. Not for ``paper_cnn`` (its dense layer fixes the input size)."""
    progressive_epochs: float = 0.5
    """With ``progressive_size``: the fraction of ``epochs`` over which the size ramps up."""
    swa_epochs: int = 0
    """Stochastic weight averaging (``torch.optim.swa_utils.AveragedModel``): average the weights
    (and batch-norm statistics) at the end of each of the last ``swa_epochs`` epochs, and
    validate/save the average instead of the raw weights from the first of them on. 0: off.
    Not combined with ``ema_decay``."""
    swa_lr: float | None = None
    """With ``swa_epochs``: ``None`` keeps the learning-rate schedule running to its end; a
    number ends the warm-up + cosine schedule where averaging starts and holds the learning rate
    at ``swa_lr`` x each group's peak rate during the averaged epochs (classic SWA)."""


@dataclass(frozen=True)
class InferenceConfig:
    """How the saved model predicts; stored in the checkpoint bundle, used by every command."""

    tta: Literal["none", "flips", "d8"] = "none"
    """Test-time augmentation: average the probabilities over the image and its flips
    (``flips``: 4 views) or all 8 rotations/reflections (``d8``); costs that many forward passes."""
    calibrate: bool = True
    """Fit a softmax temperature on the validation split after training (minimum NLL) so that
    confidences match accuracy; reported as expected calibration error before/after."""


@dataclass(frozen=True)
class CompareConfig:
    """``marrowscope compare``: the models trained on the same split, and the focus class."""

    models: tuple[str, ...] = ()
    focus_class: str = "HAC"
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-model ``--set``-style overrides, e.g. ``{paper_cnn: {train.lr: 0.001}}``."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, preprocessing, augmentation, model, recipe, comparison."""

    name: str = "experiment"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where else k)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested dict (e.g. parsed YAML)."""
    return _from_dict(ExperimentConfig, data or {})


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read with YAML scalar rules)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with ``key.sub=value`` overrides applied."""
    import copy

    out = copy.deepcopy(data or {})
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = {}
                node[k] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML experiment config and apply ``--set`` overrides.

    Args:
        path: YAML file, or ``None`` for the defaults.
        overrides: ``key.sub=value`` strings.

    Raises:
        ConfigError: the file is missing, not YAML, or has an unknown key / wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(data)
    except ConfigError as e:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def replace(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
    """A copy of ``cfg`` with ``key.sub=value`` overrides applied (validated like a file)."""
    return from_dict(apply_overrides(to_dict(cfg), list(overrides)))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from marrowscope.utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

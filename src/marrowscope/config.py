"""Experiment configuration: frozen dataclasses loaded from YAML, overridden by ``--set``.

Config is data: no executable expressions. A YAML file maps onto :class:`ExperimentConfig`;
unknown keys are an error that names the key and the section, so a typo never silently falls
back to a default; so is a key written twice in one mapping. ``--set a.b=value`` overrides are
parsed with YAML rules; a mapping value is merged into the section it names
(``--set 'train={lr: 0.5}'`` changes ``train.lr`` only), and an error in a value given with
``--set`` says so (``from --set train.epochs=abc``) rather than blaming the file.

Every value is checked when the config is loaded (pydantic v2 validates the plain dataclasses
below through a ``TypeAdapter``): its type, its allowed range (the ``Annotated`` bounds on each
field) and the rules between fields (the ``model_validator`` methods), so a bad value fails
before any data is read, with a :class:`ConfigError` that names the dotted key, the value and
what is allowed. Configs built in code (``dataclasses.replace``, direct construction) are not
checked on construction; :func:`validate` checks them with the same rules.

Relative paths in ``data.root`` / ``data.manifest`` are resolved against the current working
directory; the special root ``builtin:bm-sample`` names the real Matek sample shipped inside
the package (see :mod:`marrowscope.data.sample`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Interval
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    model_validator,
    with_config,
)
from pydantic.types import AllowInfNan, Strict


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# value types: strict (no bool for a number, no 2.5 for an integer, no "yes" for a bool), with
# the two YAML conveniences the hand-written loader had


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: accept a string that is a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _number_to_str(value: Any) -> Any:
    """``name: 2024`` is a string key, not an error (YAML reads it as an int)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _comma_list(value: Any) -> Any:
    """``--set data.classes=A,B`` gives the string ``"A,B"``: split it into items."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _odd_window(value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise ValueError("must be a positive odd integer (e.g. 7 or 21)")
    return value


@dataclass(frozen=True)
class _Hint:
    """Extra text for the error message of a field (an example or what the value means)."""

    text: str


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_yaml_float), Strict(), AllowInfNan(False)]
Str = Annotated[str, BeforeValidator(_number_to_str), Strict()]
Probability = Annotated[Float, Interval(ge=0, le=1)]
NonNegative = Annotated[Float, Ge(0)]
Fraction = Annotated[Float, Interval(ge=0, lt=1)]
"""A share in [0, 1) (dropout rates, split fractions)."""

OddWindow = Annotated[Int, AfterValidator(_odd_window)]

SEED_MAX = 2**32 - 1
"""The largest experiment seed (numpy's ``np.random.seed`` range; torch takes it times 1000)."""

_CHECKED = ConfigDict(extra="forbid")  # an unknown key is an error


@with_config(_CHECKED)
@dataclass(frozen=True)
class SplitConfig:
    """Fractions of each class (or of the groups) that go to validation and test; the rest trains."""

    val: Fraction = 0.15
    test: Fraction = 0.15
    group_column: Str | None = None
    """Manifest column (patient / slide id): when set, no group is on both sides of a split."""

    @model_validator(mode="after")
    def _leaves_a_train_split(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ConfigError(
                f"data.split.val + data.split.test = {self.val + self.test:g} leaves nothing to "
                "train on; keep their sum below 1"
            )
        return self


@with_config(_CHECKED)
@dataclass(frozen=True)
class DataConfig:
    """Where the images are and which of them to use (the paper's subset rules)."""

    root: Str | None = None
    """Folder with one sub-folder per class (nested sub-folders allowed), or ``builtin:bm-sample``."""
    manifest: Str | None = None
    """Existing manifest CSV (path,label[,split][,group]); used instead of scanning ``root``."""
    classes: Annotated[tuple[Str, ...], BeforeValidator(_comma_list)] | None = None
    """Classes to keep, in this order (= the model's class order). ``None``: every class found."""
    max_per_class: Annotated[Int, Ge(1), _Hint("null: no cap")] | None = None
    """Cap per class, drawn with the experiment seed (the paper: 1000)."""
    min_per_class: Annotated[Int, Ge(0)] = 10
    """A class with fewer usable images is an error (drop it with ``classes`` or lower this)."""
    split: SplitConfig = field(default_factory=SplitConfig)


@with_config(_CHECKED)
@dataclass(frozen=True)
class PreprocessConfig:
    """The paper's OpenCV preprocessing; each step can be switched off. Cached on disk."""

    size: Annotated[Int, Ge(32), _Hint("the networks need at least 32 px; 224 is usual")] = 224
    resize: Bool = True
    crop: (
        Annotated[Float, Interval(gt=0, le=1), _Hint("a fraction of the shorter side, e.g. 0.75")]
        | None
    ) = None
    """Centre crop before resizing: keep the centred square whose side is this fraction of the
    image's shorter side (0.75 keeps the middle 270 px of a 360 px crop). For crops with much
    background around a centred cell, the cell then keeps more pixels at the same input size.
    ``None`` keeps the whole image."""
    denoise: Bool = False
    denoise_h: NonNegative = 10.0
    denoise_h_color: NonNegative = 10.0
    denoise_template_window: OddWindow = 7
    denoise_search_window: OddWindow = 21
    sharpen: Bool = False
    cache_dir: Str | None = None
    """``None``: ``$MARROWSCOPE_CACHE`` or ``~/.cache/marrowscope``."""
    workers: Annotated[Int, Ge(0)] = 0
    """Worker processes for filling the cache; 0 = one per CPU core."""


@with_config(_CHECKED)
@dataclass(frozen=True)
class AugmentConfig:
    """Training-only random augmentation (torchvision.transforms.v2)."""

    hflip: Probability = 0.5
    vflip: Probability = 0.5
    rot90: Bool = True
    """Random multiples of 90 degrees (cells have no orientation); lossless."""
    rotation: Annotated[Float, Interval(ge=0, le=180), _Hint("+/- degrees")] = 0.0
    """Extra random rotation in +/- degrees (the paper's RandomRotation)."""
    zoom: Annotated[tuple[Float, Float], BeforeValidator(_comma_list)] = (0.8, 1.0)
    """RandomResizedCrop area scale range; (1.0, 1.0) disables zoom."""
    brightness: NonNegative = 0.2
    contrast: NonNegative = 0.2
    saturation: NonNegative = 0.0
    hue: Annotated[Float, Interval(ge=0, le=0.5)] = 0.0
    stain: Annotated[Probability, _Hint("0.05 is light")] = 0.0
    """H&E/Romanowsky stain jitter in optical-density (HED) space: each stain channel is scaled by
    ``1 +/- stain`` and shifted by ``+/- stain / 5`` (Tellez et al. 2018); 0 disables it."""
    mixup_alpha: NonNegative = 0.0
    """Beta(alpha, alpha) MixUp of whole batches (soft labels); 0 disables it."""
    cutmix_alpha: NonNegative = 0.0
    """Beta(alpha, alpha) CutMix of whole batches; 0 disables it. With both, one is picked per batch."""
    mix_prob: Probability = 1.0
    """Probability that a batch is mixed at all (when MixUp/CutMix is enabled)."""

    @model_validator(mode="after")
    def _zoom_is_a_scale_range(self) -> AugmentConfig:
        lo, hi = self.zoom
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"augment.zoom: must be an area scale range 0 < low <= high <= 1, got "
                f"{list(self.zoom)} (use [1.0, 1.0] to disable zoom)"
            )
        return self


@with_config(_CHECKED)
@dataclass(frozen=True)
class ModelConfig:
    """Which network: a registry name (the paper's 8) or any timm model name."""

    name: Str = "tf_efficientnet_lite0"
    pretrained: Bool = True
    weights_file: Str | None = None
    """Local ImageNet weights file (timm state dict); used instead of a download."""
    head_hidden: Annotated[Int, Ge(1)] = 256
    head_dropout: Fraction = 0.3
    drop_rate: Fraction = 0.0
    """Dropout inside the backbone (timm ``drop_rate``)."""
    drop_path_rate: Fraction = 0.0


@with_config(_CHECKED)
@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe."""

    epochs: Annotated[Int, Ge(1)] = 10
    batch_size: Annotated[Int, Ge(1)] = 32
    """The global batch: images per optimizer step over all processes. Under torchrun with N
    processes each takes ``batch_size / N`` of it (N must divide it), so the steps per epoch, the
    schedule and the meaning of ``lr`` do not change with the number of processes."""
    lr: NonNegative = 1e-3
    """Peak learning rate of the head, for the global ``batch_size``; the backbone gets
    ``lr * backbone_lr_scale``. Adding processes does not change it; raising ``batch_size``
    (e.g. to fill more GPUs) calls for a higher rate, not applied automatically: about linear in
    the batch for SGD-like training, about its square root for AdamW, after a short check."""
    backbone_lr_scale: NonNegative = 1.0
    layer_decay: Annotated[Float, Interval(gt=0, le=1), _Hint("e.g. 0.9")] | None = None
    """Layer-wise learning-rate decay (timm-style, e.g. 0.9): the backbone layer ``k`` places
    below the head trains at ``lr * backbone_lr_scale * layer_decay**k``. ``None``: one rate for
    the whole backbone."""
    weight_decay: NonNegative = 0.05
    warmup_epochs: NonNegative = 1.0
    min_lr_ratio: Probability = 0.01
    label_smoothing: Fraction = 0.1
    imbalance: Literal["none", "weighted_loss", "sampler"] = "weighted_loss"
    freeze_epochs: Annotated[Int, Ge(0)] = 0
    """Stage 1: train the head only for this many epochs, then the whole network."""
    early_stopping_patience: Annotated[Int, Ge(1), _Hint("null: never stop early")] | None = None
    """Stop after this many epochs without a better validation macro-F1. ``None``: never."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA, else fp32."""
    channels_last: Bool = True
    num_workers: Annotated[Int, Ge(0)] = 0
    threads: Annotated[Int, Ge(0)] = 0
    """torch intra-op threads; 0 = leave torch's default (all cores)."""
    grad_clip: Annotated[Float, Interval(gt=0), _Hint("null: no clipping")] | None = 1.0
    ema_decay: Annotated[Float, Interval(gt=0, lt=1), _Hint("e.g. 0.998")] | None = None
    """Keep an exponential moving average of the weights (timm ``ModelEmaV3``, with warm-up) and
    validate/save it instead of the raw weights; ``None`` disables it. Typical: 0.998."""
    progressive_size: Int | None = None
    """Progressive resizing (fast.ai; EfficientNetV2): the first ``progressive_epochs`` of the
    epochs train on random crops resized to sizes that grow linearly from this size to
    ``preprocess.size`` (multiples of 8); the later epochs and every evaluation use
    ``preprocess.size``. A MobileNetV2 step at 176 px costs about half of one at 250 px on a CPU.
    ``None``: off. Not for ``paper_cnn`` (its dense layer fixes the input size). Between 32 and
    ``preprocess.size`` (checked by :class:`ExperimentConfig`)."""
    progressive_epochs: Annotated[
        Float, Interval(gt=0, le=1), _Hint("a fraction of train.epochs")
    ] = 0.5
    """With ``progressive_size``: the fraction of ``epochs`` over which the size ramps up."""
    sync_batchnorm: Bool = False
    """Under torchrun on CUDA GPUs: batch-norm statistics over the global batch
    (``torch.nn.SyncBatchNorm``) instead of each process's share. Costs one all-reduce per
    batch-norm layer; worth it when the per-GPU batch is small (below ~16). CUDA only: a
    multi-process CPU run with it set is an error; one process ignores it."""
    swa_epochs: Annotated[Int, Ge(0)] = 0
    """Stochastic weight averaging (``torch.optim.swa_utils.AveragedModel``): average the weights
    (and batch-norm statistics) at the end of each of the last ``swa_epochs`` epochs, and
    validate/save the average instead of the raw weights from the first of them on. 0: off.
    Not combined with ``ema_decay``."""
    swa_lr: Annotated[Float, Interval(gt=0), _Hint("e.g. 0.05")] | None = None
    """With ``swa_epochs``: ``None`` keeps the learning-rate schedule running to its end; a
    number ends the warm-up + cosine schedule where averaging starts and holds the learning rate
    at ``swa_lr`` x each group's peak rate during the averaged epochs (classic SWA)."""

    @model_validator(mode="after")
    def _averaging(self) -> TrainConfig:
        if not self.swa_epochs:
            if self.swa_lr is not None:
                raise ConfigError(
                    f"train.swa_lr={self.swa_lr} needs train.swa_epochs > 0 (e.g. "
                    "train.swa_epochs=4)"
                )
            return self
        if self.swa_epochs > self.epochs:
            raise ConfigError(
                f"train.swa_epochs must be between 1 and train.epochs ({self.epochs}), got "
                f"{self.swa_epochs}"
            )
        if self.ema_decay is not None:
            raise ConfigError(
                "train.swa_epochs and train.ema_decay both average the weights; set one of them "
                "(e.g. train.ema_decay=null)"
            )
        return self


@with_config(_CHECKED)
@dataclass(frozen=True)
class InferenceConfig:
    """How the saved model predicts; stored in the checkpoint bundle, used by every command."""

    tta: Literal["none", "flips", "d8"] = "none"
    """Test-time augmentation: average the probabilities over the image and its flips
    (``flips``: 4 views) or all 8 rotations/reflections (``d8``); costs that many forward passes."""
    calibrate: Bool = True
    """Fit a softmax temperature on the validation split after training (minimum NLL) so that
    confidences match accuracy; reported as expected calibration error before/after."""


@with_config(_CHECKED)
@dataclass(frozen=True)
class CompareConfig:
    """``marrowscope compare``: the models trained on the same split, and the focus class."""

    models: Annotated[tuple[Str, ...], BeforeValidator(_comma_list)] = ()
    focus_class: Str = "HAC"
    model_overrides: dict[Str, dict[Str, Any]] = field(default_factory=dict)
    """Per-model ``--set``-style overrides, e.g. ``{paper_cnn: {train.lr: 0.001}}``."""


@with_config(_CHECKED)
@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, preprocessing, augmentation, model, recipe, comparison."""

    name: Str = "experiment"
    seed: Annotated[Int, Interval(ge=0, le=SEED_MAX)] = 42
    """Seeds Python, numpy and torch; in [0, 2**32 - 1] (numpy's legacy seeding takes no more)."""
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @model_validator(mode="after")
    def _progressive_resizing(self) -> ExperimentConfig:
        t, full = self.train, self.preprocess.size
        if t.progressive_size is None:
            return self
        if not 32 <= t.progressive_size <= full:
            raise ConfigError(
                f"train.progressive_size must be between 32 and preprocess.size ({full}) px, got "
                f"{t.progressive_size} (e.g. 176; null turns it off)"
            )
        if self.model.name.strip() == "paper_cnn":
            raise ConfigError(
                "train.progressive_size does not work with paper_cnn (its dense layer fixes the "
                "input size); set train.progressive_size=null"
            )
        return self


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


_SECTIONS: dict[type, str] = {
    ExperimentConfig: "",
    DataConfig: "data",
    SplitConfig: "data.split",
    PreprocessConfig: "preprocess",
    AugmentConfig: "augment",
    ModelConfig: "model",
    TrainConfig: "train",
    InferenceConfig: "inference",
    CompareConfig: "compare",
}
"""Each config class and its dotted place in :class:`ExperimentConfig` (the key prefix)."""

_TYPE_ERRORS = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true/false",
    "string_type": "expected a string",
    "dataclass_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    """The pydantic validator of a config class (built once, on first use: ~0.1 s)."""
    return TypeAdapter(cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _optional_arg(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _base(tp: Any) -> Any:
    """The type under ``Optional`` and ``Annotated`` layers."""
    tp = _optional_arg(tp)
    while typing.get_origin(tp) is Annotated:
        tp = _optional_arg(tp.__origin__)
    return tp


def _annotation_at(root: type, loc: tuple[int | str, ...]) -> Any:
    """The annotation of the value at ``loc`` (an error location) below ``root``, or ``None``."""
    tp: Any = root
    for part in loc:
        base = _base(tp)
        if isinstance(part, str) and dataclasses.is_dataclass(base):
            tp = _hints(base).get(part)  # type: ignore[arg-type]
        elif isinstance(part, int) and typing.get_origin(base) is tuple:
            args = typing.get_args(base)
            if len(args) == 2 and args[1] is Ellipsis:
                tp = args[0]
            else:
                tp = args[part] if part < len(args) else None
        elif typing.get_origin(base) is dict:
            tp = typing.get_args(base)[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _metadata(tp: Any) -> tuple[Any, ...]:
    tp = _optional_arg(tp)
    return tuple(getattr(tp, "__metadata__", ())) if typing.get_origin(tp) is Annotated else ()


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _allowed_range(tp: Any, ctx: dict[str, Any]) -> str:
    """``in [0, 1]``, ``> 0``, ... from the field's bounds (or the error's, as a fallback)."""
    bounds: dict[str, Any] = {}
    for m in _metadata(tp):
        for name in ("gt", "ge", "lt", "le"):
            if getattr(m, name, None) is not None:
                bounds[name] = getattr(m, name)
    bounds = bounds or dict(ctx)
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {_num(lo[1])}"
    if hi:
        return f"{'<' if hi[0] == ')' else '<='} {_num(hi[1])}"
    return "in range"


def _hint(tp: Any) -> str:
    texts = [m.text for m in _metadata(tp) if isinstance(m, _Hint)]
    return f" ({'; '.join(texts)})" if texts else ""


def _none_hint(tp: Any, value: Any) -> str:
    """``--set train.grad_clip=None`` reads the string ``'None'``: YAML spells no value ``null``."""
    if not (isinstance(value, str) and value.strip().lower() in ("none", "nil")):
        return ""
    if type(None) not in typing.get_args(tp):  # the field takes no null either
        return ""
    texts = [f"for no value write null, not {value}"]
    texts += [m.text for m in _metadata(tp) if isinstance(m, _Hint)]
    return f" ({'; '.join(texts)})"


def _dotted(prefix: str, loc: tuple[int | str, ...]) -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key = f"{key}.{part}" if key else str(part)
    return key or "config"


def _located_message(root: type, error: Any) -> tuple[tuple[int | str, ...] | None, str]:
    """One pydantic error as ``(where, sentence)``: the sentence names the dotted key, the value
    and what is allowed; ``where`` is the key's place below ``root`` (``None`` for a rule between
    fields, which names its own keys)."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    if error["type"] == "value_error" and isinstance(
        (error.get("ctx") or {}).get("error"), ConfigError
    ):
        return None, _message(root, error)
    if error["type"] == "missing" and loc and isinstance(loc[-1], int):
        return loc[:-1], _message(root, error)
    return loc, _message(root, error)


def _message(root: type, error: Any) -> str:
    """One pydantic error as a sentence naming the dotted key, the value and what is allowed."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    kind: str = error["type"]
    value = error.get("input")
    ctx: dict[str, Any] = error.get("ctx") or {}
    prefix = _SECTIONS[root]
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
        return str(ctx["error"])  # a rule between fields: its message names the keys
    if kind == "invalid_key":
        return f"{_dotted(prefix, loc[:-1])}: key {_show(loc[-1])} is not a name"
    if kind == "unexpected_keyword_argument":
        section = _base(_annotation_at(root, loc[:-1]))
        valid = sorted(f.name for f in dataclasses.fields(section)) if section else []
        return f"unknown config key {_dotted(prefix, loc)}; valid keys here: {', '.join(valid)}"
    if kind in ("missing", "too_short", "too_long") and (
        kind != "missing" or (loc and isinstance(loc[-1], int))
    ):
        where = loc[:-1] if kind == "missing" else loc
        n = len(typing.get_args(_base(_annotation_at(root, where))))
        return f"{_dotted(prefix, where)}: expected {n} values, got {_show(value)}"
    key = _dotted(prefix, loc)
    tp = _annotation_at(root, loc)
    if kind in _RANGE_ERRORS:
        return f"{key}: must be {_allowed_range(tp, ctx)}, got {_show(value)}{_hint(tp)}"
    if kind == "literal_error":
        choices = typing.get_args(_base(tp)) if tp is not None else ()
        allowed = ", ".join(map(repr, choices)) if choices else ctx.get("expected", "?")
        return f"{key}: {_show(value)} is not one of {allowed}"
    if kind == "value_error":
        return f"{key}: {ctx.get('error', error['msg'])}, got {_show(value)}"
    text = _TYPE_ERRORS.get(kind, str(error["msg"]).lower())
    return f"{key}: {text}, got {_show(value)}{_none_hint(tp, value)}"


_Origin = typing.Callable[[tuple[int | str, ...]], str | None]
"""Where the value at a config location came from, as a note for the message (``None``: the
file or the defaults)."""


def _check(cls: type, data: Any, origin: _Origin | None = None, source: str = "") -> Any:
    """Validate ``data`` (a nested dict) as ``cls``; every problem becomes one ConfigError.

    ``origin`` (for :class:`ExperimentConfig`) notes where a bad value came from (``--set``);
    ``source`` (`` in FILE``) ends the message when a problem is not explained by ``origin``.
    """
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda err: err["type"] != "unexpected_keyword_argument")
        messages: list[str] = []
        unexplained = False
        for err in errors:
            where, message = _located_message(cls, err)
            note = origin(where) if origin is not None and where is not None else None
            if note is None:
                unexplained = True
            else:
                message += f" ({note})"
            messages.append(message)
        messages = list(dict.fromkeys(messages))
        text = messages[0]
        if len(messages) > 1:
            text += f" (also: {'; '.join(messages[1:4])}{'; ...' if len(messages) > 4 else ''})"
        raise ConfigError(text + (source if unexplained else "")) from None


def validate(cfg: Any) -> None:
    """Check a config built in code (``dataclasses.replace``, direct construction) with the
    rules :func:`from_dict` applies: types, ranges and the rules between fields.

    ``cfg`` is an :class:`ExperimentConfig` or one of its sections (checked on its own, so rules
    between sections are left out); errors name the full dotted key (``augment.hflip``).

    Raises:
        ConfigError: a value is out of range, of the wrong type, or breaks a rule.
    """
    if type(cfg) not in _SECTIONS:
        raise TypeError(f"validate() takes a marrowscope config dataclass, got {type(cfg)}")
    _check(type(cfg), to_dict(cfg))


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested dict (e.g. parsed YAML).

    Raises:
        ConfigError: an unknown key, a wrong type, a value out of range or a broken rule between
            fields; the message names the dotted key, the value and what is allowed.
    """
    cfg: ExperimentConfig = _check(ExperimentConfig, data or {})
    return cfg


class _DuplicateKeyError(Exception):
    """A mapping names a key twice (raised by :class:`_StrictLoader`, worded by its caller)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line

    def describe(self, *, lines: bool = True) -> str:
        where = f" (lines {self.first_line} and {self.line})" if lines else ""
        return (
            f"key {_show(self.key)} appears twice in one mapping{where}; YAML would silently "
            "keep only the last one, so merge them into one"
        )


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping.

    Plain YAML keeps the last of two equal keys and drops the first without a word (a second
    ``train:`` block replaces the whole first one). Keys brought in by a ``<<: *anchor`` merge
    may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKeyError(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`_StrictLoader` (raises ``_DuplicateKeyError``, YAMLError)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read with YAML rules)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    except _DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e.describe(lines=False)}") from None
    return keys, value


def _merge(dst: dict[str, Any], key: str, value: Any) -> None:
    """Set ``dst[key] = value``, merging a non-empty mapping into the mapping already there key
    by key (recursively), so ``train={lr: 0.5}`` keeps the other ``train`` keys; a scalar, a
    list or an empty mapping ``{}`` (to clear one) replaces what was there."""
    old = dst.get(key)
    if isinstance(value, dict) and value and isinstance(old, dict):
        for k, v in value.items():
            _merge(old, k, v)
    else:
        dst[key] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with ``key.sub=value`` overrides applied.

    A mapping value is merged into the mapping at ``key.sub`` (recursively): ``train={lr: 0.5}``
    sets ``train.lr`` and keeps the other ``train`` keys. A scalar or a list replaces the value;
    ``key={}`` clears a mapping (e.g. ``compare.model_overrides={}``).
    """
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
        _merge(node, keys[-1], copy.deepcopy(value))
    return out


def _provides(keys: list[str], value: Any, loc: tuple[int | str, ...]) -> bool:
    """Whether the override ``keys=value`` set the config value at ``loc``: ``loc`` is ``keys``
    or lies inside ``value`` (a mapping value is merged, so only its own keys count)."""
    if tuple(keys) != loc[: len(keys)]:
        return False
    node = value
    for part in loc[len(keys) :]:
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:  # a scalar in place of a section or list: it replaced everything below
            return True
    return True


def _read_config_file(p: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``p`` (UTF-8, no key twice in one mapping)."""
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {p} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
            f"(line {line}); save it as UTF-8"
        ) from None
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except _DuplicateKeyError as e:
        raise ConfigError(f"config file {p}: {e.describe()}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML experiment config and apply ``--set`` overrides.

    Args:
        path: YAML file (UTF-8), or ``None`` for the defaults.
        overrides: ``key.sub=value`` strings.

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML or names a key twice, or a value
            (from the file or from an override, which the message says) is wrong.
    """
    data = _read_config_file(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    parsed = [(text, *parse_override(text)) for text in overrides]

    def origin(loc: tuple[int | str, ...]) -> str | None:
        for text, keys, value in reversed(parsed):  # the last override of a key wins
            if _provides(keys, value, loc):
                return f"from --set {text}"
        return None

    return _check(ExperimentConfig, data, origin, f" in {path}" if path is not None else "")


def replace(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
    """A copy of ``cfg`` with ``key.sub=value`` overrides applied (validated like a file)."""
    return from_dict(apply_overrides(to_dict(cfg), list(overrides)))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from marrowscope.utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

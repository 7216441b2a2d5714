"""Model registry: the paper's eight networks and any timm model, behind one factory.

``build_model(cfg, num_classes)`` returns a :class:`Classifier`: a network that takes float NCHW
images in [0, 1], normalises them itself with the mean/std that travel with the model, and
returns logits.

* ``paper_cnn``: the paper's custom Keras CNN (:mod:`marrowscope.models.paper_cnn`), trained
  from scratch.
* Every other name is a timm backbone (``num_classes=0``: globally pooled features) followed by
  the paper's head ``BatchNorm1d(F) -> Linear(F, 256) -> ReLU -> Dropout(p) -> Linear(256, n)``.
  The paper's names map onto timm names through :data:`ALIASES`; any other timm name (with an
  optional pretrained tag, ``resnet50.a1_in1k``) is accepted as is.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

from marrowscope.config import ModelConfig, validate
from marrowscope.models.paper_cnn import PaperCNN
from marrowscope.models.weights import (
    ModelError,
    PretrainedWeightsError,
    create_backbone,
    split_tag,
)

__all__ = [
    "ALIASES",
    "PAPER_MODELS",
    "Classifier",
    "ModelError",
    "PretrainedWeightsError",
    "build_model",
    "paper_head",
    "resolve_timm_name",
]

PAPER_MODELS: tuple[str, ...] = (
    "paper_cnn",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b5",
    "resnet50",
    "vgg16",
    "xception",
)
"""The eight models compared in Shah et al. 2025, in the paper's order."""

ALIASES: dict[str, str] = {
    "convnext_small": "convnext_small",
    "convnext_tiny": "convnext_tiny",
    "densenet121": "densenet121",
    "efficientnet_b5": "efficientnet_b5",
    "resnet50": "resnet50",
    "vgg16": "vgg16",
    "xception": "legacy_xception",  # Keras' Xception (timm's "xception" has no weights)
}
"""Paper model name -> timm model name."""


def resolve_timm_name(name: str) -> str:
    """The timm model name for a registry name (alias table first, then timm's own registry).

    Raises:
        ModelError: ``paper_cnn`` (not a timm model), an unknown name, or an unknown tag.
    """
    key = name.strip()
    if key == "paper_cnn":
        raise ModelError("paper_cnn is the paper's own CNN, not a timm model")
    if key in ALIASES:
        return ALIASES[key]
    base, tag = split_tag(key)
    if not timm.is_model(base):
        close = difflib.get_close_matches(key, [*PAPER_MODELS, *timm.list_models()], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model name {name!r}.{hint} Use one of the paper's models "
            f"({', '.join(PAPER_MODELS)}) or any timm model name (list them with "
            "python -c \"import timm; print(timm.list_models('*pattern*'))\")"
        )
    if tag is not None and key not in timm.list_pretrained(f"{base}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        raise ModelError(
            f"timm model {base!r} has no pretrained tag {tag!r}; available: "
            f"{', '.join(tags) or 'none'} (or leave the tag out for the default)"
        )
    return key


def paper_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The paper's classification head, initialised like Keras (Glorot-uniform, zero bias).

    ``BatchNorm1d(F) -> Linear(F, hidden) -> ReLU -> Dropout(p) -> Linear(hidden, num_classes)``.
    """
    head = nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


class Classifier(nn.Module):
    """Images in [0, 1] -> logits, with the normalisation inside the model.

    Attributes:
        backbone: the timm feature extractor (pooled features), or ``None`` for ``paper_cnn``.
        head: the paper's head, or the whole :class:`PaperCNN` for ``paper_cnn``.
        arch: the registry name (``cfg.name``).
        timm_name: the resolved timm name (``None`` for ``paper_cnn``).
        config: the :class:`ModelConfig` the model was built from.
        num_classes: number of logits.
        input_size: side of the square input the model was built for.
        mean: per-channel mean subtracted from the [0, 1] input.
        std: per-channel std the input is divided by.
        weights_source: where the pretrained weights came from (``None``: random init).
        classes: class names in index order when known (set by :func:`load_bundle`).
    """

    def __init__(
        self,
        backbone: nn.Module | None,
        head: nn.Module,
        *,
        arch: str,
        config: ModelConfig,
        num_classes: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        timm_name: str | None = None,
        weights_source: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.timm_name = timm_name
        self.config = config
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.weights_source = weights_source
        self.classes: tuple[str, ...] | None = None
        self._backbone_frozen = False
        self.register_buffer("norm_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.mean: tuple[float, ...] = (0.0, 0.0, 0.0)
        self.std: tuple[float, ...] = (1.0, 1.0, 1.0)
        self.set_normalization(mean, std)

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Set the per-channel mean/std (three values each, std > 0) applied in :meth:`forward`."""
        mean_t = tuple(float(v) for v in mean)
        std_t = tuple(float(v) for v in std)
        if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
            raise ModelError(f"mean/std must be three values each with std > 0; got {mean}, {std}")
        self.mean, self.std = mean_t, std_t
        dev = self.norm_mean.device
        self.norm_mean.copy_(torch.tensor(mean_t, device=dev).view(1, 3, 1, 1))
        self.norm_std.copy_(torch.tensor(std_t, device=dev).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for float images ``(N, 3, H, W)`` in [0, 1]."""
        x = (x - self.norm_mean) / self.norm_std
        if self.backbone is not None:
            x = self.backbone(x)
        return self.head(x)

    # -- training helpers ------------------------------------------------------------------

    @property
    def backbone_frozen(self) -> bool:
        """True while :meth:`freeze_backbone` holds the backbone fixed."""
        return self._backbone_frozen

    def freeze_backbone(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the backbone: no gradients, and eval mode (BatchNorm statistics
        and dropout fixed) even when the model is put in training mode.

        Raises:
            ModelError: freezing ``paper_cnn``, which has no pretrained backbone.
        """
        if self.backbone is None:
            if frozen:
                raise ModelError(
                    f"{self.arch} has no pretrained backbone to freeze (it trains from scratch); "
                    "set train.freeze_epochs=0 for it"
                )
            return
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self._backbone_frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Like :meth:`nn.Module.train`, but a frozen backbone stays in eval mode."""
        super().train(mode)
        if mode and self._backbone_frozen and self.backbone is not None:
            self.backbone.eval()
        return self

    def param_groups(
        self,
        lr: float,
        backbone_lr_scale: float,
        weight_decay: float,
        layer_decay: float | None = None,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: backbone (``lr * backbone_lr_scale``) then head (``lr``).

        With ``layer_decay`` (layer-wise learning-rate decay, as in BEiT and timm's
        ``param_groups_layer_decay``), the backbone is split into its layers by timm's
        ``group_matcher`` (stem, then each block, in order), and the layer ``k`` places below the
        head gets ``lr * backbone_lr_scale * layer_decay**k``: the last block learns almost as
        fast as the head, the stem slowest.

        Biases and normalisation weights (every parameter with fewer than 2 dimensions) get no
        weight decay. Frozen parameters are included, so unfreezing later needs no new optimizer.
        Empty groups are left out; each group has a ``name`` key.

        Raises:
            ModelError: ``layer_decay`` outside (0, 1], or set for a model whose backbone has no
                layer grouping (``paper_cnn``).
        """
        backbone_parts: list[tuple[str, list[nn.Parameter], float]] = []
        if self.backbone is not None:
            if layer_decay is None:
                backbone_parts.append(
                    ("backbone", list(self.backbone.parameters()), lr * backbone_lr_scale)
                )
            else:
                backbone_parts = self._layer_decay_parts(lr * backbone_lr_scale, layer_decay)
        elif layer_decay is not None:
            raise ModelError(
                f"train.layer_decay needs a pretrained backbone split into layers; {self.arch} "
                "trains from scratch as one network: remove train.layer_decay for it"
            )
        parts = [*backbone_parts, ("head", list(self.head.parameters()), lr)]
        groups: list[dict[str, Any]] = []
        for part, members, part_lr in parts:
            decay = [p for p in members if p.ndim >= 2]
            no_decay = [p for p in members if p.ndim < 2]
            for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
                if params:
                    groups.append(
                        {
                            "name": f"{part}_{suffix}",
                            "params": params,
                            "lr": part_lr,
                            "weight_decay": wd,
                        }
                    )
        return groups

    def _layer_decay_parts(
        self, lr: float, layer_decay: float
    ) -> list[tuple[str, list[nn.Parameter], float]]:
        """The backbone's parameters per layer (stem first) with their decayed learning rates."""
        if not 0.0 < layer_decay <= 1.0:
            raise ModelError(f"train.layer_decay must be in (0, 1] (e.g. 0.9), got {layer_decay}")
        assert self.backbone is not None
        matcher = getattr(self.backbone, "group_matcher", None)
        if matcher is None:
            raise ModelError(
                f"train.layer_decay: the {self.arch} backbone has no timm group_matcher to split "
                "it into layers; remove train.layer_decay (or use train.backbone_lr_scale)"
            )
        layer_of = group_parameters(self.backbone, matcher(coarse=False), reverse=True)
        n_layers = max(layer_of.values(), default=0) + 1
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, param in self.backbone.named_parameters():
            by_layer.setdefault(layer_of.get(name, n_layers - 1), []).append(param)
        return [
            (f"backbone_layer{i}", by_layer[i], lr * layer_decay ** (n_layers - i))
            for i in sorted(by_layer)
        ]

    def target_layer(self) -> nn.Module:
        """The module whose output is the last convolutional feature map (for Grad-CAM).

        ``paper_cnn``: its last ``Conv2d -> ReLU`` block. EfficientNet/MobileNetV2 family: the
        final ``conv_head -> bn2`` (what the global pooling sees). Other timm CNNs: the last
        stage in ``feature_info``. Its output is ``(N, C, h, w)`` for CNNs; for vision
        transformers it is a token sequence, which Grad-CAM cannot use directly. The module may
        be an in-place ReLU (e.g. Xception's ``act4``): hook its output tensor, not the module's
        backward.

        Raises:
            ModelError: the backbone reports no feature stages.
        """
        if self.backbone is None:
            assert isinstance(self.head, PaperCNN)
            return self.head.conv3
        from timm.models.efficientnet import EfficientNet

        if isinstance(self.backbone, EfficientNet):
            return self.backbone.bn2
        info = getattr(self.backbone, "feature_info", None)
        if not info:
            raise ModelError(
                f"timm model {self.timm_name!r} reports no feature stages (feature_info); pick a "
                "CNN for Grad-CAM"
            )
        return self.backbone.get_submodule(info[-1]["module"])


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    *,
    input_size: int = 224,
    load_pretrained: bool | None = None,
) -> Classifier:
    """Build the classifier named by ``cfg.name``.

    Args:
        cfg: model config (name, pretrained, weights_file, head and dropout settings).
        num_classes: number of classes (>= 2).
        input_size: side of the square input (fixes paper_cnn's Dense size).
        load_pretrained: load ImageNet weights; ``None`` follows ``cfg.pretrained``. The bundle
            loader passes ``False`` (its weights come from the bundle).

    Raises:
        ConfigError: a ``cfg`` value out of range (see :class:`~marrowscope.config.ModelConfig`).
        ModelError: unknown name, bad settings, or pretrained weights for paper_cnn.
        PretrainedWeightsError: pretrained weights were asked for and cannot be loaded.
    """
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes; got num_classes={num_classes}")
    if input_size < 32:
        raise ModelError(f"input size {input_size} px is too small; use at least 32 (224 is usual)")
    validate(cfg)  # ModelConfig's ranges (head_hidden, dropout rates): cfg may be built in code
    if load_pretrained is None and cfg.weights_file and not cfg.pretrained:
        raise ModelError(
            f"model.weights_file={cfg.weights_file} is set but model.pretrained=false; set "
            "model.pretrained=true to start from that file, or remove model.weights_file"
        )
    pretrained = cfg.pretrained if load_pretrained is None else load_pretrained

    if cfg.name.strip() == "paper_cnn":
        if pretrained:
            raise ModelError(
                "paper_cnn has no pretrained weights (the paper trains it from scratch); set "
                "model.pretrained=false"
            )
        return Classifier(
            None,
            PaperCNN(num_classes, input_size),
            arch="paper_cnn",
            config=cfg,
            num_classes=num_classes,
            input_size=input_size,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
        )

    timm_name = resolve_timm_name(cfg.name)
    backbone, source = create_backbone(timm_name, cfg, pretrained=pretrained)
    in_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    head = paper_head(in_features, cfg.head_hidden, num_classes, cfg.head_dropout)
    data_cfg = timm.data.resolve_model_data_config(backbone)
    return Classifier(
        backbone,
        head,
        arch=cfg.name.strip(),
        config=cfg,
        num_classes=num_classes,
        input_size=input_size,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        timm_name=timm_name,
        weights_source=source,
    )

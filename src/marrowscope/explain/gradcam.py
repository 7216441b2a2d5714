"""Grad-CAM heat maps for a checkpoint's predictions (pytorch-grad-cam on the torch model).

Contract: images go through the bundle's own loading and preprocessing
(:meth:`Predictor.load`, :meth:`Predictor.preprocess`), so a CAM is computed on exactly what the
classifier sees; ``CamResult.rgb`` is that preprocessed RGB ``uint8`` image (``size x size``),
``CamResult.cam`` a ``float32`` map of the same height and width in [0, 1] and
``CamResult.overlay`` the heat map blended over ``rgb`` (RGB ``uint8``).

The target layer is :meth:`Classifier.target_layer` (the last convolutional feature map of every
registered architecture). The CAM runs in fp32 on a copy of the model when the predictor holds a
reduced-precision one; the model's own parameters get no gradients (only the input does), so a
shared predictor keeps no gradient buffers and its weights are never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from marrowscope.defaults import DEFAULT_CAM_METHOD
from marrowscope.models.registry import Classifier, ModelError
from marrowscope.transforms.augment import eval_transform

if TYPE_CHECKING:
    from marrowscope.inference.predictor import Predictor

__all__ = [
    "CAM_METHODS",
    "DEFAULT_METHOD",
    "CamResult",
    "ExplainError",
    "check_method",
    "class_index",
    "compute_cams",
    "gradcam",
    "gradcam_preprocessed",
    "overlay_cam",
]

DEFAULT_BATCH = 16
"""Images per Grad-CAM forward/backward pass (the backward pass keeps activations in memory)."""

CAM_METHODS: dict[str, str] = {
    "gradcam-elementwise": "GradCAMElementWise",
    "gradcam": "GradCAM",
    "layercam": "LayerCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
}
"""The class activation map methods of pytorch-grad-cam that ``method`` may name (all use the
gradients at :meth:`Classifier.target_layer`): ``gradcam`` weights each channel by its mean
gradient (Selvaraju et al. 2017); ``gradcam-elementwise`` multiplies activations and gradients
position by position before the ReLU; ``layercam`` weights each position by its positive
gradient (Jiang et al. 2021); ``gradcam++`` and ``hirescam`` as published."""

DEFAULT_METHOD = DEFAULT_CAM_METHOD
"""The method every command uses unless told otherwise (:data:`marrowscope.defaults.DEFAULT_CAM_METHOD`)."""


class ExplainError(ModelError):
    """Grad-CAM cannot run as asked (unknown class, non-torch backend); the message says why."""


@dataclass(frozen=True)
class CamResult:
    """One image's Grad-CAM.

    Attributes:
        name: the file name (``path``'s last part) or ``image_<i>`` for in-memory images.
        path: the image path, or ``None`` for arrays / PIL images.
        rgb: the preprocessed image the model saw (RGB ``uint8``, ``size x size``).
        cam: the class activation map, ``float32`` ``(H, W)`` in [0, 1] (1 = strongest).
        overlay: the CAM as a JET heat map blended over ``rgb`` (RGB ``uint8``).
        predicted: the predicted class.
        confidence: the predicted class's probability.
        target: the class the CAM explains (the predicted one unless another was asked for).
        target_probability: that class's probability.
        probs: every class's probability, in the model's class order.
    """

    name: str
    path: str | None
    rgb: np.ndarray
    cam: np.ndarray
    overlay: np.ndarray
    predicted: str
    confidence: float
    target: str
    target_probability: float
    probs: np.ndarray


def class_index(classes: Sequence[str], name: str) -> int:
    """Index of class ``name`` (exact match first, then case-insensitive).

    Raises:
        ExplainError: the model has no such class; the message lists its classes.
    """
    names = [str(c) for c in classes]
    if name in names:
        return names.index(name)
    folded = [c.casefold() for c in names]
    if name.casefold() in folded and folded.count(name.casefold()) == 1:
        return folded.index(name.casefold())
    raise ExplainError(
        f"the model has no class {name!r}; its classes are: {', '.join(names)}; pass one of them "
        "(or leave --class out to explain the predicted class)"
    )


def overlay_cam(rgb: np.ndarray, cam: np.ndarray, *, image_weight: float = 0.55) -> np.ndarray:
    """Blend ``cam`` (``(H, W)`` in [0, 1]) as a JET heat map over ``rgb`` (RGB ``uint8``).

    Returns:
        RGB ``uint8`` array of ``rgb``'s shape.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if rgb.shape[:2] != cam.shape:
        raise ValueError(f"CAM shape {cam.shape} does not match image shape {rgb.shape[:2]}")
    base = np.asarray(rgb, dtype=np.float32) / 255.0
    mask = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    return np.ascontiguousarray(
        show_cam_on_image(base, mask, use_rgb=True, image_weight=image_weight)
    )


def _fp32_model(model: Classifier) -> Classifier:
    """``model`` itself when it is fp32, else an fp32 copy (CAMs need full-precision gradients)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes <= {torch.float32}:
        return model
    return copy.deepcopy(model).float()


@contextmanager
def _input_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Run with gradients on (even inside ``inference_mode``) and no parameter gradients."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p, _ in flags:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def compute_cams(
    model: Classifier,
    images: Sequence[np.ndarray],
    targets: Sequence[int] | None = None,
    *,
    batch_size: int = DEFAULT_BATCH,
    method: str = DEFAULT_METHOD,
) -> tuple[np.ndarray, np.ndarray]:
    """Class activation maps and class probabilities for preprocessed images.

    Args:
        model: the classifier (float NCHW input in [0, 1]; it normalises itself).
        images: RGB HWC ``uint8`` arrays at the model's input size.
        targets: class index to explain per image; ``None`` explains each predicted class.
        batch_size: images per forward/backward pass.
        method: one of :data:`CAM_METHODS`.

    Returns:
        ``(cams, probs)``: ``float32`` ``(N, H, W)`` in [0, 1] and ``float32`` ``(N, K)``.

    Raises:
        ExplainError: ``targets`` has the wrong length or an index outside the classes, or
            ``method`` is not one of :data:`CAM_METHODS`.
        ModelError: the architecture has no convolutional feature map to explain.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[check_method(method)])
    n = len(images)
    k = int(model.num_classes)
    if targets is not None:
        if len(targets) != n:
            raise ExplainError(f"{len(targets)} target classes for {n} images")
        bad = [t for t in targets if not 0 <= int(t) < k]
        if bad:
            raise ExplainError(f"target class index {bad[0]} is outside 0..{k - 1}")
    if n == 0:
        return np.zeros((0, model.input_size, model.input_size), np.float32), np.zeros(
            (0, k), np.float32
        )
    net = _fp32_model(model)
    was_training = net.training
    net.eval()
    layer = net.target_layer()
    device = next(net.parameters()).device
    size = int(net.input_size)
    to_tensor = eval_transform(size)
    cams: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    cam = cam_class(model=net, target_layers=[layer])
    try:
        with _input_gradients_only(net):
            for start in range(0, n, max(1, batch_size)):
                chunk = images[start : start + batch_size]
                x = torch.stack([to_tensor(np.asarray(a)) for a in chunk]).to(device)
                x.requires_grad_(True)
                tgt = None
                if targets is not None:
                    tgt = [
                        ClassifierOutputTarget(int(t)) for t in targets[start : start + len(chunk)]
                    ]
                maps = cam(input_tensor=x, targets=tgt)
                if maps.ndim != 3 or maps.shape[0] != len(chunk):
                    raise ModelError(
                        f"Grad-CAM on {net.arch} gave maps of shape {maps.shape}; its target "
                        f"layer {type(layer).__name__} is not a spatial feature map"
                    )
                logits = cam.outputs.detach().float()
                probs.append(torch.softmax(logits, dim=1).cpu().numpy())
                cams.append(np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0))
                cam.outputs = None  # drop the graph
    finally:
        cam.activations_and_grads.release()
        net.train(was_training)
    return np.concatenate(cams), np.concatenate(probs).astype(np.float32)


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`CAM_METHODS`.

    Raises:
        ExplainError: it is not; the message lists them.
    """
    if method not in CAM_METHODS:
        raise ExplainError(f"unknown CAM method {method!r}; use one of: {', '.join(CAM_METHODS)}")
    return method


def _torch_model(predictor: Predictor) -> Classifier:
    if getattr(predictor, "backend", "torch") != "torch":
        raise ExplainError(
            f"Grad-CAM needs the PyTorch model, but this predictor uses the "
            f"{predictor.backend!r} backend; load the checkpoint bundle folder with "
            "backend='torch'"
        )
    return predictor.model


def gradcam_preprocessed(
    predictor: Predictor,
    arrays: Sequence[np.ndarray],
    *,
    names: Sequence[str] | None = None,
    paths: Sequence[str | None] | None = None,
    target_class: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    method: str = DEFAULT_METHOD,
) -> list[CamResult]:
    """Grad-CAM for images already preprocessed with ``predictor.preprocess``.

    The predicted class and the probabilities come from ``predictor.predict_preprocessed`` (the
    same numbers ``predict`` gives); the CAM is computed in fp32 for the predicted class, or for
    ``target_class``.

    Args:
        predictor: a torch-backend predictor.
        arrays: preprocessed RGB ``uint8`` images (``size x size``).
        names: display names (default ``image_<i>``).
        paths: source paths (default ``None`` each).
        target_class: class to explain; ``None`` explains each image's predicted class.
        batch_size: images per forward/backward pass.
        method: one of :data:`CAM_METHODS`.

    Raises:
        ExplainError: unknown ``target_class`` or ``method``, or a non-torch predictor.
    """
    classes = list(predictor.classes_)
    target = None if target_class is None else class_index(classes, target_class)
    model = _torch_model(predictor)
    n = len(arrays)
    # Class and confidence come from the predictor's own path (as in predict and count); the
    # CAM explains that class (or the requested one), computed in fp32.
    probs = np.asarray(predictor.predict_preprocessed(arrays), dtype=np.float32)
    targets = [int(np.argmax(p)) if target is None else target for p in probs]
    cams, _ = compute_cams(model, arrays, targets, batch_size=batch_size, method=method)
    names = list(names) if names is not None else [f"image_{i}" for i in range(n)]
    paths = list(paths) if paths is not None else [None] * n
    out: list[CamResult] = []
    for i in range(n):
        p = probs[i]
        pred = int(np.argmax(p))
        t = targets[i]
        rgb = np.asarray(arrays[i], dtype=np.uint8)
        out.append(
            CamResult(
                name=names[i],
                path=paths[i],
                rgb=rgb,
                cam=cams[i],
                overlay=overlay_cam(rgb, cams[i]),
                predicted=classes[pred],
                confidence=float(p[pred]),
                target=classes[t],
                target_probability=float(p[t]),
                probs=p,
            )
        )
    return out


def gradcam(
    predictor: Predictor,
    images: Sequence[Any],
    *,
    target_class: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    method: str = DEFAULT_METHOD,
) -> list[CamResult]:
    """Grad-CAM for raw images: paths, RGB arrays or PIL images.

    Each image is loaded and preprocessed the way the bundle says, then explained for its
    predicted class, or for ``target_class`` when given.

    Args:
        predictor: a torch-backend :class:`~marrowscope.inference.predictor.Predictor`.
        images: image paths, numpy arrays or PIL images.
        target_class: a class name of the model, or ``None`` for the predicted class.
        batch_size: images per forward/backward pass.
        method: one of :data:`CAM_METHODS`.

    Returns:
        One :class:`CamResult` per image, in order.

    Raises:
        ExplainError: unknown ``target_class`` (the message lists the classes) or a predictor
            without a torch model.
        ImageReadError: an image cannot be read (the message names the file).
    """
    check_method(method)  # fail before decoding anything
    if target_class is not None:
        class_index(predictor.classes_, target_class)
    _torch_model(predictor)
    arrays, names, paths = [], [], []
    for i, img in enumerate(images):
        arrays.append(predictor.preprocess(predictor.load(img)))
        if isinstance(img, (str, Path)):
            names.append(Path(img).name)
            paths.append(str(img))
        else:
            names.append(f"image_{i}")
            paths.append(None)
    return gradcam_preprocessed(
        predictor,
        arrays,
        names=names,
        paths=paths,
        target_class=target_class,
        batch_size=batch_size,
        method=method,
    )

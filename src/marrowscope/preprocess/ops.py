"""The paper's OpenCV preprocessing: resize -> non-local-means denoise -> 3x3 sharpen (after an
optional centre crop).

Every function is pure and keeps the array contract: RGB, HWC, uint8 in -> RGB, HWC, uint8 out.
OpenCV's colour functions assume BGR, so :func:`denoise` converts to BGR and back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from marrowscope.config import PreprocessConfig, from_dict

PREPROCESS_VERSION = 1
"""Bump when the pixels produced for the same parameters change (invalidates every cache)."""

PAPER_SHARPEN_KERNEL = np.array([[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]], dtype=np.float32)
"""Shah et al. 2025 sharpening kernel (sums to 1: flat regions are unchanged)."""

_PIXEL_FIELDS = (
    "size",
    "resize",
    "crop",
    "denoise",
    "denoise_h",
    "denoise_h_color",
    "denoise_template_window",
    "denoise_search_window",
    "sharpen",
)


def check_image(img: Any, what: str = "image") -> np.ndarray:
    """Validate the array contract (RGB, HWC, uint8) and return ``img``.

    Raises:
        ValueError: not a numpy array, not ``(H, W, 3)``, empty, or not uint8.
    """
    if not isinstance(img, np.ndarray):
        raise ValueError(
            f"{what} must be a numpy array (RGB, HWC, uint8), got {type(img).__name__}"
        )
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(
            f"{what} must have shape (H, W, 3) (RGB, HWC), got {img.shape}; "
            "read files with marrowscope.utils.image.read_image"
        )
    if img.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 (0-255), got dtype {img.dtype}; convert with "
            "marrowscope.utils.image.to_rgb_uint8"
        )
    return img


GRAY_TOLERANCE = 20
"""Largest colour spread (max - min of R, G, B) of 99% of the pixels of a grayscale image."""


def is_grayscale(img: np.ndarray, *, tolerance: int = GRAY_TOLERANCE) -> bool:
    """True when an RGB HWC uint8 image carries no stain colour: in 99% of the pixels (of a
    grid of about 10,000: every other pixel of a 250 px crop) the three channels differ by at
    most ``tolerance``. About 0.1 ms for a crop: it runs on every image ``predict`` classifies.

    A grayscale file reaches the models as one channel repeated three times. The preprocessing
    keeps it nearly so (denoise then sharpen spreads the channels of a few pixels by up to ~10:
    hence a percentile, not the maximum, and a tolerance of 20), while real stained cells
    measured 52 or more (raw) and 90 or more (preprocessed) on the bundled sample and 600 other
    bone-marrow and blood cells: the stain's colour is what the models learn.
    """
    check_image(img)
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 10_000)))
    s = img[::step, ::step].astype(np.int16)
    r, g, b = s[..., 0], s[..., 1], s[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return bool(np.count_nonzero(spread > tolerance) <= 0.01 * spread.size)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (aspect ratio is not kept, as in the paper).

    Uses ``cv2.INTER_AREA`` when the pixel count shrinks (no aliasing) and ``cv2.INTER_CUBIC``
    when it grows.

    Args:
        img: RGB HWC uint8.
        size: output height and width in pixels (> 0).
    """
    check_image(img)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"resize size must be a positive integer, got {size!r}")
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img.copy()
    interp = cv2.INTER_AREA if size * size <= h * w else cv2.INTER_CUBIC
    return cv2.resize(img, (int(size), int(size)), interpolation=interp)


def center_crop(img: np.ndarray, fraction: float) -> np.ndarray:
    """The centred square whose side is ``fraction`` of the shorter side (a view, not a copy).

    Args:
        img: RGB HWC uint8.
        fraction: in (0, 1]; 1 keeps the centred square of the shorter side.
    """
    check_image(img)
    if isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"preprocess.crop must be in (0, 1] (e.g. 0.75), got {fraction!r}")
    h, w = img.shape[:2]
    side = max(1, round(min(h, w) * float(fraction)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    return img[y0 : y0 + side, x0 : x0 + side]


def _check_window(name: str, value: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
        or value % 2 == 0
    ):
        raise ValueError(
            f"preprocess.{name} must be a positive odd integer (e.g. 7 or 21), got {value!r}"
        )


def denoise(
    img: np.ndarray,
    *,
    h: float,
    h_color: float,
    template_window: int,
    search_window: int,
) -> np.ndarray:
    """Non-local-means colour denoising (``cv2.fastNlMeansDenoisingColored``).

    Args:
        img: RGB HWC uint8.
        h: luminance filter strength.
        h_color: colour filter strength.
        template_window: odd patch size.
        search_window: odd search area size.
    """
    check_image(img)
    _check_window("denoise_template_window", template_window)
    _check_window("denoise_search_window", search_window)
    if h < 0 or h_color < 0:
        raise ValueError(f"preprocess.denoise_h / denoise_h_color must be >= 0, got {h}, {h_color}")
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    out = cv2.fastNlMeansDenoisingColored(
        bgr, None, float(h), float(h_color), int(template_window), int(search_window)
    )
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def sharpen(img: np.ndarray) -> np.ndarray:
    """Convolve with :data:`PAPER_SHARPEN_KERNEL` (reflected borders, saturated to 0-255)."""
    check_image(img)
    return cv2.filter2D(img, -1, PAPER_SHARPEN_KERNEL, borderType=cv2.BORDER_REFLECT_101)


def preprocess_steps(cfg: PreprocessConfig) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """The configured steps in the paper's order (resize -> denoise -> sharpen, after the optional
    centre crop), named: the one definition of the chain, which :func:`apply_preprocess` runs and
    benchmarks time step by step.

    Each step takes and returns RGB HWC uint8.
    """
    steps: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
    if cfg.crop is not None:
        fraction = cfg.crop
        steps.append(("crop", lambda img: center_crop(img, fraction)))
    if cfg.resize:
        steps.append(("resize", lambda img: resize(img, cfg.size)))
    if cfg.denoise:
        steps.append(
            (
                "denoise",
                lambda img: denoise(
                    img,
                    h=cfg.denoise_h,
                    h_color=cfg.denoise_h_color,
                    template_window=cfg.denoise_template_window,
                    search_window=cfg.denoise_search_window,
                ),
            )
        )
    if cfg.sharpen:
        steps.append(("sharpen", sharpen))
    return steps


def apply_preprocess(img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Run the configured steps in the paper's order: (centre crop ->) resize -> denoise -> sharpen.

    Args:
        img: RGB HWC uint8.
        cfg: which steps and their parameters.

    Returns:
        A new RGB HWC uint8 array (``cfg.size`` square when ``cfg.resize``).

    Raises:
        ValueError: ``img`` breaks the array contract or a parameter is invalid.
    """
    out = check_image(img)
    for _, step in preprocess_steps(cfg):
        out = step(out)
    if np.may_share_memory(out, img):  # no step ran, or only the crop (a view); bounds only
        out = out.copy()
    return np.ascontiguousarray(out)


def preprocess_params(cfg: PreprocessConfig) -> dict[str, Any]:
    """The parameters that decide the output pixels, plus ``version`` (= PREPROCESS_VERSION).

    ``cache_dir`` and ``workers`` are left out, and so is ``crop`` when it is off (bundles written
    before it existed read the same). The dict is JSON-serialisable and is stored in checkpoint
    bundles; :func:`config_from_params` turns it back into a config.
    """
    params: dict[str, Any] = {"version": PREPROCESS_VERSION}
    for name in _PIXEL_FIELDS:
        params[name] = getattr(cfg, name)
    if cfg.crop is None:
        del params["crop"]
    return params


def config_from_params(params: dict[str, Any]) -> PreprocessConfig:
    """Rebuild a :class:`PreprocessConfig` from :func:`preprocess_params` output.

    Raises:
        ValueError: the dict was written by another preprocessing version, has unknown keys or
            a value out of range (a :class:`~marrowscope.config.ConfigError`, naming it).
    """
    version = params.get("version")
    if version != PREPROCESS_VERSION:
        raise ValueError(
            f"preprocessing version {version!r} differs from this marrowscope's "
            f"{PREPROCESS_VERSION}; use the marrowscope version that wrote the checkpoint"
        )
    unknown = sorted(set(params) - set(_PIXEL_FIELDS) - {"version"})
    if unknown:
        raise ValueError(f"unknown preprocessing parameter(s): {', '.join(unknown)}")
    # the checks and conversions of a config file: a hand-edited bundle fails here, not per image
    given = {k: params[k] for k in _PIXEL_FIELDS if k in params}
    return from_dict({"preprocess": given}).preprocess


def _effective_params(cfg: PreprocessConfig) -> dict[str, Any]:
    """Like :func:`preprocess_params` but without parameters of switched-off steps."""
    p = preprocess_params(cfg)
    if not cfg.resize:
        del p["size"]
    if not cfg.denoise:
        for k in (
            "denoise_h",
            "denoise_h_color",
            "denoise_template_window",
            "denoise_search_window",
        ):
            del p[k]
    for k in ("denoise_h", "denoise_h_color", "crop"):
        if k in p:
            p[k] = float(p[k])  # 10 and 10.0 give the same pixels and the same key
    return p


def params_key(cfg: PreprocessConfig) -> str:
    """A short, stable hash (16 hex digits) of the pixel-changing parameters.

    Equal keys mean equal output pixels: ``cache_dir``/``workers`` and the parameters of a
    switched-off step (e.g. ``denoise_h`` with ``denoise=False``) do not change it.
    """
    text = json.dumps(_effective_params(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

"""The checkpoint bundle: a folder with ``model.safetensors`` and ``metadata.json``.

Everything downstream (predict, explain, export, serve, evaluate) rebuilds the model from the
bundle alone: the architecture config, the class names in index order, the input size and the
normalisation travel in ``metadata.json``; the weights in ``model.safetensors`` (CPU fp32).

Saving is atomic at the folder level (:func:`~marrowscope.utils.io.atomic_folder`): the new bundle
is written into a temporary sibling folder, which then takes the old bundle's place in one step
on Linux. Where that cannot be done, the old bundle is renamed to ``DIR.old``, the new one
renamed to ``DIR`` and ``DIR.old`` deleted; if a crash leaves only ``DIR.old``,
:func:`load_bundle` restores it.

Trained bundles also ship inside the package (``marrowscope/pretrained/NAME``, listed with their
sha256 in ``pretrained/index.json``): wherever a bundle folder is expected, a shipped model's name
(``bm8``) works too, unless a file or folder of that name exists in the working directory;
``builtin:bm8`` always names the shipped model (:func:`shipped_name`). A local path of a shipped
name that is not a bundle (``./bm8`` holding something else) is an error that says so, never a
silent choice. Shipped weights may be stored in float16; they are loaded as float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from marrowscope import __version__
from marrowscope.config import to_dict
from marrowscope.metadata import BUNDLE_FORMAT, BundleMetadata, MetadataError
from marrowscope.models.registry import Classifier, ModelError, build_model
from marrowscope.utils.io import atomic_folder, file_sha256, old_folder

__all__ = [
    "BUNDLE_FORMAT",
    "METADATA_NAME",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "PRETRAINED_DIR",
    "SHIPPED_PREFIX",
    "BundleError",
    "BundleMetadata",
    "load_bundle",
    "pretrained_bundle",
    "pretrained_index",
    "read_metadata",
    "read_shipped_index",
    "save_bundle",
    "shadow_error",
    "shadowed_shipped_name",
    "shipped_name",
    "verify_shipped_files",
]

WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "metadata.json"

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
"""Where the shipped bundles live (package data), one folder per name, plus ``index.json``."""

INDEX_NAME = "index.json"

SHIPPED_PREFIX = "builtin:"
"""``builtin:NAME`` names the shipped model ``NAME`` even where a local path ``NAME`` exists (as
``builtin:bm-sample`` names the shipped sample images)."""


class BundleError(ValueError):
    """A checkpoint bundle is missing, damaged or incompatible; the message names path and fix."""


def _is_bundle(directory: Path) -> bool:
    return (directory / METADATA_NAME).is_file() or (directory / WEIGHTS_NAME).is_file()


def save_bundle(
    directory: str | Path,
    model: Classifier,
    metadata: Mapping[str, Any] | BundleMetadata,
    *,
    weights_dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` and ``metadata`` as a bundle folder, replacing an existing bundle atomically.

    The metadata (:class:`~marrowscope.metadata.BundleMetadata`) takes ``architecture``, ``arch``,
    ``input_size``, ``mean``, ``std``, ``format``, ``marrowscope_version`` and
    ``weights_dtype`` from the model and this call; everything else from ``metadata`` (a
    :class:`BundleMetadata`, or a dict of its keys: preprocess params, resolved config, metrics,
    epoch...). ``classes`` comes from ``metadata`` or else ``model.classes``;
    ``weights_source`` from ``metadata`` or else ``model.weights_source``.

    Args:
        directory: the bundle folder (created or replaced).
        model: the classifier (any device/dtype/memory format; saved as contiguous CPU fp32).
        metadata: the bundle's metadata, or a dict of extra information (JSON-serialisable).
        weights_dtype: storage type of the floating-point tensors: ``torch.float32``, or
            ``torch.float16`` for half the size (shipped models; recorded as
            ``weights_dtype``, loaded back as float32).

    Returns:
        The bundle folder.

    Raises:
        ValueError: no class names, or their number differs from ``model.num_classes``; a
            metadata value of the wrong type (:class:`~marrowscope.metadata.MetadataError`).
        BundleError: ``directory`` exists and is not a bundle (it is never replaced then).
        TypeError: metadata that JSON cannot represent.
    """
    directory = Path(directory)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    extra = metadata.to_dict() if isinstance(metadata, BundleMetadata) else dict(metadata)
    classes = extra.get("classes", model.classes)
    if classes is None:
        raise ValueError(
            "save_bundle needs the class names in index order: pass metadata['classes'] "
            "(or set model.classes)"
        )
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise ValueError(
            f"{len(classes)} class names for a model with {model.num_classes} outputs: {classes}"
        )
    if weights_dtype not in (torch.float32, torch.float16):
        raise ValueError(
            f"weights_dtype must be torch.float32 or torch.float16, got {weights_dtype}"
        )
    extra.update(
        weights_dtype=str(weights_dtype).removeprefix("torch."),
        format=BUNDLE_FORMAT,
        marrowscope_version=__version__,
        architecture=to_dict(model.config),
        arch=model.arch,
        classes=classes,
        input_size=model.input_size,
        mean=list(model.mean),
        std=list(model.std),
    )
    extra.setdefault("weights_source", model.weights_source)
    meta = BundleMetadata.from_dict(extra, source=f"metadata for {directory}")
    try:
        meta.to_json()  # fail before touching the disk
    except (TypeError, ValueError) as e:
        raise TypeError(f"bundle metadata is not JSON serialisable: {e}") from None

    if directory.exists() and not directory.is_dir():
        raise BundleError(
            f"{directory} is a file; a checkpoint bundle is a folder; pick another path"
        )
    if directory.is_dir() and any(directory.iterdir()) and not _is_bundle(directory):
        raise BundleError(
            f"refusing to replace {directory}: it is a non-empty folder that is not a checkpoint "
            "bundle (no model.safetensors/metadata.json); pick another path"
        )
    tensors = {
        k: v.detach()
        .to("cpu", weights_dtype if v.is_floating_point() else v.dtype)
        .clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta.write(tmp / METADATA_NAME)

    atomic_folder(directory, write)
    return directory


def pretrained_index(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped models: ``{name: {"description": ..., "files": {file name: sha256}}}``.

    Args:
        root: the folder of shipped models (``None``: :data:`PRETRAINED_DIR`).
    """
    return read_shipped_index(Path(PRETRAINED_DIR if root is None else root) / INDEX_NAME, "model")


def read_shipped_index(path: Path, what: str) -> dict[str, dict[str, Any]]:
    """A list of shipped files (``index.json`` of the models, ``detectors.json`` ...): ``{}``
    when there is none; ``what`` names the kind in the error ("model", "detector").

    Raises:
        BundleError: the file cannot be read or is not a JSON object.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(
            f"{path}: the list of shipped {what}s cannot be read ({e}); reinstall marrowscope"
        ) from None
    if not isinstance(index, dict):
        raise BundleError(f"{path}: expected a JSON object; reinstall marrowscope")
    return index


def verify_shipped_files(folder: Path, files: Mapping[str, str], what: str) -> None:
    """Check that every shipped file of ``folder`` is there with its recorded sha256.

    Raises:
        BundleError: a missing or altered file (names it, the kind and the fix).
    """
    for file, expected in files.items():
        path = folder / file
        if not path.is_file():
            raise BundleError(
                f"{path}: file of the shipped {what} {folder.name!r} is missing; reinstall "
                "marrowscope"
            )
        try:
            digest = file_sha256(path)
        except OSError as e:  # e.g. installed by another user without read permission
            raise BundleError(
                f"{path}: file of the shipped {what} {folder.name!r} cannot be read "
                f"({e.strerror or type(e).__name__}); make it readable (chmod a+r {path}) or "
                "reinstall marrowscope"
            ) from None
        if digest != expected:
            raise BundleError(
                f"{path}: sha256 {digest} does not match the expected {expected} of the shipped "
                f"{what} {folder.name!r} (damaged or replaced file); reinstall marrowscope"
            )


def pretrained_bundle(name: str) -> Path:
    """The folder of the shipped model ``name``, after checking every file's sha256.

    Raises:
        BundleError: unknown name (the message lists the shipped ones), or a missing or
            altered file.
    """
    index = pretrained_index()
    if name not in index:
        known = ", ".join(sorted(index)) or "none in this installation"
        raise BundleError(
            f"unknown pretrained model {name!r}; shipped models: {known} (`marrowscope models` "
            f"lists them), or pass a checkpoint bundle folder{unindexed_hint(name)}"
        )
    folder = PRETRAINED_DIR / name
    verify_shipped_files(folder, index[name]["files"], "model")
    return folder


def unindexed_hint(name: str) -> str:
    """``""``, or — when the package holds a model folder ``name`` that ``index.json`` does not
    list (packing takes a model off the index while it rewrites its files) — the sentence that
    says so and how to fix it."""
    folder = PRETRAINED_DIR / name
    if Path(name).name != name or name in pretrained_index():
        return ""
    if not (folder / METADATA_NAME).is_file():
        return ""
    return (
        f"; {folder} is there but {PRETRAINED_DIR / INDEX_NAME} does not list it (a "
        "`scripts/pack_pretrained.py` run was interrupted, so its files are unchecked): run "
        "it again, or reinstall marrowscope"
    )


def shipped_name(checkpoint: str | os.PathLike[str], *, folder: bool = False) -> str | None:
    """The name of the shipped model that ``checkpoint`` designates, else ``None``.

    ``builtin:NAME`` always designates the shipped model ``NAME``; a bare ``NAME`` does when no
    file or folder of that name exists in the working directory. With ``folder=True`` so does
    the shipped model's own folder (``PRETRAINED_DIR/NAME``, while ``pretrained/index.json``
    lists it): loading it checks its files' sha256 as loading it by name does, and its ONNX and
    int8 exports go where a shipped model's go (the package folder may be read-only).

    Raises:
        BundleError: ``builtin:`` followed by a name that is not a shipped model.
    """
    text = str(checkpoint)
    if text.startswith(SHIPPED_PREFIX):
        name = text[len(SHIPPED_PREFIX) :]
        index = pretrained_index()
        if name not in index:
            known = ", ".join(f"{SHIPPED_PREFIX}{n}" for n in sorted(index)) or "none installed"
            raise BundleError(
                f"unknown shipped model {text!r}; shipped models: {known} (`marrowscope models` "
                f"lists them){unindexed_hint(name)}"
            )
        return name
    p = Path(text).expanduser()
    index = pretrained_index()
    if len(p.parts) == 1 and p.name in index and not p.exists():
        return p.name
    if folder and p.is_dir():
        try:  # by any path to it: relative, through a symbolic link, from inside the package
            real = p.resolve()
            if real.parent == PRETRAINED_DIR.resolve() and real.name in index:
                return real.name
        except OSError:  # pragma: no cover - an unresolvable path is no shipped folder
            return None
    return None


def shadowed_shipped_name(checkpoint: str | os.PathLike[str]) -> str | None:
    """The shipped model's name when ``checkpoint`` is a bare shipped name (``bm8``) that a
    local file or folder which is not a checkpoint bundle hides, else ``None``."""
    p = Path(checkpoint)
    if str(checkpoint).startswith(SHIPPED_PREFIX) or len(p.parts) != 1 or not p.exists():
        return None
    if p.name not in pretrained_index() or (p.is_dir() and _is_bundle(p)):
        return None
    return p.name


def shadow_error(name: str) -> BundleError:
    """The error for a local ``./NAME`` that hides the shipped model ``NAME``."""
    return BundleError(
        f"./{name} hides the shipped model {name}; rename it or pass the shipped model as "
        f"{SHIPPED_PREFIX}{name} (a local path wins over a shipped name, and ./{name} is not a "
        f"checkpoint bundle: no {WEIGHTS_NAME} or {METADATA_NAME})"
    )


def _resolve(directory: str | Path) -> Path:
    """The bundle folder, restoring ``DIR.old`` if an interrupted save left only that; a shipped
    model, by name or by its own folder in the package, after checking its files' sha256."""
    name = shipped_name(directory, folder=True)
    if name is not None:
        return pretrained_bundle(name)
    hidden = shadowed_shipped_name(directory)
    if hidden is not None:
        raise shadow_error(hidden)
    d = Path(directory)
    if d.is_dir():
        if not (d / METADATA_NAME).exists():
            inner = [s for s in ("best", "last") if (d / s / METADATA_NAME).is_file()]
            if inner:  # a training run folder: its bundles are one level down
                raise BundleError(
                    f"{d} is a training run folder, not a checkpoint bundle; pass "
                    + " (or ".join(str(d / s) for s in inner)
                    + ")" * (len(inner) - 1)
                )
        return d
    if d.exists():
        hint = (
            f"; pass the folder {d.parent} instead"
            if d.name in (WEIGHTS_NAME, METADATA_NAME)
            else ""
        )
        raise BundleError(f"{d} is a file, not a checkpoint bundle folder{hint}")
    old = old_folder(d)
    if (old / METADATA_NAME).is_file() and (old / WEIGHTS_NAME).is_file():
        try:
            os.replace(old, d)  # an interrupted save: the previous bundle is complete
        except OSError:
            return old  # read-only location: read it where it is
        return d
    raise BundleError(
        f"{d}: no checkpoint bundle here (expected a folder with {WEIGHTS_NAME} and "
        f"{METADATA_NAME}, e.g. RUN_DIR/best) and no shipped model of that name "
        f"({', '.join(sorted(pretrained_index())) or 'none installed'}); check the path"
        + (unindexed_hint(d.name) if len(d.parts) == 1 else "")
    )


def read_metadata(directory: str | Path) -> BundleMetadata:
    """Read and check a bundle's ``metadata.json`` (a folder, or a shipped model's name).

    Raises:
        BundleError: missing folder or file, invalid JSON, missing keys or wrong values, or a
            newer format.
    """
    return _read_metadata_in(_resolve(directory))


def _read_metadata_in(folder: Path) -> BundleMetadata:
    """``folder/metadata.json`` of a folder :func:`_resolve` returned (checked once there)."""
    try:
        return BundleMetadata.read(folder / METADATA_NAME)
    except MetadataError as e:
        raise BundleError(str(e)) from None


def load_bundle(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[Classifier, BundleMetadata]:
    """Rebuild the model saved in a bundle (no pretrained download) and load its weights strictly.

    Args:
        directory: the bundle folder.
        device: where to put the model (returned in eval mode, ``model.classes`` set).

    Returns:
        ``(model, metadata)``.

    Raises:
        BundleError: missing/corrupt files, a newer format, or weights that do not match.
    """
    d = _resolve(directory)
    meta = _read_metadata_in(d)
    cfg = meta.architecture
    try:
        model = build_model(
            cfg, meta.num_classes, input_size=meta.input_size, load_pretrained=False
        )
        model.set_normalization(meta.mean, meta.std)
    except (ModelError, TypeError, ValueError) as e:
        raise BundleError(f"{d}: cannot rebuild architecture {cfg.name!r}: {e}") from None

    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise BundleError(
            f"{wpath}: missing; the bundle is incomplete; re-save the checkpoint or use another "
            "one (e.g. RUN_DIR/last)"
        )
    try:
        state = load_file(str(wpath), device="cpu")
        # shipped bundles store float16 weights; the model computes in float32
        state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}
    except Exception as e:
        raise BundleError(
            f"{wpath}: corrupt weights file ({type(e).__name__}: {e}); re-save the checkpoint or "
            "use another one (e.g. RUN_DIR/last)"
        ) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise BundleError(
            f"{wpath}: weights do not match architecture {cfg.name!r} with "
            f"{meta.num_classes} classes ({detail}); metadata.json and model.safetensors "
            "come from different models; re-save the checkpoint"
        )
    model.load_state_dict(state, strict=True)
    model.classes = meta.classes
    model.eval()
    model.to(device)
    return model, meta

"""The per-sample count report: one self-contained HTML page a hematologist can read.

:func:`render_count_report` turns the count's numbers (a plain mapping, the same content as
``count.json`` plus the relative paths of the cell pictures) into HTML with a Jinja2 template
(autoescaped: file names such as ``<script>.jpg`` are shown, never run). The bar chart is an
inline SVG drawn with matplotlib (a :class:`~matplotlib.figure.Figure` on its own Agg canvas, no
``pyplot`` state). Pictures are linked relatively (``cells/...``), so the report folder can be
moved or zipped as a whole. No torch here.

The mapping (see :func:`render_count_report`)::

    sample, sample_dir, created (ISO 8601), marrowscope_version
    model: arch, name, classes, bundle_version, checkpoint, backend, input_size, denoise
    settings: threshold, hac_class, hac_min_percent, hac_min_count
    totals: images, identified, unidentified, unreadable, ignored
    differential: [{class, count, percent}]          every class of the model, in model order
    flag: status ("flagged" | "not flagged" | "not available"), message, hac_class, count,
          percent, min_percent, min_count, evidence_note,
          evidence: [{name, probability, cell_image, cam_image}]
    gallery: [{class, count, shown, cells: [{name, confidence, image}]}]
    unidentified: {count, shown, cells: [{name, predicted, confidence, image}]}
    unreadable: [{path, error}]
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from marrowscope.defaults import DEFAULT_CAM_LABEL
from marrowscope.utils.io import atomic_write_text

__all__ = [
    "CELL_NAMES",
    "DISCLAIMER",
    "NON_CELL_CLASSES",
    "count_bar_chart_svg",
    "render_count_report",
    "write_count_report",
]

CELL_NAMES: dict[str, str] = {
    "ABE": "Abnormal eosinophil",
    "ART": "Artefact",
    "BAS": "Basophil",
    "BLA": "Blast",
    "EBO": "Erythroblast",
    "EOS": "Eosinophil",
    "FGC": "Faggot cell",
    "HAC": "Hairy cell",
    "KSC": "Smudge cell",
    "LYI": "Immature lymphocyte",
    "LYT": "Lymphocyte",
    "MMZ": "Metamyelocyte",
    "MON": "Monocyte",
    "MYB": "Myelocyte",
    "NGB": "Band neutrophil",
    "NGS": "Segmented neutrophil",
    "NIF": "Not identifiable",
    "OTH": "Other cell",
    "PEB": "Proerythroblast",
    "PLM": "Plasma cell",
    "PMO": "Promyelocyte",
}
"""The Matek et al. (2021) class abbreviations, spelled out in the report."""

NON_CELL_CLASSES = ("ART", "NIF", "KSC", "OTH")
"""Classes that are not a cell type (artefacts, not identifiable, smudge, other); they are
counted like the others, and the report says so."""

_DISCLAIMER_BODY = (
    "This report is produced by a machine-learning model and is not a "
    "diagnosis. The confidence threshold for the unidentified bin and the hairy-cell flag "
    "thresholds are research settings, not a clinical decision rule; every call, and the "
    "flag in particular, needs review of the cells by a qualified hematologist."
)
DISCLAIMER = f"Research use only. {_DISCLAIMER_BODY}"
"""The statement every count report carries, at the top and at the bottom."""

TEMPLATE = "count_report.html"

_FLAG_STYLE = {"flagged": "flagged", "not flagged": "clear", "not available": "na"}
_BAR = "#4a6fa5"
_BAR_HIGHLIGHT = "#c0392b"


def count_bar_chart_svg(
    differential: Sequence[Mapping[str, Any]],
    *,
    highlight: str | None = None,
    xlabel: str = "% of identified cells",
) -> str:
    """A horizontal bar chart of the differential (percent of identified cells) as SVG text.

    Args:
        differential: ``{class, count, percent}`` per class, in display order (top to bottom).
        highlight: a class drawn in red (the hairy-cell class).
        xlabel: the axis title (what the percentages are of).

    Returns:
        An ``<svg ...>...</svg>`` element (no XML prolog), text kept as text.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [str(r["class"]) for r in differential]
    pct = [float(r["percent"]) for r in differential]
    counts = [int(r["count"]) for r in differential]
    n = max(1, len(names))
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "marrowscope", "font.size": 9}):
        fig = Figure(figsize=(4.6, 0.32 * n + 0.7), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        y = list(range(n))[::-1]
        colours = [_BAR_HIGHLIGHT if c == highlight else _BAR for c in names]
        ax.barh(y[: len(names)], pct, color=colours, height=0.66)
        top = max([*pct, 1.0])
        ax.set_xlim(0, top * 1.22)
        ax.set_yticks(y[: len(names)], names)
        ax.set_xlabel(xlabel)
        for yy, p, c in zip(y, pct, counts, strict=False):
            ax.text(p + top * 0.015, yy, f"{p:.1f}% ({c})", va="center", fontsize=8, color="#333")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        buf = io.StringIO()
        try:
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            fig.clear()
    svg = buf.getvalue()
    svg = svg[svg.find("<svg") :]
    end = svg.find(">")
    # Scale with the page: drop the fixed size in pt, keep the viewBox.
    tag = re.sub(r'\s(?:width|height)="[^"]*"', "", svg[:end])
    return f'{tag} role="img" aria-label="Differential count bar chart"{svg[end:]}'


def _href(rel: str | None) -> str | None:
    """A relative link for a picture inside the report folder (each part URL-quoted)."""
    if not rel:
        return None
    return "/".join(quote(part) for part in Path(rel).as_posix().split("/"))


def _prob(value: Any) -> str:
    """A probability as a whole percentage, rounded down (0.4996 -> 49%, never 50%: a cell just
    below a 50% threshold must not read as reaching it)."""
    if value is None:
        return "—"
    return f"{math.floor(float(value) * 100 + 1e-9):d}%"


def _display_date(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M %Z").strip()
    except (TypeError, ValueError):
        return str(iso)


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("marrowscope.reports", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["href"] = _href
    env.filters["pct"] = lambda v, d=1: f"{float(v):.{d}f}%"
    env.filters["prob"] = _prob
    env.globals["cam_label"] = DEFAULT_CAM_LABEL
    return env


def render_count_report(data: Mapping[str, Any]) -> str:
    """The report page for one sample's count (see the module docstring for ``data``).

    Raises:
        jinja2.UndefinedError: a key the template needs is missing from ``data``.
    """
    from markupsafe import Markup

    flag = data["flag"]
    hac = flag.get("hac_class")
    classes_present = [str(r["class"]) for r in data["differential"]]
    context = dict(data)
    context.update(
        chart=Markup(count_bar_chart_svg(data["differential"], highlight=hac)),
        created_display=_display_date(str(data["created"])),
        flag_style=_FLAG_STYLE.get(str(flag["status"]), "na"),
        cell_names=CELL_NAMES,
        non_cell=[c for c in classes_present if c in NON_CELL_CLASSES],
        disclaimer=DISCLAIMER,
        disclaimer_body=_DISCLAIMER_BODY,
    )
    return _environment().get_template(TEMPLATE).render(**context)


def write_count_report(data: Mapping[str, Any], path: str | Path) -> Path:
    """Render :func:`render_count_report` and write it atomically to ``path``."""
    path = Path(path)
    atomic_write_text(path, render_count_report(data), escape=True)
    return path

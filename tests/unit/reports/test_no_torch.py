"""The pure layers never import torch (nor pyplot's global state), even when drawing a figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE = """
import sys
import marrowscope.metrics, marrowscope.reports
from marrowscope.metrics import classification_metrics, bootstrap_ci
from marrowscope.reports import markdown, plots, tables
m = classification_metrics([0, 1, 1], [0, 1, 0], ["A", "B"])
plots.plot_confusion_matrix(m["confusion_matrix"], m["classes"], sys.argv[1])
bad = sorted(k for k in ("torch", "torchvision", "timm", "matplotlib.pyplot") if k in sys.modules)
print("LOADED:" + ",".join(bad))
"""


def test_metrics_and_reports_do_not_import_torch(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "cm.png")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "LOADED:\n" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "cm.png").stat().st_size > 0

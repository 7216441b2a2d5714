"""marrowscope.reports: figures (PNG), tables (Markdown/CSV) and Markdown reports; no torch.

Submodules are imported explicitly (``from marrowscope.reports.plots import ...``) so that
importing the tables or the Markdown code does not load matplotlib.
"""

from __future__ import annotations

"""marrowscope.reports."""

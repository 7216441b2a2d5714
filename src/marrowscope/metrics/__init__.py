"""marrowscope.metrics."""

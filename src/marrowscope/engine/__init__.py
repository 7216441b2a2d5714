"""marrowscope.engine."""

"""marrowscope.data."""

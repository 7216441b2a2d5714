"""marrowscope.transforms."""

"""marrowscope.models."""

"""marrowscope.cli."""

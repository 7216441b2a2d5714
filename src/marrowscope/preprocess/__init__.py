"""marrowscope.preprocess."""

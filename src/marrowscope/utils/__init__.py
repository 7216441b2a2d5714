"""Small shared helpers. Submodules are imported explicitly; ``image`` and ``io`` never import torch."""

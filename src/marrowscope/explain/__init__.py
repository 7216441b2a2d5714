"""Grad-CAM explanations of a checkpoint's predictions: heat maps, overlays, contact sheets.

* :mod:`marrowscope.explain.gradcam`: ``gradcam(predictor, images, target_class=None)`` -> one
  :class:`~marrowscope.explain.gradcam.CamResult` per image (CAM, overlay, class, confidence).
* :mod:`marrowscope.explain.sheets`: the ``explain`` command's files (an overlay PNG per image,
  contact sheets, ``explain.csv``) and sample-folder listing.

Submodules are imported explicitly, so importing this package does not import torch.
"""

from __future__ import annotations

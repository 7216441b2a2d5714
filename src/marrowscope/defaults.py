"""The defaults that several layers read (the detector, the activation-map method), in one place.

Import-free on purpose: the command line reads it when it starts (``--help`` stays instant), the
review app's settings and the Python API read it too, so the default cannot differ between them.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CAM_LABEL", "DEFAULT_CAM_METHOD", "DEFAULT_DETECTOR"]

DEFAULT_DETECTOR = "wbc2"
"""The white-cell detector of ``detect``, ``count --fields``, ``serve`` and
:meth:`marrowscope.inference.fields.FieldDetector.load`: ``wbc2``, trained with pasted touching
neighbours, which keeps overlapping cells apart far more often than ``wbc1`` and scores the same on
real blood fields (docs/fields.md)."""

DEFAULT_CAM_METHOD = "gradcam-elementwise"
"""The class activation map method of ``explain``, ``count``'s hairy-cell evidence and the review
app (one of :data:`marrowscope.explain.gradcam.CAM_METHODS`): Grad-CAM with activations and
gradients multiplied position by position before the ReLU, instead of each channel weighted by
its mean gradient. Chosen by measurement (docs/explain.md): plain Grad-CAM left 22.5% of 160 real
cells with an empty map on the shipped bm8 and every one of 120 on pbc6 (no position raised the
class's score once the channel weights were averaged); the element-wise form left none, and its
maps were twice as faithful in a deletion test on bm8 (0.50 against 0.25; pbc6 0.64 against
0.01). LayerCAM scores the same on these models but leaves maps empty on architectures whose
last feature map can be negative (ConvNeXt)."""

DEFAULT_CAM_LABEL = "element-wise Grad-CAM"
"""How reports and the review app name :data:`DEFAULT_CAM_METHOD`."""

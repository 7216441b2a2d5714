"""Export a checkpoint bundle to other runtimes: ONNX (fp32, parity check) and OpenVINO int8
(static quantisation, accuracy guard)."""

from __future__ import annotations

from marrowscope.export.int8 import GuardFailedError, Int8Export, export_int8_checkpoint
from marrowscope.export.onnx import ExportError, ParityReport, export_checkpoint, export_onnx

__all__ = [
    "ExportError",
    "GuardFailedError",
    "Int8Export",
    "ParityReport",
    "export_checkpoint",
    "export_int8_checkpoint",
    "export_onnx",
]

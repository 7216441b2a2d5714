"""Export a checkpoint bundle to other runtimes (ONNX), with a parity check."""

from __future__ import annotations

from marrowscope.export.onnx import ExportError, ParityReport, export_checkpoint, export_onnx

__all__ = ["ExportError", "ParityReport", "export_checkpoint", "export_onnx"]

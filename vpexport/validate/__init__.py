"""Compare exported ONNX artifacts with the PyTorch rewritten model (see docs/export.md)."""

from vpexport.validate.compare import format_report, validate_artifacts

__all__ = ["validate_artifacts", "format_report"]

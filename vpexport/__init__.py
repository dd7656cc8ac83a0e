"""vpexport: static-shape visual-token pruning for LLaVA-style models, exported to ONNX/TensorRT/Triton."""

__version__ = "0.1.0"

"""vpexport: static-shape visual-token pruning inside the decoder of multimodal LLMs (LLaVA, Qwen2-VL, Qwen2.5-VL), exported to ONNX/TensorRT/Triton."""

__version__ = "0.1.0"

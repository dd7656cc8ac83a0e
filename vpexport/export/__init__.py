"""ONNX export of the rewritten model (vision, prefill, decode) and its runtime assets."""

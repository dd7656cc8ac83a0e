"""Torch-free runtime for exported artifacts: numpy + Pillow preprocessing, `tokenizers`, ONNX Runtime.

    from vpexport.runtime import ArtifactRuntime
    rt = ArtifactRuntime.open("artifacts/mini_vqa", provider="cpu")
    answers = rt.answer([PIL.Image or path, ...], ["question", ...])   # [{"text", "tokens", "kept"}]

Nothing in this package imports torch or transformers (a test enforces it).
"""

from vpexport.runtime.generate import ArtifactRuntime

__all__ = ["ArtifactRuntime"]

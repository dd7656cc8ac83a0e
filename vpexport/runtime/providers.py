"""The runtimes that execute an artifact folder's graphs: one table, read by the CLI's --provider
choices, `ArtifactRuntime`, validation, bench and the Triton python model.

Every provider runs the same `onnx/*.onnx` files (TensorRT: the `.plan` files built from them
when present); adding one is a module with a `Graphs`-like class (inputs, outputs,
run(name, feeds) -> {output: array}) and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Provider:
    name: str
    runtime: str  # the package that runs the graphs
    device: str
    precisions: tuple[str, ...]  # what --precision accepts ("auto" first); () = the export's precision
    extra: str | None  # the optional dependency group that installs it
    open: Callable  # (artifact_dir, manifest, threads, precision) -> graphs
    summary: str


def _ort(provider: str, share_weights: bool = False):
    def open_(artifact_dir: Path, manifest: dict, threads, precision):
        from vpexport.runtime.session import Graphs

        return Graphs(artifact_dir / "onnx", provider, threads, share_weights=share_weights)

    return open_


def _tensorrt(artifact_dir: Path, manifest: dict, threads, precision):
    from vpexport.runtime.session import Graphs
    from vpexport.runtime.trt_session import TrtGraphs, has_engines

    # The TensorRT plans of `vpexport engine` when built, else ONNX Runtime's TensorRT EP.
    if has_engines(artifact_dir):
        return TrtGraphs(artifact_dir, manifest)
    return Graphs(artifact_dir / "onnx", "tensorrt", threads)


def _openvino(artifact_dir: Path, manifest: dict, threads, precision):
    from vpexport.runtime.ov_session import OvGraphs

    return OvGraphs(artifact_dir / "onnx", threads=threads, precision=precision or "auto")


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("cpu", "onnxruntime", "CPU", (), None, _ort("cpu"), "ONNX Runtime, CPUExecutionProvider"),
        Provider("cpu-shared", "onnxruntime", "CPU", (), None, _ort("cpu", share_weights=True),
                 "ONNX Runtime CPU with prefill and decode on one mapping of onnx/weights.bin: the weights in "
                 "memory once, not pre-packed (prefill slower, docs/export.md)"),
        Provider("cuda", "onnxruntime-gpu", "NVIDIA GPU", (), "gpu", _ort("cuda"), "ONNX Runtime, CUDAExecutionProvider"),
        Provider("tensorrt", "tensorrt", "NVIDIA GPU", (), "gpu", _tensorrt,
                 "TensorRT plans from `vpexport engine` (else ONNX Runtime's TensorRT EP)"),
        Provider("openvino", "openvino", "CPU", ("auto", "f32", "bf16"), "openvino", _openvino,
                 "OpenVINO CPU plugin on the same ONNX files; compiled models cached on disk"),
    )
}
NAMES = tuple(PROVIDERS)
PRECISION_CHOICES = ("auto", "f32", "bf16")


def get(name: str) -> Provider:
    from vpexport.errors import UserInputError

    if name not in PROVIDERS:
        raise UserInputError(f"unknown provider {name!r}", field="--provider", fix=f"use one of {', '.join(NAMES)}")
    return PROVIDERS[name]


def check_precision(name: str, precision: str | None) -> Provider:
    """The provider, after checking that it accepts `precision` (before anything heavy loads)."""
    from vpexport.errors import UserInputError

    p = get(name)
    if precision not in ("auto", None) and precision not in p.precisions:
        raise UserInputError(f"--provider {name} runs at the export's precision; --precision {precision} "
                             "applies to providers that choose one", field="--precision",
                             fix=f"drop --precision, or use --provider {_choosers()}")
    return p


def open_graphs(name: str, artifact_dir: Path, manifest: dict, threads: int | None, precision: str = "auto"):
    return check_precision(name, precision).open(Path(artifact_dir), manifest, threads, precision)


def _choosers() -> str:
    return " / ".join(n for n, p in PROVIDERS.items() if p.precisions)

"""OpenVINO runtime for the exported graphs: the same `onnx/*.onnx` files, no re-export (no torch).

    OvGraphs(onnx_dir, threads, precision, cache_dir)
        the three graphs compiled by `openvino.Core` for the CPU, with `Graphs`' interface
        (.inputs, .outputs, run(name, feeds) -> {output name: array}).

Precision is OpenVINO's `INFERENCE_PRECISION_HINT`: `f32`, or `bf16` where the CPU runs bf16
natively (AMX or avx512_bf16); `auto` picks the fastest the CPU supports (OpenVINO's own default
for the CPU) and the compiled model's property says what was used (`precision` attribute).
Compiled models are cached in `cache_dir` (OpenVINO's `CACHE_DIR`; default
`~/.cache/vpexport/openvino`), keyed by OpenVINO on the model bytes and the properties, so a second
start loads the compiled blob instead of recompiling.

Inputs are passed with `share_inputs=True`: OpenVINO reads the numpy buffers in place (the
decode step's preallocated KV caches are never copied per token); outputs are copied out of the
request (`share_outputs=False`) because the request's buffers are reused by the next call.
"""

from __future__ import annotations

import os
from pathlib import Path

from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError

PRECISIONS = ("auto", "f32", "bf16")
INSTALL = "pip install 'vpexport[openvino]'"


def import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("the openvino package is not installed", field="--provider",
                                 fix=INSTALL) from None
    return ov


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vpexport" / "openvino"


def cpu_precisions(core) -> list[str]:
    """Inference precisions this CPU offers, as the recipe-facing names (`f32`, `bf16`, ...)."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    names = {"FP32": "f32", "BF16": "bf16", "FP16": "f16"}
    return [names[c] for c in caps if c in names]


def _precision_name(value) -> str:
    s = (value.get_type_name() if hasattr(value, "get_type_name") else str(value)).lower()
    return {"float32": "f32", "f32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}.get(s, s)


def _io_name(port) -> str:
    """The ONNX graph's input/output name of a port. OpenVINO also attaches the names of the
    tensors it folded into it (e.g. `/Cast_output_0`, the exporter's internal names start with /)."""
    names = sorted(port.get_names())
    public = [n for n in names if not n.startswith("/")]
    return (public or names)[0]


class OvGraphs:
    NAMES = ("vision", "prefill", "decode")

    def __init__(self, onnx_dir: str | Path, threads: int | None = None, precision: str = "auto",
                 cache_dir: str | Path | None = None):
        ov = import_openvino()
        if precision not in PRECISIONS:
            raise UserInputError(f"unknown precision {precision!r}", field="--precision",
                                 fix=f"use one of {', '.join(PRECISIONS)}")
        core = ov.Core()
        if precision != "auto" and precision not in cpu_precisions(core):
            raise RuntimeUnavailable(f"this CPU has no native {precision} inference "
                                     f"(OpenVINO offers {', '.join(cpu_precisions(core))})",
                                     field="--precision", fix="use --precision f32 or auto")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        except OSError:
            # A read-only home must not stop inference: compile every start instead.
            self.cache_dir = None
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = precision
        self.version = ov.get_version()
        self.compiled, self.requests = {}, {}
        for name in self.NAMES:
            path = Path(onnx_dir) / f"{name}.onnx"
            if not path.is_file():
                raise ArtifactError(f"{path} does not exist", field="artifacts", fix="re-run `vpexport export`")
            try:
                cm = core.compile_model(str(path), "CPU", config)
            except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for any model fault
                raise ArtifactError(f"OpenVINO cannot compile {path}: {str(e).strip().splitlines()[0][:300]}",
                                    field="artifacts", fix="re-run `vpexport export`") from None
            self.compiled[name] = cm
            self.requests[name] = cm.create_infer_request()
        self.precision = _precision_name(self.compiled["prefill"].get_property("INFERENCE_PRECISION_HINT"))
        self.inputs = {n: [_io_name(p) for p in cm.inputs] for n, cm in self.compiled.items()}
        self.outputs = {n: [_io_name(p) for p in cm.outputs] for n, cm in self.compiled.items()}

    def run(self, name: str, feeds: dict) -> dict:
        req = self.requests[name]
        res = req.infer({k: feeds[k] for k in self.inputs[name]}, share_inputs=True, share_outputs=False)
        return {n: res[port] for n, port in zip(self.outputs[name], self.compiled[name].outputs)}

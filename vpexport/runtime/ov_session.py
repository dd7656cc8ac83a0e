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

At f32, projections that read the same activation (q/k/v, gate/up) are merged into one MatMul each
before compiling (vpexport/runtime/ov_fusion.py); the ONNX files stay as exported.

Each graph is compiled for the static input shapes it is called with (the ONNX file's batch and
length axes are dynamic): with static shapes the CPU plugin plans memory once and skips shape
inference per call, measured 3-4 ms of a ~20 ms decode step on the LLaVA-1.5-scale stand-in. A
generation calls decode with one shape throughout (fixed-capacity caches), so this is one compile
per batch size and capacity, loaded from the cache after the first time; the last
`MAX_SHAPES` shapes per graph stay compiled.

The KV caches cross the graph boundary at the inference precision: at bf16 the prefill's
`present.*` and decode's `new.*` outputs and `past.*` inputs are bf16 tensors (`kv_dtype`,
numpy arrays of `ml_dtypes.bfloat16`), set with OpenVINO's PrePostProcessor on the same ONNX
graphs. Kept as f32 they made the plugin compute every key/value in f32 and convert each one out
and back in: on the LLaVA-1.5-scale stand-in on an AMX CPU, 50 of 245 ms of the unpruned prefill
and 19 of 97 ms of the pruned one. Callers that hand in f32 caches (validation does) get them
converted on the way in.

Large inputs are bound to the request as tensors over the caller's numpy buffers (no copy;
OpenVINO reads them in place), and re-bound only when the caller passes a different array: the
decode step's KV caches are the same arrays every step (vpexport/runtime/kv_cache.py), so a step
re-binds none of them (re-binding all 67 inputs each step measured ~1.5 ms of a ~20 ms step).
Small inputs and every output live in arrays bound once per compiled shape (`_Request`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError
from vpexport.runtime.ov_fusion import fuse_parallel_matmuls

PRECISIONS = ("auto", "f32", "bf16")
MAX_SHAPES = 4
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


KV_PREFIXES = ("present.", "past.", "new.")


def _is_kv(name: str) -> bool:
    return name.startswith(KV_PREFIXES)


def _kv_types(ov, precision: str):
    """(OpenVINO element type, numpy dtype) the caches travel in at `precision`."""
    if precision == "bf16":
        import ml_dtypes

        return ov.Type.bf16, np.dtype(ml_dtypes.bfloat16)
    if precision == "f16":
        return ov.Type.f16, np.dtype(np.float16)
    return ov.Type.f32, np.dtype(np.float32)


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
        self._core, self._config = core, config
        self._paths, self._compiled = {}, {}
        self.merged: dict[str, int] = {}  # graph -> MatMuls merged by fuse_parallel_matmuls (last compile)
        self.inputs, self.outputs = {}, {}
        for name in self.NAMES:
            path = Path(onnx_dir) / f"{name}.onnx"
            model = self._read(name, path)
            self._paths[name] = path
            self._compiled[name] = {}
            self.inputs[name] = [_io_name(p) for p in model.inputs]
            self.outputs[name] = [_io_name(p) for p in model.outputs]
            del model  # not kept: the fp32 weights of a read model would stay next to the compiled ones
        # The precision the plugin runs at (what `auto` resolved to), read from a compiled model.
        probe = core.compile_model(core.read_model(str(self._paths["vision"])), "CPU", config)
        self.precision = _precision_name(probe.get_property("INFERENCE_PRECISION_HINT"))
        del probe
        self._kv_type, self.kv_dtype = _kv_types(ov, self.precision)

    def _read(self, name: str, path: Path):
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist", field="artifacts", fix="re-run `vpexport export`")
        try:
            return self._core.read_model(str(path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for any model fault
            raise ArtifactError(f"OpenVINO cannot read {path}: {str(e).strip().splitlines()[0][:300]}",
                                field="artifacts", fix="re-run `vpexport export`") from None

    def _request(self, name: str, feeds: dict):
        key = tuple(np.shape(feeds[k]) for k in self.inputs[name])
        cache = self._compiled[name]
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
            return cache[key]
        # Read per new shape rather than kept: OpenVINO reads the ONNX weights into memory, and a
        # kept fp32 model would double the weights' footprint next to the compiled (bf16) ones.
        model = self._read(name, self._paths[name])
        model.reshape({p: list(shape) for p, shape in zip(model.inputs, key)})
        # Only at f32: on an AMX CPU at bf16 the merged projections were slower (43.6 against 40.6 ms
        # for 32 layers of a 152-token prefill), the plugin's own bf16 kernels doing better unmerged.
        self.merged[name] = fuse_parallel_matmuls(model) if self.precision == "f32" else 0
        if self.kv_dtype != np.float32:
            model = self._kv_at_precision(model)
        try:
            cm = self._core.compile_model(model, "CPU", self._config)
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"OpenVINO cannot compile {name}.onnx for input shapes {key}: "
                                f"{str(e).strip().splitlines()[0][:300]}", field="artifacts",
                                fix="check the inputs against the manifest's export.graphs") from None
        del model
        if len(cache) >= MAX_SHAPES:
            cache.pop(next(iter(cache)))
        cache[key] = _Request(cm, self.outputs[name], self.kv_dtype, self._kv_type)
        return cache[key]

    def _kv_at_precision(self, model):
        """The model with its cache inputs/outputs typed `kv_dtype` (the plugin drops the converts)."""
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        for i, port in enumerate(model.inputs):
            if _is_kv(_io_name(port)):
                ppp.input(i).tensor().set_element_type(self._kv_type)
        for i, port in enumerate(model.outputs):
            if _is_kv(_io_name(port)):
                ppp.output(i).tensor().set_element_type(self._kv_type)
        return ppp.build()

    def run(self, name: str, feeds: dict) -> dict:
        return self._request(name, feeds).run(self.inputs[name], feeds)


class _Request:
    """One compiled shape's infer request and the arrays bound to it.

    Inputs under `SMALL_INPUT` bytes (token, position, mask) are copied into arrays this request
    owns and bound once; larger ones (the caches) are bound over the caller's arrays, no copy, and
    re-bound only when the caller passes a different array. Binding a new tensor each step made the
    next `infer` ~0.5 ms slower on the decode step than writing the same values in place. Outputs
    are written by the request into arrays bound once: reading them back through `get_tensor` cost
    ~8 us per output, ~0.5 ms of a decode step with 65 outputs.
    """

    SMALL_INPUT = 64 * 1024

    def __init__(self, cm, output_names: list, kv_dtype, kv_type):
        import openvino as ov

        self._ov = ov
        self.cm, self.req = cm, cm.create_infer_request()
        self.kv_dtype, self.kv_type = kv_dtype, kv_type
        self.kv_typed = kv_dtype != np.float32
        self.bound: dict = {}  # input name -> the caller's array bound to it
        self.owned: dict = {}  # input name -> this request's array, values copied in per call
        self.output_names = output_names
        self.results = []
        for n, port in zip(output_names, cm.outputs):
            if port.get_partial_shape().is_dynamic:
                self.results = []  # not expected (every input shape is static): read via get_tensor
                break
            a, t = self._array(list(port.get_shape()), self.req.get_tensor(port).data.dtype, _is_kv(n))
            self.req.set_tensor(port, t)
            self.results.append(a)

    def _array(self, shape: list, dtype, kv: bool):
        """A new array and the OpenVINO tensor over its memory (bf16 caches: the same bytes, typed
        by OpenVINO, since numpy has no bf16 of its own)."""
        if self.kv_typed and kv:
            a = np.empty(shape, dtype=self.kv_dtype)
            return a, self._tensor(a)
        a = np.empty(shape, dtype=dtype)
        return a, self._ov.Tensor(a, shared_memory=True)

    def _tensor(self, a: np.ndarray):
        if a.dtype == self.kv_dtype and self.kv_typed:
            return self._ov.Tensor(a.view(np.uint16) if a.dtype.itemsize == 2 else a, list(a.shape), self.kv_type)
        return self._ov.Tensor(a, shared_memory=True)

    def run(self, input_names: list, feeds: dict) -> dict:
        req = self.req
        for port, k in zip(self.cm.inputs, input_names):
            a = feeds[k]
            own = self.owned.get(k)
            if own is not None:
                np.copyto(own, a, casting="same_kind")
                continue
            if self.bound.get(k) is a:
                continue
            kv = _is_kv(k)
            if kv and self.kv_typed:
                a = np.ascontiguousarray(a, dtype=self.kv_dtype)
            elif not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                a = np.ascontiguousarray(a)
            if not kv and a.nbytes <= self.SMALL_INPUT:
                own = a.copy()
                self.owned[k] = own
                req.set_tensor(port, self._tensor(own))
                continue
            req.set_tensor(port, self._tensor(a))
            # Held so its memory outlives the binding. A converted copy never `is` the caller's
            # array, so an input that needed converting is converted again on every call.
            self.bound[k] = a
        req.infer()
        if self.results:
            # Copied: the request writes into the same arrays on the next call.
            return {n: a.copy() for n, a in zip(self.output_names, self.results)}
        out = {}
        for n, port in zip(self.output_names, self.cm.outputs):
            data = req.get_tensor(port).data
            # OpenVINO hands bf16 out as a float16 view of the same bits: retype, then copy.
            out[n] = (data.view(self.kv_dtype) if self.kv_typed and _is_kv(n) else data).copy()
        return out

"""TensorRT plans as drop-in replacements for the runtime's ONNX Runtime sessions (no torch).

    TrtSession(plan_path)      one engine, with ONNX Runtime's InferenceSession call interface:
                               get_inputs() / get_outputs() (objects with .name/.shape/.type) and
                               run(output_names | None, feeds) -> [np.ndarray, ...]
    TrtGraphs(artifact_dir)    the three engines, with `vpexport.runtime.session.Graphs`'
                               interface: .sessions, .inputs, .outputs, run(name, feeds) -> dict

`ArtifactRuntime(..., provider="tensorrt")` uses TrtGraphs when `engines/engines.json` exists
(built by `vpexport engine`), and ONNX Runtime's TensorRT execution provider otherwise.

Execution (TensorRT 10 named-tensor API): per call, `set_input_shape` for every input (checked
against the engine's optimization profile first, so an out-of-range batch / length is one clear
line), `get_tensor_shape` for the outputs (static given the inputs: fixed-k TopK, no NonZero),
`set_tensor_address` on device buffers that are kept and grown as needed, `execute_async_v3`
on a private stream, then a stream synchronize.

Device memory: cuda-python's runtime API (`cuda.bindings.runtime`, or the older `cuda.cudart`)
when installed, else ctypes on the driver library `libcuda.so.1` (see vpexport/engine/cuda.py);
no torch, pycuda or cupy. Host <-> device copies happen on every call (the KV caches travel as
numpy arrays, like with ONNX Runtime); device-resident KV caches are future work.

Before deserializing, the manifest's `engine` section is compared with this machine's TensorRT
version and GPU (`check_plan_compatible`): a plan built elsewhere is refused with a clear line.

UNVERIFIED on TensorRT itself: written against the documented TensorRT 10 Python API and type-checked
with mypy against tensorrt-stubs 10.13, never run with a real TensorRT; the tests run it against an
API-shaped fake.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpexport.engine.build import dims
from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError
from vpexport.runtime.session import Graphs

NEEDS = "--provider tensorrt with engines needs an NVIDIA GPU with TensorRT >= 10"


@dataclass
class TensorInfo:
    """Mimics onnxruntime.NodeArg: name, shape (None for a dynamic axis), type ('tensor(float)')."""

    name: str
    shape: list
    type: str
    dtype: np.dtype


_ORT_TYPE = {"float32": "float", "float16": "float16", "int64": "int64", "int32": "int32", "bool": "bool",
             "int8": "int8", "uint8": "uint8", "float64": "double"}


def load_tensorrt():
    """Import tensorrt lazily (RuntimeUnavailable with what was looked for)."""
    from vpexport.engine.build import import_tensorrt

    return import_tensorrt(NEEDS, tail="")


class TrtSession:
    def __init__(self, plan_path: str | Path, *, cuda=None, runtime=None, version_compatible: bool = False):
        from vpexport.engine.cuda import cuda_backend

        self.path = Path(plan_path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} does not exist", field="artifacts", fix="run `vpexport engine ARTIFACT_DIR` on this machine")
        load_tensorrt()  # one line (exit 5) when missing or older than 10
        import tensorrt as trt  # typed by tensorrt-stubs (tests/test_trt_types.py)
        try:
            self.cuda = cuda or cuda_backend()
        except RuntimeUnavailable as e:
            raise RuntimeUnavailable(f"{NEEDS}: {e}", fix="install the NVIDIA driver (and optionally pip install cuda-python)") from None
        self.cuda.set_device(0)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._stream = None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = runtime or trt.Runtime(self.logger)
        if version_compatible:
            # version-compatible plans embed their lean runtime (host code): allowed because we built them
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot deserialize {self.path}",
                field="artifacts",
                fix="rebuild the plans on this machine: vpexport engine ARTIFACT_DIR",
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeUnavailable(f"cannot create a TensorRT execution context for {self.path} (out of GPU memory?)")
        self._stream = self.cuda.stream_create()
        self._in: list[TensorInfo] = []
        self._out: list[TensorInfo] = []
        self.profile: dict[str, dict[str, list[int]]] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dt = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = dims(self.engine.get_tensor_shape(name))
            info = TensorInfo(name, [d if d >= 0 else None for d in shape], f"tensor({_ORT_TYPE.get(dt.name, dt.name)})", dt)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._in.append(info)
                if any(d < 0 for d in shape):
                    lo, mid, hi = self.engine.get_tensor_profile_shape(name, 0)
                    self.profile[name] = {"min": dims(lo), "opt": dims(mid), "max": dims(hi)}
            else:
                self._out.append(info)

    # ---- onnxruntime.InferenceSession look-alike
    def get_inputs(self) -> list[TensorInfo]:
        return list(self._in)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._out)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap or not ptr:
            if ptr:
                self.cuda.free(ptr)
            cap = max(int(nbytes), 1)
            ptr = self.cuda.malloc(cap)
            self._buffers[name] = (ptr, cap)
        return ptr

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        from vpexport.engine.profiles import check_within

        missing = [t.name for t in self._in if t.name not in feeds]
        if missing:
            raise UserInputError(f"{self.path.name}: missing inputs {', '.join(missing)}", field="feeds")
        host_in = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self._in}
        why = check_within(self.profile, {n: a.shape for n, a in host_in.items()}, where=self.path.name)
        if why:
            raise UserInputError(why, field="engines", fix="rebuild with a larger export.batch.max / text_length.max / max_new_tokens, or use --provider cpu")
        ctx, handle = self.context, self.cuda.stream_handle(self._stream)
        for t in self._in:
            a = host_in[t.name]
            if not ctx.set_input_shape(t.name, tuple(a.shape)):
                raise UserInputError(f"{self.path.name}: TensorRT rejects shape {tuple(a.shape)} for input {t.name}", field="feeds")
            ptr = self._buffer(t.name, a.nbytes)
            if a.nbytes:
                self.cuda.htod_async(ptr, a.ctypes.data, a.nbytes, self._stream)
            ctx.set_tensor_address(t.name, ptr)
        host_out = {}
        for t in self._out:
            shape = tuple(dims(ctx.get_tensor_shape(t.name)))
            if any(d < 0 for d in shape):
                raise ArtifactError(
                    f"{self.path.name}: output {t.name} has a data-dependent shape {shape}",
                    field="engines",
                    fix="re-export with fixed TopK k (no NonZero); vpexport's export never produces such outputs",
                )
            a = np.empty(shape, dtype=t.dtype)
            host_out[t.name] = a
            ctx.set_tensor_address(t.name, self._buffer(t.name, a.nbytes))
        if not ctx.execute_async_v3(handle):
            raise RuntimeUnavailable(f"TensorRT execution of {self.path.name} failed (see the TensorRT log above)")
        for t in self._out:
            a = host_out[t.name]
            if a.nbytes:
                self.cuda.dtoh_async(a.ctypes.data, self._buffers[t.name][0], a.nbytes, self._stream)
        self.cuda.stream_sync(self._stream)
        names = output_names or [t.name for t in self._out]
        return [host_out[n] for n in names]

    def close(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            try:
                cuda.free(ptr)
            except Exception:
                pass
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            try:
                cuda.stream_destroy(self._stream)
            except Exception:
                pass
            self._stream = None
        self.context = None
        self.engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TrtGraphs(Graphs):
    """The artifact folder's engines with `Graphs`' interface: run(name, feeds) -> {output: array}."""

    def __init__(self, artifact_dir: str | Path, manifest: dict | None = None, warn=None):
        from vpexport.engine.build import current_environment, require_gpu
        from vpexport.engine.compat import check_plan_compatible
        from vpexport.manifest import read_manifest

        art = Path(artifact_dir)
        manifest = manifest if manifest is not None else read_manifest(art)
        section = manifest.get("engine")
        if not section:
            raise ArtifactError(f"{art} has no engine section in its manifest", field="artifacts",
                                fix="run `vpexport engine ARTIFACT_DIR` on this machine")
        load_tensorrt()
        import tensorrt as trt

        env = current_environment(trt, require_gpu(NEEDS, tail=""))
        for w in check_plan_compatible(section, env, where=str(art / "engines")):
            (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(w)
        plans = section.get("plans") or {n: f"engines/{n}.plan" for n in self.NAMES}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if section.get("version_compatible"):
            runtime.engine_host_code_allowed = True
        self._bind({
            n: TrtSession(art / plans[n], runtime=runtime, version_compatible=bool(section.get("version_compatible")))
            for n in self.NAMES
        })
        self._runtime = runtime

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()


def has_engines(artifact_dir: str | Path) -> bool:
    """True when `vpexport engine` has written plans into the folder (engines/engines.json)."""
    return (Path(artifact_dir) / "engines" / "engines.json").is_file()

"""A minimal CUDA layer for the TensorRT builder and runner: no torch, no pycuda.

Two backends with one interface (`CudaBackend`):

* `cuda-python` (preferred): `cuda.bindings.runtime` (cuda-python >= 12.6) or the older
  `cuda.cudart` module. Every call returns `(err, *values)`; a non-zero `err` raises.
* `ctypes` on the driver library `libcuda.so.1` (fallback): always present where an NVIDIA
  driver is installed (servers and Jetson/JetPack alike), so the runner works with only
  `tensorrt` installed. It retains the device's primary context, which is the context the CUDA
  runtime (and therefore TensorRT) uses, so pointers are shared between the two.

`probe_gpu()` never raises: it returns a `GpuProbe` that says what was found or what was looked
for, so `vpexport engine` can print one line and exit 5 on a machine without a GPU.

NOTE: nothing in this file has run on a GPU in the session that wrote it (no GPU was available);
the CPU-side paths (backend selection, the no-GPU probe) are unit-tested.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
from dataclasses import dataclass, field

from vpexport.errors import RuntimeUnavailable


@dataclass
class GpuProbe:
    ok: bool
    name: str = ""
    compute_capability: str = ""  # "8.7"
    total_memory: int = 0  # bytes
    count: int = 0
    backend: str = ""  # "cuda-python" | "libcuda"
    looked_for: list[str] = field(default_factory=list)  # what was tried, for the error line
    reason: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "compute_capability": self.compute_capability,
            "total_memory": self.total_memory,
            "count": self.count,
        }


# --------------------------------------------------------------------------- cuda-python
def _import_cudart():
    """cuda-python's runtime module under either of its names, or None."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(mod)
        except Exception:  # ImportError, or a broken install raising anything else
            continue
    return None


class CudaPythonBackend:
    name = "cuda-python"

    def __init__(self, cudart=None):
        self.rt = cudart or _import_cudart()
        if self.rt is None:
            raise RuntimeUnavailable("cuda-python is not installed")

    def _check(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            try:
                msg = self.rt.cudaGetErrorString(err)[1].decode()
            except Exception:
                msg = str(err)
            raise RuntimeUnavailable(f"CUDA error: {msg}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def device_count(self) -> int:
        return int(self._check(self.rt.cudaGetDeviceCount()))

    def device_info(self, dev: int = 0) -> dict:
        p = self._check(self.rt.cudaGetDeviceProperties(dev))
        name = p.name.decode(errors="replace") if isinstance(p.name, (bytes, bytearray)) else str(p.name)
        return {
            "name": name.split("\x00", 1)[0].strip(),
            "compute_capability": f"{p.major}.{p.minor}",
            "total_memory": int(p.totalGlobalMem),
        }

    def set_device(self, dev: int = 0) -> None:
        self._check(self.rt.cudaSetDevice(dev))

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr))

    def stream_create(self):
        return self._check(self.rt.cudaStreamCreate())

    def stream_handle(self, stream) -> int:
        try:
            return int(stream)  # cudaStream_t converts to its address
        except TypeError:
            return int(stream.getPtr())

    def stream_sync(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream) -> None:
        self._check(self.rt.cudaStreamDestroy(stream))

    def htod_async(self, dst: int, host_ptr: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, host_ptr, nbytes, kind, stream))

    def dtoh_async(self, host_ptr: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host_ptr, src, nbytes, kind, stream))

    def dtod_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream))


# --------------------------------------------------------------------------- libcuda (driver API, ctypes)
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


def _load_libcuda():
    names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda") or "", "nvcuda.dll"]
    for n in names:
        if not n:
            continue
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    return None


class LibcudaBackend:
    name = "libcuda"

    def __init__(self, lib=None):
        self.lib = lib or _load_libcuda()
        if self.lib is None:
            raise RuntimeUnavailable("libcuda.so.1 (the NVIDIA driver library) was not found")
        self._ctx = None
        self._check(self.lib.cuInit(0), "cuInit")

    def _check(self, rc, what: str):
        if rc != 0:
            s = ctypes.c_char_p()
            try:
                self.lib.cuGetErrorString(rc, ctypes.byref(s))
                msg = s.value.decode() if s.value else str(rc)
            except Exception:
                msg = str(rc)
            raise RuntimeUnavailable(f"CUDA driver error in {what}: {msg}")

    def device_count(self) -> int:
        n = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        return n.value

    def _device(self, dev: int):
        d = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(d), dev), "cuDeviceGet")
        return d

    def device_info(self, dev: int = 0) -> dict:
        d = self._device(dev)
        buf = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(buf, 256, d), "cuDeviceGetName")
        major, minor, mem = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, d), "cuDeviceGetAttribute")
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, d), "cuDeviceGetAttribute")
        self._check(self.lib.cuDeviceTotalMem_v2(ctypes.byref(mem), d), "cuDeviceTotalMem")
        return {
            "name": buf.value.decode(errors="replace").strip(),
            "compute_capability": f"{major.value}.{minor.value}",
            "total_memory": int(mem.value),
        }

    def set_device(self, dev: int = 0) -> None:
        # The runtime API (TensorRT) works in the device's primary context: retain and bind it.
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._device(dev)), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._ctx = ctx

    def malloc(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(max(int(nbytes), 1))), "cuMemAlloc")
        return int(p.value)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def stream_create(self):
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), 0), "cuStreamCreate")
        return s

    def stream_handle(self, stream) -> int:
        return int(stream.value or 0)

    def stream_sync(self, stream) -> None:
        self._check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def stream_destroy(self, stream) -> None:
        self._check(self.lib.cuStreamDestroy_v2(stream), "cuStreamDestroy")

    def htod_async(self, dst: int, host_ptr: int, nbytes: int, stream) -> None:
        self._check(
            self.lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_void_p(host_ptr), ctypes.c_size_t(nbytes), stream),
            "cuMemcpyHtoDAsync",
        )

    def dtoh_async(self, host_ptr: int, src: int, nbytes: int, stream) -> None:
        self._check(
            self.lib.cuMemcpyDtoHAsync_v2(ctypes.c_void_p(host_ptr), ctypes.c_uint64(src), ctypes.c_size_t(nbytes), stream),
            "cuMemcpyDtoHAsync",
        )

    def dtod_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        self._check(
            self.lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes), stream),
            "cuMemcpyDtoDAsync",
        )


# --------------------------------------------------------------------------- selection
def cuda_backend(prefer: str | None = None):
    """cuda-python if importable (or `prefer='libcuda'`), else the driver library; raises RuntimeUnavailable."""
    order: list[type[LibcudaBackend] | type[CudaPythonBackend]] = (
        [LibcudaBackend, CudaPythonBackend] if prefer == "libcuda" else [CudaPythonBackend, LibcudaBackend])
    errors = []
    for cls in order:
        try:
            return cls()
        except RuntimeUnavailable as e:
            errors.append(str(e))
        except Exception as e:  # a broken driver install: report, do not crash
            errors.append(f"{cls.name}: {e}")
    raise RuntimeUnavailable("no CUDA access: " + "; ".join(errors))


def probe_gpu() -> GpuProbe:
    """What GPU this process can see. Never raises."""
    looked = ["cuda-python (cuda.bindings.runtime / cuda.cudart)", "the NVIDIA driver library libcuda.so.1"]
    try:
        be = cuda_backend()
    except RuntimeUnavailable as e:
        return GpuProbe(ok=False, looked_for=looked, reason=str(e))
    try:
        n = be.device_count()
        if n < 1:
            return GpuProbe(ok=False, backend=be.name, looked_for=looked, reason="no CUDA device is visible")
        info = be.device_info(0)
    except Exception as e:
        return GpuProbe(ok=False, backend=be.name, looked_for=looked, reason=str(e))
    return GpuProbe(ok=True, count=n, backend=be.name, looked_for=looked, **info)

"""The decoder weights stored once for prefill.onnx and decode.onnx.

Both graphs hold the same decoder, embedding and lm_head weights (under different initializer
names: the TorchScript exporter names transposed weights by node). `share_weights` moves every
initializer of at least SHARE_MIN_BYTES into one file, `onnx/weights.bin`, each distinct tensor
(by content) once, 4096-byte aligned, and leaves the graphs as plain ONNX files whose initializers
reference it by offset (ONNX external data: location / offset / length). Any ONNX consumer reads
them as usual (onnx.load, ONNX Runtime, OpenVINO, TensorRT's parser); vpexport's own ONNX Runtime
sessions go further and map the file once for both graphs (`SharedWeights`), so the weights are in
memory once too.

The rewrite streams one tensor at a time (never a whole graph's weights in memory).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

SHARED_FILE = "weights.bin"
SHARED_GRAPHS = ("prefill", "decode")
SHARE_MIN_BYTES = 1024
ALIGN = 4096


def _tensor_bytes(t, graph_dir: Path, handles: dict) -> bytes:
    """The raw little-endian bytes of an initializer, from its external file or from the proto."""
    import onnx
    from onnx import numpy_helper

    if t.data_location == onnx.TensorProto.EXTERNAL:
        ed = {e.key: e.value for e in t.external_data}
        f = handles.get(ed["location"])
        if f is None:
            f = handles[ed["location"]] = open(graph_dir / ed["location"], "rb")
        f.seek(int(ed.get("offset", 0)))
        n = ed.get("length")
        return f.read(int(n)) if n is not None else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def share_weights(onnx_dir: str | Path, graphs=SHARED_GRAPHS, log=None) -> dict:
    """Rewrite `graphs` in `onnx_dir` to keep their large initializers in onnx_dir/weights.bin,
    deduplicated by content; removes the graphs' own external-data files. Returns
    {"file", "bytes", "tensors", "references", "saved_bytes"}."""
    import onnx

    d = Path(onnx_dir)
    offsets: dict[str, tuple[int, int]] = {}
    refs = saved = 0
    old_files: set[Path] = set()
    tmp = d / f".{SHARED_FILE}.tmp"
    with open(tmp, "wb") as out:
        pos = 0
        for g in graphs:
            path = d / f"{g}.onnx"
            m = onnx.load(str(path), load_external_data=False)
            handles: dict = {}
            try:
                for t in m.graph.initializer:
                    if t.data_location == onnx.TensorProto.EXTERNAL:
                        old_files.add(d / {e.key: e.value for e in t.external_data}["location"])
                    data = _tensor_bytes(t, d, handles)
                    if len(data) < SHARE_MIN_BYTES:
                        continue
                    key = hashlib.sha256(data).hexdigest() + f":{t.data_type}:{list(t.dims)}"
                    if key in offsets:
                        saved += len(data)
                    else:
                        pad = (-pos) % ALIGN
                        out.write(b"\0" * pad)
                        pos += pad
                        out.write(data)
                        offsets[key] = (pos, len(data))
                        pos += len(data)
                    off, n = offsets[key]
                    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        t.ClearField(field)
                    t.data_location = onnx.TensorProto.EXTERNAL
                    del t.external_data[:]
                    for k, v in (("location", SHARED_FILE), ("offset", str(off)), ("length", str(n))):
                        e = t.external_data.add()
                        e.key, e.value = k, v
                    refs += 1
            finally:
                for f in handles.values():
                    f.close()
            # Written next to the original first: the old external file is still read above.
            new = d / f".{g}.onnx.shared"
            onnx.save_model(m, str(new))
            new.replace(path)
            del m
    tmp.replace(d / SHARED_FILE)
    for f in old_files:
        if f.name != SHARED_FILE:
            f.unlink(missing_ok=True)
    total = (d / SHARED_FILE).stat().st_size
    if log:
        log(f"[export] {SHARED_FILE}: {len(offsets)} tensors, {total / 2**20:.1f} MiB for "
            f"{' and '.join(graphs)} ({saved / 2**20:.1f} MiB stored once instead of twice)")
    return {"file": SHARED_FILE, "bytes": total, "tensors": len(offsets), "references": refs, "saved_bytes": saved}


def external_files(path: str | Path) -> list[str]:
    """The external-data files an ONNX graph references (relative to its folder)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
           for e in t.external_data if e.key == "location"}
    return sorted(out)


@dataclass
class _Ref:
    name: str
    dtype: object
    dims: tuple
    offset: int
    length: int


class SharedWeights:
    """onnx/weights.bin mapped once; `initializers(graph_path)` gives that graph's shared
    initializers as ONNX Runtime OrtValues over the one mapping (the same OrtValue for the same
    offset in every graph), for SessionOptions.add_initializer."""

    def __init__(self, onnx_dir: str | Path):
        import numpy as np

        self.dir = Path(onnx_dir)
        self.path = self.dir / SHARED_FILE
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._values: dict[int, object] = {}

    @classmethod
    def find(cls, onnx_dir: str | Path) -> "SharedWeights | None":
        return cls(onnx_dir) if (Path(onnx_dir) / SHARED_FILE).is_file() else None

    def _refs(self, graph_path: Path) -> list[_Ref]:
        import onnx

        m = onnx.load(str(graph_path), load_external_data=False)
        out = []
        for t in m.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ed = {e.key: e.value for e in t.external_data}
            if ed.get("location") != SHARED_FILE:
                continue
            out.append(_Ref(t.name, onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims),
                            int(ed.get("offset", 0)), int(ed["length"])))
        return out

    def initializers(self, graph_path: str | Path) -> list[tuple[str, object]]:
        import numpy as np
        import onnxruntime as ort

        from vpexport.errors import ArtifactError

        pairs = []
        for r in self._refs(Path(graph_path)):
            if r.offset + r.length > self._map.size:
                raise ArtifactError(f"{self.path} is shorter than {Path(graph_path).name} expects "
                                    f"({r.name} ends at byte {r.offset + r.length})", field="artifacts",
                                    fix="re-run `vpexport export`")
            v = self._values.get(r.offset)
            if v is None:
                dt = np.dtype(r.dtype)
                a = np.frombuffer(self._map, dtype=dt, count=r.length // dt.itemsize, offset=r.offset).reshape(r.dims)
                v = self._values[r.offset] = ort.OrtValue.ortvalue_from_numpy(a)
            pairs.append((r.name, v))
        return pairs

"""`engines/engines.json`: what was built, with each engine's bindings (I/O tensors) and shapes.
Pure Python (the dicts are filled from TensorRT in build.py), so formatting is tested on CPU.

    {"format": 1, "tensorrt": "10.3.0", "gpu": {...}, "precision": "fp16", ...,
     "engines": [{"segment": "vision", "onnx": "onnx/vision.onnx", "plan": "engines/vision.plan",
                  "bytes": 123, "build_seconds": 4.2, "device_memory": 456,
                  "bindings": [{"name": "pixel_values", "mode": "input", "dtype": "float32",
                                "shape": [-1, 3, 336, 336],
                                "profile": {"min": [1, ...], "opt": [4, ...], "max": [8, ...]}}, ...]}]}
"""

from __future__ import annotations

ENGINES_JSON = "engines.json"
FORMAT = 1


def binding(name: str, mode: str, dtype: str, shape, profile: dict | None = None) -> dict:
    d: dict[str, object] = {"name": name, "mode": mode, "dtype": dtype, "shape": [int(x) for x in shape]}
    if profile is not None:
        d["profile"] = {k: [int(x) for x in profile[k]] for k in ("min", "opt", "max")}
    return d


def _shape(s) -> str:
    return "(" + ", ".join("?" if int(x) < 0 else str(x) for x in s) + ")"


def _bytes(x: int) -> str:
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= s:
            return f"{x / s:.1f} {unit}"
    return f"{x} B"


def format_engines(doc: dict, max_bindings: int = 12) -> str:
    """A human-readable summary of engines.json: one block per engine, one line per binding.

    Long binding lists (per-layer KV caches) are cut to `max_bindings` with a count of the rest.
    """
    gpu = doc.get("gpu") or {}
    flags = [doc.get("precision", "?")]
    if doc.get("version_compatible"):
        flags.append("version-compatible")
    lines = [
        f"TensorRT {doc.get('tensorrt', '?')} on {gpu.get('name', '?')} (compute capability "
        f"{gpu.get('compute_capability', '?')}), {', '.join(flags)}, workspace {doc.get('workspace_gb', '?')} GB"
    ]
    for e in doc.get("engines", []):
        extra = f", device memory {_bytes(e['device_memory'])}" if e.get("device_memory") is not None else ""
        lines.append(
            f"{e['segment']}: {e['plan']} ({_bytes(int(e.get('bytes', 0)))}, built in {e.get('build_seconds', 0):.1f} s{extra})"
        )
        bs = e.get("bindings", [])
        for b in bs[:max_bindings]:
            arrow = "in " if b["mode"] == "input" else "out"
            row = f"  {arrow} {b['name']:<24} {b['dtype']:<8} {_shape(b['shape'])}"
            if "profile" in b:
                p = b["profile"]
                row += f"  min {_shape(p['min'])} opt {_shape(p['opt'])} max {_shape(p['max'])}"
            lines.append(row)
        if len(bs) > max_bindings:
            lines.append(f"  ... {len(bs) - max_bindings} more bindings (see engines/{ENGINES_JSON})")
    return "\n".join(lines)

"""ONNX Runtime sessions for the exported graphs (providers: cpu | cuda | tensorrt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def providers_for(name: str) -> list[str]:
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise UserInputError(f"unknown provider {name!r}", field="--provider", fix="use cpu, cuda or tensorrt")
    want = PROVIDERS[name]
    have = ort.get_available_providers()
    if want[0] not in have:
        raise RuntimeUnavailable(
            f"ONNX Runtime here has no {want[0]} (available: {', '.join(have)})",
            field="--provider",
            fix="use --provider cpu, or install onnxruntime-gpu with CUDA/TensorRT",
        )
    return want


def make_session(path: str | Path, provider: str = "cpu", threads: int | None = None, shared=None):
    """An ONNX Runtime session of one graph. `shared`: the folder's SharedWeights
    (vpexport/export/shared_weights.py); the graph's initializers in weights.bin then come from its
    one mapping instead of a copy per session, and are used as they are, not pre-packed: a
    pre-packed copy per session would hold the weights twice again."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist", field="artifacts", fix="re-run `vpexport export`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Masked attention entries leave MLAS's softmax as exp(-88.4) ~ 4e-39, a denormal; every add and
    # multiply on those (softmax sums, the PV MatMul) takes the slow microcode path: on the
    # LLaVA-1.5-scale stand-in the prefill Softmax ran 8x slower than on the same shapes without
    # masking. Flush-to-zero / denormals-are-zero turns them into the exact zeros they stand for.
    # ORT applies it to its pool threads, and to the calling thread once per process (the first
    # session created decides that), so a process that opens its artifacts first gets it everywhere.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if shared is not None:
        pairs = shared.initializers(path)
        if pairs:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in pairs:
            opts.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(provider))
    except (RuntimeUnavailable, UserInputError):
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for a corrupt model
        raise ArtifactError(
            f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}",
            field="artifacts",
            fix="re-run `vpexport export`",
        ) from None


class Graphs:
    """The three sessions of an artifact folder; `run(name, feeds) -> {output name: array}`.

    ONNX Runtime sessions run through an IO binding per input shape (`_Binding`) after the first
    call with that shape; other sessions with ORT's interface (TensorRT's) through `run`.
    """

    NAMES = ("vision", "prefill", "decode")
    MAX_SHAPES = 4

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 share_weights: bool = False):
        """`share_weights`: prefill and decode take onnx/weights.bin's tensors from one mapping
        (memory once, no pre-packing); otherwise each session loads and pre-packs its own copy,
        which is faster in prefill (measured in docs/export.md)."""
        from vpexport.export.shared_weights import SharedWeights

        # held for the sessions' lifetime: they run on its buffers
        self.shared_weights = SharedWeights.find(onnx_dir) if share_weights else None
        self._bind({n: make_session(Path(onnx_dir) / f"{n}.onnx", provider, threads, self.shared_weights)
                    for n in self.NAMES})

    def _bind(self, sessions: dict) -> None:
        """Sessions with ORT's interface (get_inputs/get_outputs/run), indexed by graph name."""
        self.sessions = sessions
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
        self.inputs = {n: [i.name for i in s.get_inputs()] for n, s in sessions.items()}
        self._bindings: dict = {n: {} for n in sessions}

    def run(self, name: str, feeds: dict) -> dict:
        s = self.sessions[name]
        feeds = {k: feeds[k] for k in self.inputs[name]}
        if not hasattr(s, "io_binding"):
            return dict(zip(self.outputs[name], s.run(None, feeds)))
        key = tuple((np.shape(a), getattr(a, "dtype", None)) for a in feeds.values())
        cache = self._bindings[name]
        b = cache.get(key)
        if b is not None:
            cache[key] = cache.pop(key)  # most recently used last
            return b.run(feeds)
        # The first call with these shapes runs plainly: its outputs give the shapes to bind.
        out = dict(zip(self.outputs[name], s.run(None, feeds)))
        if len(cache) >= self.MAX_SHAPES:
            cache.pop(next(iter(cache)))
        cache[key] = _Binding(s, out)
        return out


class _Binding:
    """An ONNX Runtime IO binding for one set of input shapes, reused call after call.

    Inputs under `SMALL_INPUT` bytes (token, position, mask) are copied into arrays the binding
    owns; larger ones (the caches) are bound over the caller's arrays, no copy, and re-bound only
    when the caller passes a different array. Outputs are written into arrays bound once and copied
    out of them. On the LLaVA-1.5-scale stand-in's decode step (67 inputs, 65 outputs) this is
    ~0.8 ms of a ~29 ms step less than `session.run`, which converts every input and allocates
    every output per call.
    """

    SMALL_INPUT = 64 * 1024

    def __init__(self, session, outputs: dict):
        self.session, self.io = session, session.io_binding()
        self.bound: dict = {}  # input name -> the caller's array bound to it
        self.owned: dict = {}  # input name -> this binding's array, values copied in per call
        self.results = {n: np.empty_like(a) for n, a in outputs.items()}
        for n, a in self.results.items():
            self.io.bind_output(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)

    def run(self, feeds: dict) -> dict:
        for k, a in feeds.items():
            own = self.owned.get(k)
            if own is not None:
                np.copyto(own, a)
                continue
            if self.bound.get(k) is a:
                continue
            a = np.ascontiguousarray(a)
            if a.nbytes <= self.SMALL_INPUT:
                a = self.owned[k] = a.copy()
            else:
                self.bound[k] = a  # held so its memory outlives the binding
            self.io.bind_input(k, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        self.session.run_with_iobinding(self.io)
        # Copied: the next call writes into the same arrays.
        return {n: a.copy() for n, a in self.results.items()}

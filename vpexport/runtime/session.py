"""ONNX Runtime sessions for the exported graphs (providers: cpu | cuda | tensorrt)."""

from __future__ import annotations

from pathlib import Path

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


def make_session(path: str | Path, provider: str = "cpu", threads: int | None = None):
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
    """The three sessions of an artifact folder; `run(name, feeds) -> {output name: array}`."""

    NAMES = ("vision", "prefill", "decode")

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", threads: int | None = None):
        self._bind({n: make_session(Path(onnx_dir) / f"{n}.onnx", provider, threads) for n in self.NAMES})

    def _bind(self, sessions: dict) -> None:
        """Sessions with ORT's interface (get_inputs/get_outputs/run), indexed by graph name."""
        self.sessions = sessions
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in sessions.items()}
        self.inputs = {n: [i.name for i in s.get_inputs()] for n, s in sessions.items()}

    def run(self, name: str, feeds: dict) -> dict:
        s = self.sessions[name]
        outs = s.run(None, {k: feeds[k] for k in self.inputs[name]})
        return dict(zip(self.outputs[name], outs))

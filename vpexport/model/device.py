"""Where the PyTorch side runs: calibrate, eval, analyze, validate's reference, `run RECIPE` and
the bench's PyTorch variants. One spelling (`model.device` in the recipe, `--device` on those
commands), one resolver.

    cpu       the CPU (torch's intra-op threads)
    cuda      the first CUDA GPU; cuda:N the N-th
    auto      the first CUDA GPU when torch sees one, else the CPU (the default)

The exported graphs never depend on it: export traces on the CPU, and the artifacts' runtimes
choose their own provider (`--provider`). Splitting one model over several GPUs is not supported:
`auto` takes the first GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vpexport.errors import RuntimeUnavailable, UserInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = ("Device of the PyTorch model: auto (a CUDA GPU when present, else the CPU), cpu, cuda or "
               "cuda:N (default: the recipe's model.device).")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_spelling(spec: str, field: str = "model.device") -> str:
    """`spec` lower-cased when it is one of DEVICE_CHOICES' forms, else a one-line error (exit 2)."""
    s = str(spec).strip().lower()
    if not DEVICE_PATTERN.match(s):
        raise UserInputError(f"{spec!r} is not a device", field=field, fix="use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return s


@dataclass(frozen=True)
class Device:
    """A resolved device: `torch` (the torch.device string), `asked` (what the recipe or CLI said),
    `name` (the GPU's name or the CPU's), for logs and the records the commands write."""

    torch: str
    asked: str
    name: str

    @property
    def is_cuda(self) -> bool:
        return self.torch.startswith("cuda")

    def describe(self) -> str:
        return f"{self.torch} ({self.name})"

    def record(self) -> dict:
        return {"device": self.torch, "asked": self.asked, "name": self.name}


def resolve(spec: str = "auto", field: str = "model.device") -> Device:
    """The device `spec` names, checked against what torch sees here. `cuda` without a usable GPU
    is refused (exit 5) rather than silently run on the CPU; `auto` falls back to the CPU."""
    import torch

    s = check_spelling(spec, field)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if s == "cpu" or (s == "auto" and gpus == 0):
        return Device("cpu", s, _cpu_name(torch))
    if gpus == 0:
        raise RuntimeUnavailable(f"{s} asked for, but torch {torch.__version__} sees no CUDA GPU here", field=field,
                                 fix="use cpu or auto, or install a CUDA build of torch on a machine with a GPU")
    index = int(s.split(":")[1]) if ":" in s else 0
    if index >= gpus:
        raise RuntimeUnavailable(f"{s} asked for, but torch sees {gpus} GPU(s) (cuda:0..cuda:{gpus - 1})",
                                 field=field, fix=f"use cuda:0..cuda:{gpus - 1}")
    return Device(f"cuda:{index}", s, torch.cuda.get_device_name(index))


def prepare(device: Device, dtype: str) -> None:
    """Numerics a device needs to agree with the CPU. In float32 on CUDA, TF32 matmuls and
    convolutions would cut the mantissa to 10 bits (errors ~1e-3, far above validation's fp32
    tolerances), so they are switched off; fp16 / bf16 run as asked."""
    if not device.is_cuda:
        return
    import torch

    if dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def free_bytes(device: Device) -> int | None:
    """Free memory on a CUDA device (None on the CPU, where batch sizes stay as given)."""
    if not device.is_cuda:
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device.torch))
    return int(free)


def synchronize(device: Device) -> None:
    """Wait for queued kernels (timing on CUDA: its calls return before the work is done)."""
    if device.is_cuda:
        import torch

        torch.cuda.synchronize(torch.device(device.torch))


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where it has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name(torch) -> str:
    return f"{cpu_model_name() or 'CPU'}, {torch.get_num_threads()} threads"


CPU_BATCH = 32  # the CPU's default batch of calibration / analysis / eval passes
MAX_BATCH = 256


def pass_batch(pipe, recipe, requested: int | None, log=None) -> int:
    """The batch of a pipeline's PyTorch passes on its device: `requested`, else CPU_BATCH on the
    CPU, else `batch_size` for one unpruned pass of the recipe's layout (logged through `log`)."""
    from vpexport.accounting.memory import prefill_transient_bytes

    dev = pipe.device_info
    if dev is None or not dev.is_cuda:
        return requested or CPU_BATCH
    arch = recipe.resolve_arch()
    per = prefill_transient_bytes(arch, recipe.layout(arch), recipe.model.dtype)
    b = batch_size(dev, requested, per)
    if requested is None and log is not None:
        log(f"[torch] batch {b} on {dev.torch} (~{per / 2**20:.0f} MiB per sample in a pass, half the free memory)")
    return b


def batch_size(device: Device, requested: int | None, per_sample_bytes: int, memory_share: float = 0.5) -> int:
    """The batch of the PyTorch passes: `requested` when given; CPU_BATCH on the CPU; on a GPU,
    as many samples as `memory_share` of its free memory holds for one pass (`per_sample_bytes`,
    from accounting.memory.prefill_transient_bytes), between 1 and MAX_BATCH."""
    if requested is not None:
        return requested
    free = free_bytes(device)
    if free is None:
        return CPU_BATCH
    return max(1, min(MAX_BATCH, int(free * memory_share) // max(1, per_sample_bytes)))

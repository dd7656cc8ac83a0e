"""Is a TensorRT plan usable here? Pure Python: compares what the manifest's `engine` section
recorded at build time with the current TensorRT version and GPU.

TensorRT's rules (TensorRT 10 docs, "Version Compatibility" / "Hardware Compatibility"):
* a plan runs only on GPUs of the compute capability it was built for (vpexport never builds
  hardware-compatible plans, so the compute capability must match exactly);
* by default a plan runs only with the exact TensorRT version that built it;
* a plan built with `BuilderFlag.VERSION_COMPATIBLE` (TensorRT >= 8.6) also runs with later
  TensorRT versions, never with earlier ones.
A different GPU name with the same compute capability (e.g. another memory size) is allowed but
reported as a warning: tactics were timed on the other board.
"""

from __future__ import annotations

import re

from vpexport.errors import ArtifactError


def parse_version(v) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); '10.3.0.post1' -> (10, 3, 0). Raises ValueError on garbage."""
    nums = []
    for part in str(v).strip().split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
        if m.group() != part:
            break
    if not nums:
        raise ValueError(f"not a version: {v!r}")
    return tuple(nums)


def _release(v) -> tuple[int, int, int]:
    t = parse_version(v) + (0, 0, 0)
    return t[0], t[1], t[2]


def check_plan_compatible(recorded: dict, current: dict, *, where: str = "engines") -> list[str]:
    """Refuse (ArtifactError) a plan built for another GPU or TensorRT version; return warnings.

    `recorded` is the manifest's `engine` section: needs `tensorrt` (version string),
    `gpu.compute_capability` ("8.7"), optional `gpu.name` and `version_compatible`.
    `current` has the same keys for this machine (see `vpexport.engine.build.current_environment`).
    """
    fix = "rebuild the engines here: vpexport engine ARTIFACT_DIR (plans are tied to the GPU and TensorRT version)"
    if not recorded:
        raise ArtifactError(f"{where}: the manifest has no engine section", fix="run vpexport engine ARTIFACT_DIR")
    try:
        built_trt = str(recorded["tensorrt"])
        built_cc = str(recorded["gpu"]["compute_capability"])
    except (KeyError, TypeError):
        raise ArtifactError(
            f"{where}: the manifest's engine section does not record the TensorRT version and compute capability",
            fix=fix,
        ) from None
    here_trt = str(current["tensorrt"])
    here_cc = str(current["gpu"]["compute_capability"])
    gpu_built = (recorded.get("gpu") or {}).get("name") or "?"
    gpu_here = (current.get("gpu") or {}).get("name") or "?"

    if built_cc != here_cc:
        raise ArtifactError(
            f"{where}: plans were built for compute capability {built_cc} ({gpu_built}); "
            f"this GPU is {here_cc} ({gpu_here})",
            fix=fix,
        )
    try:
        b, h = _release(built_trt), _release(here_trt)
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}", fix=fix) from None
    if recorded.get("version_compatible"):
        if h < b:
            raise ArtifactError(
                f"{where}: version-compatible plans built with TensorRT {built_trt} cannot run on the older "
                f"TensorRT {here_trt} here (they run only on the same or a later version)",
                fix=fix,
            )
    elif h != b:
        raise ArtifactError(
            f"{where}: plans were built with TensorRT {built_trt}; this machine has TensorRT {here_trt} "
            "(plans not built with --version-compatible run only on the exact version)",
            fix=fix,
        )
    warnings = []
    if gpu_built != gpu_here and "?" not in (gpu_built, gpu_here):
        warnings.append(
            f"{where}: plans were built on {gpu_built} and run on {gpu_here} (same compute capability {here_cc}); "
            "rebuild for best performance"
        )
    if recorded.get("version_compatible") and h != b:
        warnings.append(f"{where}: version-compatible plans from TensorRT {built_trt} run on TensorRT {here_trt}")
    return warnings

"""`build_engines(artifact_dir, ...)`: one TensorRT plan per exported ONNX graph, no torch.

    engines/vision.plan, engines/prefill.plan, engines/decode.plan, engines/engines.json
    manifest.json: `engine` section (TensorRT version, GPU name, compute capability, settings,
                   profiles) and the plans' sha256 in the file table.

Order of work: (1) everything that needs no GPU (manifest, ONNX files and their hashes,
generation.json, settings, optimization profiles); (2) `tensorrt` importable, version >= 10, and a
CUDA device visible, else RuntimeUnavailable (exit 5) before anything is written; (3) build into
a temp folder inside the artifact folder, then rename it to `engines/` (the old one is replaced
only after every plan built and deserialized); (4) save the timing cache; (5) update the manifest.

Network typing (`network_typing`): when the plan's precision is the export's (fp16 plans from an fp16
export, fp32 from fp32), the network is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED:
every tensor keeps its ONNX type, no precision flags), which is the only mode TensorRT 11 has. A
lower plan precision than the export's (fp16 / bf16 plans from an fp32 export) needs the weakly typed
builder flags FP16 / BF16: TensorRT 10 has them, TensorRT 11 refuses with one line naming the export
precision to use instead. A higher one (fp32 plans from an fp16 export) is refused on both.

TensorRT API used (TensorRT 10 / 11 Python), type-checked with mypy against `tensorrt-stubs`: Builder,
create_network(flags) (explicit batch is the only mode since 10.x), OnnxParser.parse_from_file (resolves ONNX external data next to the file),
create_builder_config, set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes), BuilderFlag.FP16 /
BF16 / TF32 / VERSION_COMPATIBLE, create_optimization_profile + set_shape, create_timing_cache /
set_timing_cache / get_timing_cache().serialize(), build_serialized_network, Runtime +
deserialize_cuda_engine (to log the bindings), ICudaEngine.num_io_tensors / get_tensor_name /
get_tensor_mode / get_tensor_dtype / get_tensor_shape / get_tensor_profile_shape.

UNVERIFIED on TensorRT itself: the GPU half (steps 2-4 past the availability check) is written against
the documented API and type-checked against tensorrt-stubs 10.13 (tests/test_trt_types.py); it has
run only against the API-shaped fakes of tests/test_engine.py (TensorRT 10 and 11 shapes), never
with a real TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vpexport.engine.profiles import LengthSpec, compute_profile
from vpexport.engine.report import ENGINES_JSON, FORMAT, binding
from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError

SEGMENTS = ("vision", "prefill", "decode")
PRECISIONS = ("fp32", "fp16", "bf16")
ENGINES_DIR = "engines"
MIN_TRT_MAJOR = 10
NEEDS = "vpexport engine needs an NVIDIA GPU with TensorRT >= 10"


# --------------------------------------------------------------------------- runtime availability
def import_tensorrt(what: str = NEEDS, tail: str = "; nothing was written"):
    """The `tensorrt` module, or RuntimeUnavailable naming what was looked for and why it failed."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or OSError from a broken install (missing libnvinfer)
        raise RuntimeUnavailable(
            f"{what}: looked for the Python module `tensorrt` and could not import it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else '-'}){tail}",
            fix="on an NVIDIA GPU machine: pip install tensorrt (x86_64) or use JetPack's TensorRT (Jetson)",
        ) from None
    if getattr(trt, "__file__", None) is None and not hasattr(trt, "__version__"):
        # A folder without the library: `tensorrt-stubs` installs tensorrt/__init__.pyi only, which
        # Python imports as an empty namespace package.
        raise RuntimeUnavailable(
            f"{what}: looked for the Python module `tensorrt` and found only type stubs (a namespace package at "
            f"{', '.join(getattr(trt, '__path__', [])) or '?'}, no TensorRT library){tail}",
            fix="on an NVIDIA GPU machine: pip install tensorrt (x86_64) or use JetPack's TensorRT (Jetson)",
        )
    ver = getattr(trt, "__version__", "0")
    try:
        major = int(str(ver).split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TRT_MAJOR:
        raise RuntimeUnavailable(
            f"{what}: found TensorRT {ver}, which is older than {MIN_TRT_MAJOR}.0{tail}",
            fix="install TensorRT 10 (JetPack 6.x on Jetson)",
        )
    return trt


def require_gpu(what: str = NEEDS, tail: str = "; nothing was written"):
    """A GpuProbe for device 0, or RuntimeUnavailable naming what was looked for."""
    from vpexport.engine.cuda import probe_gpu

    probe = probe_gpu()
    if not probe.ok:
        raise RuntimeUnavailable(
            f"{what}: no usable CUDA device (looked via {' and '.join(probe.looked_for)}: {probe.reason}){tail}",
            fix="run on a machine with an NVIDIA GPU and driver (pip install cuda-python is optional)",
        )
    return probe


def current_environment(trt=None, probe=None) -> dict:
    """{"tensorrt": version, "gpu": {name, compute_capability, total_memory, count}} of this machine
    (`trt`: the tensorrt module, already imported by the caller)."""
    trt = trt or import_tensorrt("TensorRT plans need TensorRT", tail="")
    probe = probe or require_gpu("TensorRT plans need an NVIDIA GPU", tail="")
    return {"tensorrt": str(trt.__version__), "gpu": probe.to_dict()}


# --------------------------------------------------------------------------- the CPU half
@dataclass
class Settings:
    precision: str = "fp16"
    workspace_gb: float = 4.0
    timing_cache: str | None = None
    version_compatible: bool = False
    source: dict = field(default_factory=dict)  # setting -> "cli" | "recipe" | "default"


def resolve_settings(manifest: dict, precision=None, workspace_gb=None, timing_cache=None, version_compatible=None) -> Settings:
    """CLI options over the exported recipe's `engine` section (manifest `recipe.engine`) over defaults."""
    rec = ((manifest or {}).get("recipe") or {}).get("engine") or {}
    s = Settings()
    for key, cli in (("precision", precision), ("workspace_gb", workspace_gb), ("timing_cache", timing_cache),
                     ("version_compatible", version_compatible)):
        if cli is not None:
            setattr(s, key, cli)
            s.source[key] = "cli"
        elif rec.get(key) is not None:
            setattr(s, key, rec[key])
            s.source[key] = "recipe"
        else:
            s.source[key] = "default"
    if s.precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {s.precision!r}", field="--precision", fix="use fp32, fp16 or bf16")
    try:
        s.workspace_gb = float(s.workspace_gb)
    except (TypeError, ValueError):
        raise UserInputError(f"workspace {s.workspace_gb!r} is not a number", field="--workspace", fix="e.g. --workspace 2") from None
    if not s.workspace_gb > 0:
        raise UserInputError(f"workspace must be > 0 GB (got {s.workspace_gb})", field="--workspace", fix="e.g. --workspace 2")
    s.version_compatible = bool(s.version_compatible)
    if s.timing_cache is not None and s.source["timing_cache"] == "recipe" and not Path(s.timing_cache).parent.is_dir():
        # a server path recorded in the recipe does not exist on this machine (e.g. a Jetson): keep it in memory
        s.timing_cache = None
        s.source["timing_cache"] = "recipe path not on this machine: in memory only"
    return s


def _onnx_inputs(path: Path) -> list[dict]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = []
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        out.append({"name": vi.name, "shape": [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in dims]})
    return out


@dataclass
class BuildPlan:
    artifact_dir: Path
    manifest: dict
    spec: LengthSpec
    onnx: dict  # segment -> Path
    profiles: dict  # segment -> {input: {min, opt, max}}


def prepare(artifact_dir: str | Path, verify: bool = True) -> BuildPlan:
    """Everything before TensorRT: manifest, ONNX files (hash-checked), generation.json, profiles."""
    from vpexport.manifest import read_manifest, sha256_file

    art = Path(artifact_dir)
    if not art.is_dir():
        raise ArtifactError(f"{art} is not a folder", field="ARTIFACT_DIR", fix="give the folder `vpexport export` wrote (artifacts/<recipe>)")
    # verify=False: a folder copied to a Jetson without its old engines/ still lists their hashes;
    # the inputs this step reads are checked one by one below, the plans are rewritten.
    manifest = read_manifest(art, verify=False)
    files = manifest.get("files", {})
    gen_path = art / "runtime" / "generation.json"
    onnx = {}
    for seg in SEGMENTS:
        p = art / "onnx" / f"{seg}.onnx"
        if not p.is_file():
            raise ArtifactError(f"{p} is missing", field="artifacts", fix="run `vpexport export RECIPE` (and copy onnx/ with it)")
        onnx[seg] = p
    if verify:
        for rel, info in files.items():
            if not (rel.startswith("onnx/") or rel == "runtime/generation.json"):
                continue
            p = art / rel
            if not p.is_file():
                raise ArtifactError(f"artifact file {p} is missing (listed in manifest.json)", field="artifacts", fix="copy the whole onnx/ folder (external data included)")
            if p.stat().st_size != info.get("size") or sha256_file(p) != info.get("sha256"):
                raise ArtifactError(f"artifact file {p} does not match its manifest hash", field="artifacts", fix="re-copy it, or re-run `vpexport export`")
    if not gen_path.is_file():
        raise ArtifactError(f"{gen_path} is missing", field="artifacts", fix="run `vpexport export RECIPE` (and copy runtime/ with it)")
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{gen_path} is not valid JSON ({type(e).__name__})", field="artifacts", fix="re-run `vpexport export`") from None
    spec = LengthSpec.from_generation(gen, where=str(gen_path))
    graphs = (manifest.get("export") or {}).get("graphs") or {}
    profiles = {}
    for seg, p in onnx.items():
        inputs = (graphs.get(seg) or {}).get("inputs") or _onnx_inputs(p)
        profiles[seg] = compute_profile(seg, inputs, spec)
    return BuildPlan(art, manifest, spec, onnx, profiles)


# --------------------------------------------------------------------------- network typing
@dataclass(frozen=True)
class NetworkTyping:
    """How a plan gets its precision: `strong` (the ONNX's own types) or weak with builder `flags`."""

    strong: bool
    flags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "strongly typed" if self.strong else "weakly typed" + (f" ({', '.join(self.flags)})" if self.flags else "")


def network_typing(export_precision: str, precision: str, has_strong: bool, has_weak_flags: bool,
                   version: str = "") -> NetworkTyping:
    """The typing of a `precision` plan built from an `export_precision` ONNX. `has_strong`: the
    TensorRT here has STRONGLY_TYPED networks (>= 9); `has_weak_flags`: it still has the FP16 / BF16
    builder flags (10.x; gone in 11). Refusals are one-line UserInputErrors naming the fix."""
    trt_name = f"TensorRT {version}".strip()
    if precision == export_precision:
        return NetworkTyping(True) if has_strong else NetworkTyping(False, ("FP16",) if precision == "fp16" else ())
    if export_precision == "fp32" and precision in ("fp16", "bf16"):
        if has_weak_flags:
            return NetworkTyping(False, (precision.upper(),))
        fix = ("re-export with export.precision: fp16 (the plan then computes in the ONNX's fp16), or build with "
               "--precision fp32" if precision == "fp16" else "build with --precision fp32, or re-export with "
               "export.precision: fp16 and build fp16")
        raise UserInputError(f"{trt_name} builds strongly typed networks only, so a plan computes in its ONNX's "
                             f"types; this export is fp32 and a {precision} plan needs a {precision} export",
                             field="--precision", fix=fix)
    raise UserInputError(f"a {precision} plan from an {export_precision} export: the ONNX's {export_precision} "
                         f"tensors cannot be computed in {precision}", field="--precision",
                         fix=f"build with --precision {export_precision}, or re-export with export.precision: {precision}")


# --------------------------------------------------------------------------- the GPU half
def _dtype_name(dt) -> str:
    try:
        import numpy as np
        import tensorrt as trt

        return np.dtype(trt.nptype(dt)).name
    except Exception:  # BF16 / FP8 have no numpy type
        return str(dt).split(".")[-1].lower()


def _make_logger():
    """A TensorRT logger that keeps the errors (for the one-line failure) and counts warnings."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings = 0

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings += 1

    return _Logger()


def dims(d) -> list[int]:
    """A tensorrt.Dims (or a list) as ints. Dims is a sequence by __len__ / __getitem__; its stubs
    declare no __iter__, so it is indexed rather than iterated."""
    return [int(d[i]) for i in range(len(d))]


def engine_bindings(engine, profile_index: int = 0) -> list[dict]:
    """The I/O tensors of a deserialized engine (a tensorrt.ICudaEngine), with their profile ranges (inputs)."""
    import tensorrt as trt

    eng: trt.ICudaEngine = engine
    out = []
    for i in range(eng.num_io_tensors):
        name = eng.get_tensor_name(i)
        is_in = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = dims(eng.get_tensor_shape(name))
        prof = None
        if is_in and any(d < 0 for d in shape):
            lo, mid, hi = eng.get_tensor_profile_shape(name, profile_index)
            prof = {"min": dims(lo), "opt": dims(mid), "max": dims(hi)}
        out.append(binding(name, "input" if is_in else "output", _dtype_name(eng.get_tensor_dtype(name)), shape, prof))
    return out


def _typing_here(export_precision: str, precision: str) -> NetworkTyping:
    """`network_typing` for the TensorRT installed here."""
    import tensorrt as trt

    return network_typing(export_precision, precision,
                          has_strong=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
                          has_weak_flags=hasattr(trt.BuilderFlag, "FP16"), version=str(trt.__version__))


def _network_flags(typing: NetworkTyping) -> int:
    import tensorrt as trt

    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing.strong else 0


def _configure(config, s: Settings, cc: str, typing: NetworkTyping) -> None:
    """Workspace, the weakly typed precision flags (none on a strongly typed network), TF32 off for
    fp32, version compatibility."""
    import tensorrt as trt

    cfg: trt.IBuilderConfig = config
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_gb * 2**30))
    if s.precision == "bf16":
        major = int(cc.split(".")[0]) if cc else 0
        if major < 8:
            raise UserInputError(f"bf16 needs compute capability >= 8.0 (this GPU is {cc})", field="--precision", fix="use fp16")
    for name in typing.flags:
        cfg.set_flag(getattr(trt.BuilderFlag, name))
    if s.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        cfg.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would loosen the ORT comparison
    if s.version_compatible:
        cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engines(
    artifact_dir: str | Path,
    precision: str | None = None,
    workspace_gb: float | None = None,
    timing_cache: str | None = None,
    version_compatible: bool | None = None,
    echo=print,
) -> dict:
    """Build every plan; returns the engines.json document. See the module docstring for the order."""
    from vpexport.manifest import update_manifest

    plan = prepare(artifact_dir)
    s = resolve_settings(plan.manifest, precision, workspace_gb, timing_cache, version_compatible)
    import_tensorrt()  # one line (exit 5) when missing or older than 10
    import tensorrt as trt

    probe = require_gpu()
    export_precision = str((plan.manifest.get("export") or {}).get("precision", "fp32"))
    typing = _typing_here(export_precision, s.precision)
    cc = probe.compute_capability
    echo(
        f"[engine] TensorRT {trt.__version__} on {probe.name} (compute capability {cc}); "
        f"{s.precision} from the {export_precision} export, {typing.label}, workspace {s.workspace_gb:g} GB"
        + (", version-compatible" if s.version_compatible else "")
    )
    logger = _make_logger()
    art = plan.artifact_dir
    cache_path = Path(s.timing_cache) if s.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if cache_bytes:
        echo(f"[engine] timing cache {cache_path} ({len(cache_bytes)} bytes)")
    stage = Path(tempfile.mkdtemp(prefix=".engines-", dir=art))
    entries = []
    try:
        builder = trt.Builder(logger)
        if s.precision == "fp16" and not getattr(builder, "platform_has_fast_fp16", True):
            echo("[engine] warning: this GPU has no fast fp16; the fp16 build may be slower than fp32")
        for seg in SEGMENTS:
            t0 = time.perf_counter()
            logger.errors.clear()
            network = builder.create_network(_network_flags(typing))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(plan.onnx[seg])):
                errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors or ["unknown error"]
                raise ArtifactError(
                    f"TensorRT cannot parse {plan.onnx[seg]}: {errs[0].splitlines()[0]}"
                    + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""),
                    field="engine",
                    fix="check the ONNX with `polygraphy inspect model`; try export.opset 17",
                )
            prof = dict(plan.profiles[seg])
            for i in range(network.num_inputs):  # any dynamic input the export record missed
                t = network.get_input(i)
                shape = dims(t.shape)
                if any(d < 0 for d in shape) and t.name not in prof:
                    prof.update(compute_profile(seg, {t.name: shape}, plan.spec))
            config = builder.create_builder_config()
            _configure(config, s, cc, typing)
            if prof:
                op = builder.create_optimization_profile()
                for name, r in prof.items():
                    op.set_shape(name, r["min"], r["opt"], r["max"])
                config.add_optimization_profile(op)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)
            echo(f"[engine] {seg}: building from {plan.onnx[seg].relative_to(art)} ...")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise ArtifactError(
                    f"TensorRT failed to build {seg}: {(logger.errors or ['see the TensorRT log'])[-1].splitlines()[0]}",
                    field="engine",
                    fix="try a larger --workspace, --precision fp32, or a smaller export.batch.max",
                )
            cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            plan_file = stage / f"{seg}.plan"
            with open(plan_file, "wb") as f:
                f.write(memoryview(serialized))
            del serialized, parser, network, config
            seconds = time.perf_counter() - t0
            # deserialize the file just written: proves it loads and gives the bindings
            runtime = trt.Runtime(logger)
            if s.version_compatible:
                runtime.engine_host_code_allowed = True  # the plan embeds its lean runtime; we built it
            engine = runtime.deserialize_cuda_engine(plan_file.read_bytes())
            if engine is None:
                raise ArtifactError(f"the {seg} plan just built does not deserialize", field="engine", fix="report this with the TensorRT log")
            mem = getattr(engine, "device_memory_size_v2", None)
            if mem is None:
                mem = getattr(engine, "device_memory_size", None)
            entries.append(
                {
                    "segment": seg,
                    "onnx": plan.onnx[seg].relative_to(art).as_posix(),
                    "plan": f"{ENGINES_DIR}/{seg}.plan",
                    "bytes": plan_file.stat().st_size,
                    "build_seconds": round(seconds, 2),
                    "device_memory": None if mem is None else int(mem),
                    "profile": prof,
                    "bindings": engine_bindings(engine),
                }
            )
            del engine, runtime
            echo(f"[engine] {seg}: {plan_file.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s")
        doc = {
            "format": FORMAT,
            "tensorrt": str(trt.__version__),
            "gpu": probe.to_dict(),
            "precision": s.precision,
            "export_precision": export_precision,
            "network": typing.label,
            "workspace_gb": s.workspace_gb,
            "version_compatible": s.version_compatible,
            "timing_cache": str(cache_path) if cache_path else None,
            "settings_source": s.source,
            "engines": entries,
        }
        (stage / ENGINES_JSON).write_text(json.dumps(doc, indent=2) + "\n")
        # swap into place
        dst = art / ENGINES_DIR
        old = None
        if dst.exists():
            old = art / f".engines-old-{os.getpid()}"
            os.replace(dst, old)
        os.replace(stage, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    if cache_path:
        _atomic_write(cache_path, cache_bytes)
        echo(f"[engine] timing cache saved to {cache_path} ({len(cache_bytes)} bytes)")
    section = {
        "tensorrt": doc["tensorrt"],
        "gpu": doc["gpu"],
        "precision": s.precision,
        "network": typing.label,
        "workspace_gb": s.workspace_gb,
        "version_compatible": s.version_compatible,
        "timing_cache": doc["timing_cache"],
        "plans": {e["segment"]: e["plan"] for e in entries},
        "profiles": {e["segment"]: e["profile"] for e in entries},
        "engines_json": f"{ENGINES_DIR}/{ENGINES_JSON}",
        "machine": platform.machine(),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    update_manifest(art, "engine", section, files=[e["plan"] for e in entries] + [f"{ENGINES_DIR}/{ENGINES_JSON}"])
    return doc

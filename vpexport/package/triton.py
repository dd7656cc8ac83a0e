"""A Triton model repository from an exported artifact folder, and its offline checker.

    summary = package_triton("artifacts/mini_vqa", "triton_repo", deploy_cfg)   # deploy.triton of a recipe
    problems = check_repository("triton_repo")                                  # [] when it is sound

Layout written (every config built as a `model_config_pb2.ModelConfig` message, so no template):

    OUT/vision/config.pbtxt    platform onnxruntime_onnx (or tensorrt_plan when engines/ exists)
    OUT/vision/1/model.onnx    (model.plan)
    OUT/prefill/...            same
    OUT/decode/...             same
    OUT/vlm/config.pbtxt       backend python; image (encoded bytes) + prompt (the question) -> text
    OUT/vlm/1/model.py         the generation loop; parameters{mode}: inprocess (ONNX Runtime in the
                               stub, torch-free runtime) or bls (InferenceRequest to vision/prefill/decode)
    OUT/vlm/1/vpexport/        a copy of the torch-free runtime package (numpy, pillow, tokenizers, onnxruntime)
    OUT/vlm/1/artifact/        manifest.json + runtime/ assets (+ onnx/ and engines/ in inprocess mode)
    OUT/vlm/1/bls.json         the component models' input/output names (the BLS wiring)

Inputs/outputs, data types and dims come from the ONNX graphs: when dim 0 of every input and
output is the same symbolic axis it is the batch axis (`max_batch_size` set, dim 0 dropped);
other symbolic dims become -1. The repository is written to a temp folder next to OUT, checked
with `check_repository`, and renamed into place only when clean.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError

COMPONENTS = ("vision", "prefill", "decode")
PY_MODEL = "vlm"  # the one model clients call, whatever the model family
MODES = ("inprocess", "bls")
MARKER_FILE = ".vpexport-package.json"  # in OUT: written by package_triton

# platform -> model file in the version folder (None: a folder or nothing)
PLATFORMS = {
    "onnxruntime_onnx": "model.onnx",
    "tensorrt_plan": "model.plan",
    "ensemble": None,
    "pytorch_libtorch": "model.pt",
    "tensorflow_savedmodel": "model.savedmodel",
    "tensorflow_graphdef": "model.graphdef",
}
# backend -> model file
BACKENDS = {
    "python": "model.py",
    "onnxruntime": "model.onnx",
    "tensorrt": "model.plan",
    "pytorch": "model.pt",
    "openvino": "model.xml",
}
# ONNX TensorProto elem type -> Triton data type
ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
# the runtime modules the python model carries (no torch / transformers in any of them)
RUNTIME_SOURCES = ("__init__.py", "errors.py", "manifest.py", "runtime", "engine")
MARKER = re.compile(r"\{\{|\}\}|\$\{|\$[A-Za-z_]|@@[A-Z_]+@@")


# =========================================================================== helpers
def _pb():
    """(model_config_pb2, text_format); RuntimeUnavailable (exit 5) without tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise RuntimeUnavailable(
            "tritonclient is not installed (its model_config_pb2 is Triton's config schema)",
            field="triton",
            fix="pip install 'vpexport[triton]'  (or: pip install 'tritonclient[grpc]')",
        ) from None
    return model_config_pb2, text_format


def _deploy_dict(deploy_cfg) -> dict:
    from vpexport.recipe.schema import TritonSection

    if deploy_cfg is None:
        deploy_cfg = {}
    if hasattr(deploy_cfg, "triton"):  # a whole `deploy` section (DeploySection) or a recipe's
        deploy_cfg = deploy_cfg.triton
    if hasattr(deploy_cfg, "deploy"):  # a Recipe
        deploy_cfg = deploy_cfg.deploy.triton
    if hasattr(deploy_cfg, "model_dump"):
        deploy_cfg = deploy_cfg.model_dump()
    if isinstance(deploy_cfg, dict) and isinstance(deploy_cfg.get("triton"), dict):  # {"triton": {...}, "jetson": ...}
        deploy_cfg = deploy_cfg["triton"]
    try:
        return TritonSection.model_validate(dict(deploy_cfg)).model_dump()
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError: one line
        first = str(e).splitlines()
        raise UserInputError(f"invalid deploy.triton settings: {' '.join(first[1:3]) or first[0]}",
                             field="deploy.triton") from None


def graph_signature(onnx_path: str | Path) -> dict:
    """{"inputs": [(name, elem_type, [dim or symbol])], "outputs": [...]} without loading weights."""
    import onnx

    try:
        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"cannot read ONNX graph {onnx_path}: {str(e).splitlines()[0][:200]}",
                            field="artifacts", fix="re-run `vpexport export`") from None
    inits = {i.name for i in m.graph.initializer}

    def one(vi):
        t = vi.type.tensor_type
        dims = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        return vi.name, int(t.elem_type), dims

    return {"inputs": [one(v) for v in m.graph.input if v.name not in inits], "outputs": [one(v) for v in m.graph.output]}


def batch_axis(sig: dict) -> bool:
    """True when dim 0 of every input and output is one shared symbolic axis (the batch)."""
    firsts = [dims[0] if dims else None for _, _, dims in sig["inputs"] + sig["outputs"]]
    return bool(firsts) and all(isinstance(f, str) for f in firsts) and len(set(firsts)) == 1


def triton_dims(dims: list, batched: bool) -> list[int]:
    dims = dims[1:] if batched else dims
    return [d if isinstance(d, int) else -1 for d in dims]


# =========================================================================== config builders
def _common(cfg, d: dict, batched: bool, pb) -> None:
    cfg.max_batch_size = d["max_batch_size"] if batched else 0
    if batched:
        db = cfg.dynamic_batching
        db.max_queue_delay_microseconds = d["max_queue_delay_us"]
        db.preferred_batch_size.extend(d["preferred_batch_sizes"])
    g = cfg.instance_group.add()
    g.count = d["instances"]
    g.kind = pb.ModelInstanceGroup.KIND_GPU if d["device"] == "gpu" else pb.ModelInstanceGroup.KIND_CPU


def component_config(name: str, sig: dict, platform: str, d: dict):
    pb, _ = _pb()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.platform = platform
    batched = batch_axis(sig)
    for section, items in (("input", sig["inputs"]), ("output", sig["outputs"])):
        for n, et, dims in items:
            if et not in ONNX_TO_TRITON:
                raise ArtifactError(f"{name}: tensor {n} has ONNX type {et} with no Triton equivalent", field="artifacts")
            t = getattr(cfg, section).add()
            t.name = n
            t.data_type = pb.DataType.Value(ONNX_TO_TRITON[et])
            t.dims.extend(triton_dims(dims, batched))
    _common(cfg, d, batched, pb)
    return cfg


def python_model_config(name: str, d: dict, components: list[str], provider: str, threads: int, precision: str = "auto"):
    pb, _ = _pb()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "python"
    for section, tname in (("input", "image"), ("input", "prompt"), ("output", "text")):
        t = getattr(cfg, section).add()
        t.name = tname
        t.data_type = pb.DataType.Value("TYPE_STRING")
        t.dims.append(1)
    _common(cfg, d, True, pb)
    params = {"mode": d["mode"], "artifact_dir": "artifact", "components": ",".join(components),
              "provider": provider, "threads": str(threads), "precision": precision}
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def _write_config(folder: Path, cfg) -> None:
    _, text_format = _pb()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))


RESOLVED_RECIPE = "recipe.resolved.yaml"
# Paths of the build machine in a resolved recipe; the packaged copy keeps only their last part.
_MACHINE_PATHS = (("model", "path"), ("task", "data", "calib"), ("task", "data", "eval"), ("engine", "timing_cache"))


def _portable_recipe(src: Path, dst: Path) -> None:
    """The resolved recipe for the repository: the build machine's absolute paths (checkpoint, data,
    timing cache) cut to their file or folder name, since the served model reads none of them."""
    import yaml

    raw = yaml.safe_load(src.read_text())
    for keys in _MACHINE_PATHS:
        node = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = Path(node[keys[-1]]).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("# The build's resolved recipe; paths of the build machine are cut to their names.\n"
                   + yaml.safe_dump(raw, sort_keys=False))


def _place(src: Path, dst: Path) -> None:
    """Hard link when possible (ONNX files can be GBs), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_runtime_package(dst: Path) -> None:
    import vpexport

    src = Path(vpexport.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in RUNTIME_SOURCES:
        s = src / item
        if s.is_dir():
            shutil.copytree(s, dst / item, ignore=ignore)
        elif s.is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / item)


# =========================================================================== packaging
def package_triton(artifact_dir, out_dir, deploy_cfg=None, *, model_name: str = PY_MODEL, force: bool = False,
                   threads: int = 1, log=None, provider: str | None = None, precision: str = "auto",
                   record_as: str | Path | None = None) -> dict:
    """Write the Triton model repository for ARTIFACT_DIR into OUT_DIR; returns a summary dict.

    `deploy_cfg`: a recipe's `deploy.triton` (TritonSection or dict), or its whole `deploy` section;
    None -> the one recorded in the artifact's manifest (the exported recipe), else the schema
    defaults. An existing OUT is replaced when `force` or when package_triton wrote it.
    `provider`: the python model's runtime in inprocess mode on CPU instances (cpu = ONNX Runtime,
    openvino; `precision` applies to openvino); GPU instances use tensorrt plans or cuda.
    `record_as`: the artifact path OUT's marker records (`vpexport build` packages its staging
    folder and passes the final one); the marker also records the artifact's digest, which
    `check_repository` compares with the artifact's current one.
    """
    import time

    from vpexport.manifest import GRAPHS_TRITON, artifact_digest, read_manifest

    t0 = time.perf_counter()
    log = log or (lambda m: None)
    art = Path(artifact_dir)
    out = Path(out_dir)
    if not art.is_dir():
        raise ArtifactError(f"artifact folder {art} does not exist", field="ARTIFACT_DIR",
                            fix="run `vpexport export RECIPE` first")
    manifest = read_manifest(art)  # hashes verified: a corrupt artifact never gets packaged
    if "export" not in manifest:
        raise ArtifactError(f"{art} has no export section in its manifest", field="artifacts",
                            fix="run `vpexport export RECIPE` first")
    if deploy_cfg is None:
        deploy_cfg = ((manifest.get("recipe") or {}).get("deploy") or {}).get("triton") or {}
    d = _deploy_dict(deploy_cfg)
    batch_max = ((manifest["export"].get("batch") or {}).get("max"))
    if batch_max and d["max_batch_size"] > int(batch_max):
        raise UserInputError(f"max_batch_size {d['max_batch_size']} is larger than the exported batch.max ({batch_max})",
                             field="deploy.triton.max_batch_size", fix=f"use at most {batch_max}")
    ours = (out / MARKER_FILE).is_file()  # a repository this function wrote earlier is replaced without --force
    if out.exists() and any(out.iterdir()) and not force and not ours:
        raise UserInputError(f"{out} already exists and is not empty", field="--triton",
                             fix="choose another folder or pass --force to replace it")
    _pb()  # fail early (exit 5) without tritonclient
    for n in COMPONENTS:
        if not (art / "onnx" / f"{n}.onnx").is_file():
            raise ArtifactError(f"{art / 'onnx' / (n + '.onnx')} is missing", field="artifacts",
                                fix="re-run `vpexport export`")
    plans = {}
    eng = manifest.get("engine") or {}
    if (art / "engines" / "engines.json").is_file() and eng:
        plans = {n: art / p for n, p in (eng.get("plans") or {n: f"engines/{n}.plan" for n in COMPONENTS}).items()}
        plans = {n: p for n, p in plans.items() if p.is_file()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp makes the folder 0700; a repository is read by the server's user (a container's,
        # a service account), so it gets the mode any new folder gets here.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        models = {}
        sigs = {}
        for n in COMPONENTS:
            sig = sigs[n] = graph_signature(art / "onnx" / f"{n}.onnx")
            platform = "tensorrt_plan" if n in plans else "onnxruntime_onnx"
            cfg = component_config(n, sig, platform, d)
            _write_config(tmp / n, cfg)
            if n in plans:
                _place(plans[n], tmp / n / "1" / "model.plan")
                # the source graph rides along (not loaded by Triton) so the checker can compare dims
                _place(art / "onnx" / f"{n}.onnx", tmp / n / "source.onnx")
            else:
                _place(art / "onnx" / f"{n}.onnx", tmp / n / "1" / "model.onnx")
                from vpexport.export.shared_weights import external_files

                # external weights (onnx/weights.bin shared by prefill and decode, a > 2 GB
                # graph's own file): next to model.onnx, where ONNX Runtime looks for them
                for ext in external_files(art / "onnx" / f"{n}.onnx"):
                    _place(art / "onnx" / ext, tmp / n / "1" / ext)
            models[n] = {"platform": platform, "max_batch_size": cfg.max_batch_size,
                         "inputs": len(sig["inputs"]), "outputs": len(sig["outputs"])}
            log(f"[package] {n}: {platform}, max_batch_size {cfg.max_batch_size}")

        # ---- the python model
        if d["device"] == "gpu":
            if provider not in (None, "tensorrt", "cuda"):
                raise UserInputError(f"--provider {provider} runs on CPU instances", field="--provider",
                                     fix="use --device cpu, or leave --provider out for GPU instances")
            provider = "tensorrt" if plans else "cuda"
        else:
            provider = provider or "cpu"
            from vpexport.runtime.providers import PROVIDERS

            if PROVIDERS.get(provider) is None or PROVIDERS[provider].device != "CPU":
                raise UserInputError(f"--provider {provider} needs GPU instances", field="--provider",
                                     fix="use a CPU provider (" + ", ".join(n for n, p in PROVIDERS.items() if p.device == "CPU")
                                     + "), or --device gpu")
            if provider != "cpu" and d["mode"] != "inprocess":
                raise UserInputError(f"--provider {provider} runs the graphs inside the python model", field="--provider",
                                     fix="use --mode inprocess (bls sends them to Triton's onnxruntime backend)")
        pm = tmp / model_name
        ver = pm / "1"
        ver.mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("triton_model.py"), ver / "model.py")
        _copy_runtime_package(ver / "vpexport")
        a = ver / "artifact"
        # the runtime verifies every file its manifest lists: carry them all (bls: no graphs) and
        # rewrite the copy's file table to exactly what was carried
        skip = ("onnx/", "engines/") if d["mode"] == "bls" else ()
        files = [f for f in manifest["files"] if not f.startswith(skip)] if skip else list(manifest["files"])
        for f in files:
            if f == RESOLVED_RECIPE:
                _portable_recipe(art / f, a / f)
            else:
                _place(art / f, a / f)
        m = json.loads((art / "manifest.json").read_text())
        m["files"] = {k: v for k, v in m["files"].items() if k in files}
        if RESOLVED_RECIPE in m["files"]:
            from vpexport.manifest import sha256_file

            m["files"][RESOLVED_RECIPE] = {"sha256": sha256_file(a / RESOLVED_RECIPE),
                                           "size": (a / RESOLVED_RECIPE).stat().st_size}
        if skip:
            m["graphs"] = GRAPHS_TRITON  # the table is complete without onnx/: Triton serves the graphs
        (a / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        wiring = {n: {"inputs": [i[0] for i in sigs[n]["inputs"]], "outputs": [o[0] for o in sigs[n]["outputs"]]}
                  for n in COMPONENTS}
        (ver / "bls.json").write_text(json.dumps(wiring, indent=2) + "\n")
        cfg = python_model_config(model_name, d, list(COMPONENTS), provider, threads, precision)
        _write_config(pm, cfg)
        models[model_name] = {"backend": "python", "mode": d["mode"], "provider": provider,
                              "max_batch_size": cfg.max_batch_size}
        log(f"[package] {model_name}: python backend, mode {d['mode']}, provider {provider}")

        (tmp / MARKER_FILE).write_text(json.dumps({"artifact": str(Path(record_as or art).resolve()),
                                                   "artifact_digest": artifact_digest(manifest), "mode": d["mode"],
                                                   "device": d["device"]}, indent=2) + "\n")
        problems = check_repository(tmp, check_source=False)  # the marker may name a folder not swapped in yet
        if problems:
            raise ArtifactError(f"the generated repository fails its check: {problems[0]}"
                                + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                                field="package", fix="report this")
        # rename into place
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"repository": str(out), "artifact": str(art), "models": models, "deploy": d,
            "seconds": round(time.perf_counter() - t0, 2)}


# =========================================================================== checking
def _version_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _param(cfg, key: str, default=None):
    return cfg.parameters[key].string_value if key in cfg.parameters else default


def _compare_io(where: str, cfg, sig: dict, pb) -> list[str]:
    problems = []
    batched = cfg.max_batch_size > 0
    if batched and not batch_axis(sig):
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} but the graph has no dynamic batch axis at dim 0 "
                        f"(set max_batch_size: 0)")
    for section, items in (("input", sig["inputs"]), ("output", sig["outputs"])):
        graph = {n: (et, dims) for n, et, dims in items}
        conf = {t.name: t for t in getattr(cfg, section)}
        for n in sorted(set(conf) - set(graph)):
            close = difflib.get_close_matches(n, list(graph), n=1)
            problems.append(f"{where}: {section} {n!r} is not a graph {section}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        if section == "input":
            for n in sorted(set(graph) - set(conf)):
                problems.append(f"{where}: graph input {n!r} is missing from the config")
        for n in sorted(set(conf) & set(graph)):
            et, dims = graph[n]
            t = conf[n]
            want_type = ONNX_TO_TRITON.get(et)
            got_type = pb.DataType.Name(t.data_type)
            if got_type != want_type:
                problems.append(f"{where}: {section} {n!r} data_type {got_type}, the graph has {want_type}")
            want = triton_dims(dims, batched)
            got = list(t.dims)
            if t.HasField("reshape"):
                continue
            if got != want:
                problems.append(f"{where}: {section} {n!r} dims {got} do not match the graph's {want}"
                                + (" (batch dim 0 dropped: max_batch_size > 0)" if batched else ""))
    return problems


def check_model(folder: Path, repo_models: dict) -> list[str]:
    """Problems of one model folder (its config already parsed into repo_models[name])."""
    pb, _ = _pb()
    name = folder.name
    cfg = repo_models[name]
    where = f"{name}/config.pbtxt"
    problems = []
    if cfg.name and cfg.name != name:
        problems.append(f"{where}: name {cfg.name!r} differs from its folder {name!r}")
    if bool(cfg.platform) == bool(cfg.backend) and not (cfg.platform and cfg.backend):
        problems.append(f"{where}: give a platform or a backend")
        return problems
    model_file = None
    for kind, value, table in (("platform", cfg.platform, PLATFORMS), ("backend", cfg.backend, BACKENDS)):
        if not value:
            continue
        if value not in table:
            close = difflib.get_close_matches(value, list(table), n=1)
            problems.append(f"{where}: unknown {kind} {value!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(table)})"))
            return problems
        model_file = model_file or table[value]
    if cfg.default_model_filename:
        model_file = cfg.default_model_filename
    if cfg.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} is negative")
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size == 0:
            problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
        for b in cfg.dynamic_batching.preferred_batch_size:
            if not 1 <= b <= max(cfg.max_batch_size, 1):
                problems.append(f"{where}: preferred_batch_size {b} is outside 1..max_batch_size ({cfg.max_batch_size})")
    for g in cfg.instance_group:
        if g.count < 1:
            problems.append(f"{where}: instance_group count {g.count} must be at least 1")
    versions = _version_dirs(folder)
    if not versions:
        problems.append(f"{name}: no version folder (expected {name}/1/)")
    for v in versions:
        if model_file and not (v / model_file).exists():
            problems.append(f"{name}/{v.name}: model file {model_file} is missing")
    if not versions or any(p.startswith(f"{name}/") and "is missing" in p for p in problems):
        return problems
    latest = versions[-1]

    if cfg.platform == "onnxruntime_onnx" or cfg.backend == "onnxruntime":
        sig = graph_signature(latest / model_file)
        problems += _compare_io(where, cfg, sig, pb)
    elif cfg.platform == "tensorrt_plan" or cfg.backend == "tensorrt":
        src = folder / "source.onnx"
        if src.is_file():  # the graph the plan was built from (written by package_triton)
            problems += _compare_io(where, cfg, graph_signature(src), pb)
    elif cfg.backend == "python":
        problems += _check_python(folder, latest, cfg, repo_models, where)
    elif cfg.platform == "ensemble":
        for step in cfg.ensemble_scheduling.step:
            if step.model_name not in repo_models:
                problems.append(f"{where}: ensemble step names model {step.model_name!r}, not in the repository")
    for f in [folder / "config.pbtxt", latest / "model.py"]:
        if f.is_file():
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if MARKER.search(line):
                    problems.append(f"{f.relative_to(folder.parent)}:{i}: template placeholder left: {line.strip()[:80]}")
                    break
    return problems


def _check_artifact_copy(art: Path, where: str) -> list[str]:
    """The python model's artifact copy must read as the runtime reads it at start: a well-formed
    manifest whose files are all there with their recorded sizes (hashes are left to the runtime,
    which verifies them when it loads; hashing GBs here would double the packaging time)."""
    from vpexport.manifest import read_manifest

    try:
        m = read_manifest(art, verify=False)
    except ArtifactError as e:
        return [f"{where}: {e}"]
    problems = []
    for rel, info in m["files"].items():
        p = art / rel
        if not p.is_file():
            problems.append(f"{where}: {art.name}/{rel} is listed in its manifest but missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{where}: {art.name}/{rel} has {p.stat().st_size} bytes, its manifest says {info['size']}")
    return problems


def _check_python(folder: Path, version: Path, cfg, repo_models: dict, where: str) -> list[str]:
    problems = []
    mode = _param(cfg, "mode")
    if mode is None:
        return problems  # some other python model: nothing more we know about it
    if mode not in MODES:
        close = difflib.get_close_matches(mode, MODES, n=1)
        return [f"{where}: parameter mode {mode!r} is not one of {', '.join(MODES)}"
                + (f" (did you mean {close[0]!r}?)" if close else "")]
    io = {t.name: t for t in list(cfg.input) + list(cfg.output)}
    for n in ("image", "prompt", "text"):
        if n not in io:
            problems.append(f"{where}: the python model has no {n!r} tensor")
    art = Path(_param(cfg, "artifact_dir", "artifact"))
    art = art if art.is_absolute() else version / art
    for rel in ("manifest.json", "runtime/generation.json", "runtime/tokenizer.json", "runtime/preprocess.json"):
        if not (art / rel).is_file():
            problems.append(f"{folder.name}/{version.name}: {rel} is missing from {art.name}/")
    if (art / "manifest.json").is_file():
        problems += _check_artifact_copy(art, f"{folder.name}/{version.name}")
    if not (version / "vpexport" / "runtime" / "generate.py").is_file():
        problems.append(f"{folder.name}/{version.name}: the runtime package copy (vpexport/runtime) is missing")
    if mode == "inprocess":
        for n in COMPONENTS:
            if not (art / "onnx" / f"{n}.onnx").is_file():
                problems.append(f"{folder.name}/{version.name}: inprocess mode needs {art.name}/onnx/{n}.onnx")
        return problems
    # bls: the components named must be models of this repository with the wired inputs/outputs
    comps = [c for c in (_param(cfg, "components", "") or "").split(",") if c]
    if len(comps) != len(COMPONENTS):
        problems.append(f"{where}: parameter components must name {len(COMPONENTS)} models (vision,prefill,decode), got {comps}")
    wiring_file = version / "bls.json"
    wiring = json.loads(wiring_file.read_text()) if wiring_file.is_file() else None
    if wiring is None:
        problems.append(f"{folder.name}/{version.name}: bls.json (the component wiring) is missing")
    for role, c in zip(COMPONENTS, comps):
        if c not in repo_models:
            close = difflib.get_close_matches(c, list(repo_models), n=1)
            problems.append(f"{where}: BLS component {c!r} is not a model in the repository"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if wiring and role in wiring:
            target = repo_models[c]
            ins = {t.name for t in target.input}
            outs = {t.name for t in target.output}
            for n in wiring[role]["inputs"]:
                if n not in ins:
                    problems.append(f"{where}: BLS sends input {n!r} to {c!r}, which has no such input")
            for n in wiring[role]["outputs"]:
                if n not in outs:
                    problems.append(f"{where}: BLS reads output {n!r} from {c!r}, which has no such output")
    return problems


def check_repository(repo_dir, check_source: bool = True) -> list[str]:
    """Every problem found in a Triton model repository (empty list: sound), one line each.

    Parses each config.pbtxt against Triton's schema (tritonclient's model_config_pb2), then
    checks platform/backend names, the model file in each version folder, inputs/outputs
    (names, types, dims) against the ONNX graph, python-model parameters and BLS wiring,
    and leftover template markers; with `check_source`, that the artifact named in the
    repository's marker still has the digest it was packaged from.
    """
    pb, text_format = _pb()
    repo = Path(repo_dir)
    if not repo.is_dir():
        return [f"{repo}: not a directory"]
    models, problems = {}, []
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        return [f"{repo}: no model folders"]
    for f in folders:
        c = f / "config.pbtxt"
        if not c.is_file():
            problems.append(f"{f.name}: config.pbtxt is missing")
            continue
        cfg = pb.ModelConfig()
        try:
            text_format.Parse(c.read_text(), cfg)
        except text_format.ParseError as e:
            problems.append(f"{f.name}/config.pbtxt: does not parse as a Triton ModelConfig: {str(e).splitlines()[0]}")
            continue
        models[f.name] = cfg
    for f in folders:
        if f.name in models:
            try:
                problems += check_model(f, models)
            except ArtifactError as e:
                problems.append(f"{f.name}: {e}")
    return problems + (_check_source(repo) if check_source else [])


def _check_source(repo: Path) -> list[str]:
    """A repository package_triton wrote must still match the artifact it was made from."""
    from vpexport.manifest import MANIFEST, artifact_digest

    marker = repo / MARKER_FILE
    if not marker.is_file():
        return []  # written by hand or by another tool: nothing recorded to compare
    try:
        rec = json.loads(marker.read_text())
        src, want = Path(rec["artifact"]), rec["artifact_digest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MARKER_FILE}: unreadable ({type(e).__name__}); re-run `vpexport package`"]
    if not (src / MANIFEST).is_file():
        return []  # the repository was moved away from its artifact (e.g. copied to a server)
    try:
        now = artifact_digest(json.loads((src / MANIFEST).read_text()))
    except (OSError, ValueError) as e:
        return [f"{src / MANIFEST}: unreadable ({type(e).__name__})"]
    if now != want:
        return [f"{repo} was made from an earlier export of {src} (its graphs or runtime files changed since); "
                f"re-run `vpexport package {src} --triton {repo} --force`"]
    return []

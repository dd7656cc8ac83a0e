"""`vpexport build`: the whole pipeline for one recipe, staged and resumable.

Stages run in a staging folder beside the final one (`artifacts/.<name>.staging/`), a real copy
of the previous artifact (no hard links: nothing written there reaches the previous artifact);
the final folder is replaced by two renames only when every stage succeeded, so the folder is
either the complete result of one build or the previous one. The whole build holds the artifact
lock (vpexport/artifact_lock.py): a second writer is refused, and what a killed build left (temp
folders, an interrupted swap) is repaired first. Each stage records a key (a hash of what it
depends on) in the manifest; a re-run with unchanged inputs reuses a finished stage only after
its outputs verify: the manifest's file hashes for export and later, the recorded sha256 of
schedule.json for calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vpexport import __version__
from vpexport.errors import RuntimeUnavailable
from vpexport.paths import SCHEDULE_FILE, artifact_dir


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # (ctx) -> dict summary
    applies: Callable = lambda recipe: True  # noqa: E731
    key_sections: tuple[str, ...] = ()  # recipe sections this stage depends on (beyond upstream keys)
    needs_data: tuple[str, ...] = ()  # task.data splits it reads (checked before the first stage runs)
    optional_runtime: bool = False  # RuntimeUnavailable -> skipped with one line, not a failure


class Context:
    def __init__(self, recipe, staging: Path, log, final: Path | None = None):
        self.recipe, self.dir, self.log = recipe, staging, log
        self.final = final or staging  # where the staging folder is swapped to
        self.schedule = None
        self.keys: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}


# ----------------------------------------------------------------------------- fingerprints
def _files_fingerprint(paths) -> list:
    out = []
    for p in filter(None, paths):
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
        out += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return out


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _section(recipe, name: str):
    sec = recipe.resolved().get(name)
    if name == "model" and isinstance(sec, dict):
        # Where PyTorch ran does not change what a stage makes (export traces on the CPU; validation
        # holds every device to the same tolerances), so a change of device reuses finished stages.
        sec = {k: v for k, v in sec.items() if k != "device"}
    return sec


# ----------------------------------------------------------------------------- stages
def _stage_calibrate(ctx: Context) -> dict:
    from vpexport.calibrate.search import calibrate

    r = calibrate(ctx.recipe, ctx.dir, progress=True)
    return {"schedule": r["schedule"], "flops": r["flops"], "eval": r["eval"]}


def _stage_export(ctx: Context) -> dict:
    from vpexport.export.onnx_export import export_artifacts

    return export_artifacts(ctx.recipe, ctx.dir, ctx.schedule, log=ctx.log)


def _stage_engine(ctx: Context) -> dict:
    from vpexport.engine.build import build_engines

    e = ctx.recipe.engine
    return build_engines(ctx.dir, e.precision, e.workspace_gb, e.timing_cache, e.version_compatible, echo=ctx.log)


def _stage_validate(ctx: Context) -> dict:
    from vpexport.errors import ValidationFailed
    from vpexport.validate.compare import format_report, validate_artifacts

    report = validate_artifacts(ctx.dir, log=ctx.log)
    # Reported under the folder the build leaves, not the staging folder it is swapped from.
    ctx.log(format_report({**report, "artifact_dir": str(ctx.final)}))
    if not report["passed"]:
        raise ValidationFailed(
            f"{len(report.get('failures', []))} mismatches between the artifacts and PyTorch (report above)",
            field="validate",
            fix="inspect the report; the staging folder is kept for `vpexport validate`",
        )
    return {"passed": True, "generation_match_rate": report["generation_match_rate"]}


def _stage_package(ctx: Context) -> dict:
    from vpexport.package.triton import package_triton

    return package_triton(ctx.dir, ctx.dir / "triton", ctx.recipe.deploy, log=ctx.log, record_as=ctx.final)


STAGES: tuple[Stage, ...] = (
    Stage("calibrate", _stage_calibrate, lambda r: r.calibrating, ("model", "task", "pruning"), ("calib", "eval")),
    Stage("export", _stage_export, key_sections=("model", "task", "pruning", "export")),
    Stage("engine", _stage_engine, key_sections=("engine",), optional_runtime=True),
    Stage("validate", _stage_validate, key_sections=("validate",), needs_data=("eval",)),
    Stage("package", _stage_package, lambda r: r.deploy.triton.enabled, ("deploy",)),
)


# ----------------------------------------------------------------------------- driver
def ensure_model(recipe, log) -> None:
    """Create a recipe's random-weight stand-in when `model.synth` is set and it is missing."""
    syn = recipe.model.synth
    if syn is None or (Path(recipe.model.path) / "config.json").is_file():
        return
    from vpexport.testbed.synth import synth

    log(f"[build] creating the random-weight stand-in {syn.arch} at {recipe.model.path} (speed work only)")
    target = Path(recipe.model.path)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    synth(syn.arch, tmp, layers=syn.layers, hidden=syn.hidden, vision_layers=syn.vision_layers, dtype=recipe.synth_dtype, seed=syn.seed,
          image_size=recipe.model.image_size)
    tmp.rename(target)


def _shares_inodes(a: Path, b: Path) -> bool:
    """Whether any file of `a` is the same inode as one of `b` (an older vpexport's hard-linked staging)."""
    if not (a.is_dir() and b.is_dir()):
        return False
    ours = {(f.stat().st_dev, f.stat().st_ino) for f in b.rglob("*") if f.is_file()}
    return any((f.stat().st_dev, f.stat().st_ino) in ours for f in a.rglob("*") if f.is_file())


def _prepare_staging(final: Path, staging: Path, log) -> None:
    if staging.exists() and _shares_inodes(staging, final):
        log(f"[build] {staging} shares files with {final}: starting it afresh")
        shutil.rmtree(staging)
    if staging.exists():
        return  # a previous failed build: its finished stages are reused by key, after verification
    if final.exists():
        # A real copy, never hard links: a stage that rewrites a file in place (a report, the
        # resolved recipe) must not change the previous artifact, which stays whole until the swap.
        log(f"[build] copying {final} into {staging}")
        shutil.copytree(final, staging)
    else:
        staging.mkdir(parents=True)


def _previous_stages(staging: Path) -> dict:
    """The finished stages' records ({name: record}) of the staging folder's manifest."""
    try:
        m = json.loads((staging / "manifest.json").read_text())
        stages = m.get("build", {}).get("stages", {})
        return {k: v for k, v in stages.items() if isinstance(v, dict) and v.get("status") == "done"}
    except (OSError, ValueError, AttributeError):
        return {}


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stage_outputs_intact(staging: Path) -> bool:
    from vpexport.errors import ArtifactError
    from vpexport.manifest import read_manifest

    try:
        read_manifest(staging)
        return True
    except ArtifactError:
        return False


def build(recipe, out: str | Path | None = None, force: bool = False, log=print) -> dict:
    """Run the stages into the staging folder and swap it into place, holding the artifact lock."""
    from vpexport.artifact_lock import artifact_lock, staging_path
    from vpexport.recipe import load_recipe

    t_start = time.perf_counter()
    ensure_model(recipe, log)
    if recipe.model.synth is not None:
        device = recipe.model.device  # a --device override survives the reload
        recipe = load_recipe(recipe.source)  # now fully checkable
        recipe.model.device = device
    _check_data(recipe)
    final = artifact_dir(recipe, out)
    with artifact_lock(final, "build") as lock:
        if lock.stale:
            log(f"[build] an earlier vpexport {lock.stale.get('command', '?')} (pid {lock.stale.get('pid', '?')}) "
                "was killed; repaired what it left")
        for r in lock.removed:
            log(f"[build] removed or restored: {r}")
        return _build_locked(recipe, final, staging_path(final), force, log, t_start)


def _check_data(recipe) -> None:
    """Before any weights load: the splits the build's stages read must be named, and every given
    sample file parses (every row, every image path), so a missing split or a malformed line fails
    the build at once, not after minutes of export."""
    from vpexport.data import load_samples

    for split in sorted({s for st in STAGES if st.applies(recipe) for s in st.needs_data}):
        recipe.require_data(split)
    for split in ("calib", "eval"):
        path = getattr(recipe.task.data, split)
        if path:
            load_samples(path, field=f"task.data.{split}")


def _build_locked(recipe, final: Path, staging: Path, force: bool, log, t_start: float) -> dict:
    from vpexport.manifest import update_manifest
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import save_resolved

    if force and staging.exists():
        shutil.rmtree(staging)
    _prepare_staging(final, staging, log)
    ctx = Context(recipe, staging, log, final)
    prev_stages = {} if force else _previous_stages(staging)
    prev = {k: v.get("key") for k, v in prev_stages.items()}
    intact = _stage_outputs_intact(staging) if prev else False
    base = _hash(
        __version__,
        _files_fingerprint([recipe.model.path, recipe.task.data.calib, recipe.task.data.eval]),
    )
    upstream = base
    records = {}
    arch = recipe.resolve_arch()
    for st in STAGES:
        if not st.applies(recipe):
            records[st.name] = {"status": "not requested"}
            continue
        if st.name == "export":  # the schedule is fixed from here on (recipe or calibrated)
            ctx.schedule = resolve_schedule(recipe, arch, staging)
            upstream = _hash(upstream, ctx.schedule.to_dict())
        key = _hash(upstream, [_section(recipe, s) for s in st.key_sections], st.name)
        reusable = prev.get(st.name) == key and (intact or st.name == "calibrate")
        if st.name == "calibrate":
            # Reused only if schedule.json is the file this stage wrote (its hash in the record).
            recorded = (prev_stages.get("calibrate") or {}).get("outputs", {}).get(SCHEDULE_FILE)
            now = _sha256(staging / SCHEDULE_FILE)
            if reusable and (now is None or recorded != now):
                log(f"[build] calibrate: {SCHEDULE_FILE} is missing or not the file calibration wrote; calibrating again")
                reusable = False
        t0 = time.perf_counter()
        if reusable:
            log(f"[build] {st.name}: unchanged inputs, reusing the finished stage")
            records[st.name] = {"status": "done", "key": key, "reused": True}
        else:
            log(f"[build] {st.name} ...")
            try:
                ctx.summaries[st.name] = st.run(ctx) or {}
            except RuntimeUnavailable as e:
                if not st.optional_runtime:
                    raise
                log(f"[build] {st.name}: skipped: {e.one_line()}")
                records[st.name] = {"status": "skipped", "reason": str(e)}
                continue
            records[st.name] = {"status": "done", "key": key, "seconds": round(time.perf_counter() - t0, 2)}
            intact = True
        if st.name == "calibrate":
            records[st.name]["outputs"] = {SCHEDULE_FILE: _sha256(staging / SCHEDULE_FILE)}
        upstream = key
        # Record progress after every stage so a later failure keeps what finished.
        update_manifest(staging, "build", {"stages": records, "complete": False})
    save_resolved(recipe, staging)
    manifest = update_manifest(
        staging,
        "build",
        {"stages": records, "complete": True, "seconds": round(time.perf_counter() - t_start, 2), "vpexport": __version__},
        files=["recipe.resolved.yaml"] + ([SCHEDULE_FILE] if (staging / SCHEDULE_FILE).is_file() else []),
    )
    _swap_into_place(staging, final)
    return {"artifact_dir": str(final), "stages": records, "manifest": manifest, "summaries": ctx.summaries}


def _swap_into_place(staging: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)

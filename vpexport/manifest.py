"""`manifest.json` of an artifact folder: package versions, sha256 of every file, and one section
per stage (export, validation, engine, package, build). No torch import.

    update_manifest(dir, "export", {...}, files=["onnx/vision.onnx", ...])  # atomic (temp + os.replace)
    m = read_manifest(dir)          # ArtifactError (exit 3) on a missing/corrupt file or hash mismatch
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from vpexport.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def package_versions(names=("vpexport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers", "numpy")) -> dict:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; servers (Triton containers) read as other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_raw(directory: Path) -> dict:
    f = directory / MANIFEST
    if not f.is_file():
        raise ArtifactError(
            f"{f} does not exist", field="artifacts", fix="run `vpexport export RECIPE` to create the artifact folder"
        )
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{f} is not valid JSON ({type(e).__name__})", field="artifacts", fix="re-run `vpexport export`") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ArtifactError(f"{f} has no 'files' table", field="artifacts", fix="re-run `vpexport export`")
    if data.get("format") != FORMAT:
        # Refused rather than read (and re-stamped) as if it were ours: its fields may mean something else.
        raise ArtifactError(f"{f} has format {data.get('format')!r}; this vpexport reads format {FORMAT}",
                            field="artifacts", fix="re-export with this vpexport, or use the vpexport that wrote it")
    for rel, info in data["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
            raise ArtifactError(f"{f}: files[{rel!r}] is not a {{size, sha256}} entry", field="artifacts",
                                fix="re-run `vpexport export`")
    return data


REQUIRED_FILES = ("onnx/vision.onnx", "onnx/prefill.onnx", "onnx/decode.onnx")
# `graphs` of a manifest: "local" (the default: the graphs are in onnx/) or "triton" (a Triton
# repository's bls copy, whose graphs are served by Triton's onnxruntime backend, not carried).
GRAPHS_LOCAL, GRAPHS_TRITON = "local", "triton"


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The manifest; with `verify`, every listed file must exist with its recorded sha256, and an
    exported artifact's table must list the three graphs and every file under onnx/ and runtime/."""
    directory = Path(directory)
    data = _load_raw(directory)
    if verify:
        graphs = data.get("graphs", GRAPHS_LOCAL)
        if graphs not in (GRAPHS_LOCAL, GRAPHS_TRITON):
            raise ArtifactError(f"{directory / MANIFEST}: graphs is {graphs!r}, not {GRAPHS_LOCAL!r} or {GRAPHS_TRITON!r}",
                                field="artifacts", fix="re-run `vpexport export`")
        if "export" in data:
            # The top-level schedule is what validate and bench read; it must be the one the graphs
            # were exported with (a manifest without one, or an edited one, describes other graphs).
            exp = data["export"] if isinstance(data["export"], dict) else {}
            sched = data.get("schedule")
            if not isinstance(sched, dict) or not isinstance(sched.get("points"), list) or "method" not in sched:
                raise ArtifactError(f"{directory / MANIFEST} has no valid schedule (got {str(sched)[:80]})",
                                    field="artifacts", fix="re-run `vpexport export`")
            if exp.get("schedule") != sched:
                raise ArtifactError(f"{directory / MANIFEST}: its schedule is not the one the graphs were exported with "
                                    "(export.schedule)", field="artifacts", fix="re-run `vpexport export`")
        if "export" in data and graphs == GRAPHS_LOCAL:  # a Triton bls copy carries no onnx/
            # Every file the runtime reads must be in the table: one left out would be used unverified.
            for rel in REQUIRED_FILES:
                if rel not in data["files"]:
                    raise ArtifactError(f"{directory / MANIFEST} does not list {rel}", field="artifacts",
                                        fix="re-run `vpexport export`")
            for sub in ("onnx", "runtime"):
                for f in sorted((directory / sub).rglob("*")) if (directory / sub).is_dir() else ():
                    rel = f.relative_to(directory).as_posix()
                    if f.is_file() and rel not in data["files"]:
                        raise ArtifactError(f"{f} is not in the file table of {directory / MANIFEST} (it would be used unverified)",
                                            field="artifacts", fix="remove the file, or re-run `vpexport export`")
        for rel, info in data["files"].items():
            p = directory / rel
            if not p.is_file():
                raise ArtifactError(
                    f"artifact file {p} is missing (listed in {MANIFEST})",
                    field="artifacts",
                    fix="re-run `vpexport export` (or restore the file)",
                )
            if p.stat().st_size != info.get("size"):
                raise ArtifactError(
                    f"artifact file {p} is corrupt: {p.stat().st_size} bytes, manifest says {info.get('size')}",
                    field="artifacts",
                    fix="re-run `vpexport export` (or restore the file)",
                )
            got = sha256_file(p)
            if got != info.get("sha256"):
                raise ArtifactError(
                    f"artifact file {p} does not match its manifest hash (sha256 {got[:12]}..., expected {str(info.get('sha256'))[:12]}...)",
                    field="artifacts",
                    fix="re-run `vpexport export` (or restore the file)",
                )
    return data


# What a derived output (a validation, a Triton repository, a bench result) was made from: the
# hashes of the graphs, engines and runtime assets. A re-export changes it; moving the folder does not.
DIGEST_PREFIXES = ("onnx/", "engines/", "runtime/")


def artifact_digest(manifest: dict) -> str:
    """sha256 over the (path, sha256) pairs of the manifest's graphs, engines and runtime assets."""
    files = manifest.get("files") or {}
    pairs = sorted((rel, (info or {}).get("sha256")) for rel, info in files.items()
                   if isinstance(info, dict) and rel.startswith(DIGEST_PREFIXES))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def update_manifest(directory: str | Path, section: str | None, data: dict | None, files: list[str] = ()) -> dict:
    """Set `section` (if given) and (re)hash `files` (paths relative to `directory`); atomic write."""
    directory = Path(directory)
    try:
        m = _load_raw(directory)
    except ArtifactError:
        if (directory / MANIFEST).exists():
            raise
        m = {"format": FORMAT, "files": {}}
    m["format"] = FORMAT
    m["packages"] = package_versions()
    for rel in files:
        rel = Path(rel).as_posix()
        p = directory / rel
        if not p.is_file():
            raise ArtifactError(f"cannot hash {p}: not a file", field="artifacts", fix="check the export step")
        m["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    m["files"] = dict(sorted(m["files"].items()))
    if section is not None:
        m[section] = data
    _write_json_atomic(directory / MANIFEST, m)
    return m

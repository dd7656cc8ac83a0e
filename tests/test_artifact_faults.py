"""The artifact lifecycle under faults, with real processes, real signals and real file systems:
one writer per folder (a lock, taken over from a killed holder), a killed or failed rebuild that
leaves the previous artifact byte-identical, temp folders removed on SIGTERM and after SIGKILL,
an interrupted swap restored, reuse only of outputs that verify, and environment faults (disk
full, read-only, a file in the way) as one line with their exit code."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.artifact_helpers import ROOT, build_checkpoint, cli, make_eval, write_recipe


def _snapshot(folder: Path) -> dict:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _temps(folder: Path) -> list:
    return [p.name for p in folder.rglob(".*") if p.name.startswith((".export-", ".engines-", ".manifest."))
            or ".tmp" in p.name]


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "vpexport", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, needle: str, timeout: float = 120) -> str:
    """Read the process's stderr until a line contains `needle`; returns what was read."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{needle!r} never appeared: {''.join(seen)[-2000:]}")


def _one_error_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1, r.stderr[-3000:]
    return err[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    ckpt = build_checkpoint(d / "mini")
    ev = make_eval(d / "data", n=2)
    rp = write_recipe(d / "f_fastv.yaml", ckpt, "fastv", eval_file=ev, samples=2)
    out = d / "art"
    r = cli("build", rp, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "recipe": rp, "out": out}


# --------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(built):
    from vpexport.artifact_lock import artifact_lock

    before = _snapshot(built["out"])
    with artifact_lock(built["out"], "build"):
        for args in (("build", built["recipe"]), ("export", built["recipe"]), ("validate",)):
            target = ("--out", built["out"]) if args[0] != "validate" else (built["out"],)
            r = cli(*args, *target)
            assert r.returncode == 7, (args, r.stderr[-2000:])
            line = _one_error_line(r)
            assert f"pid {os.getpid()}" in line and "being written by another vpexport process" in line
    assert _snapshot(built["out"]) == before


def test_the_lock_of_a_killed_holder_is_taken_over(built):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from vpexport.artifact_lock import artifact_lock\n"
        f"with artifact_lock({str(built['out'])!r}, 'build'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = cli("build", built["recipe"], "--out", built["out"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(pid {holder.pid}) was killed" in r.stderr


# --------------------------------------------------------------------------- killed / failed rebuilds
def test_a_killed_rebuild_leaves_the_previous_artifact_byte_identical(built):
    out = built["out"]
    before = _snapshot(out)
    p = _popen("build", built["recipe"], "--out", out, "--force")
    _wait_for(p, "[export] prefill.onnx")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _snapshot(out) == before
    staging = out.with_name(f".{out.name}.staging")
    # the staging copy shares no file with the artifact (a rewrite there cannot reach it)
    inodes = {f.stat().st_ino for f in out.rglob("*") if f.is_file()}
    assert not any(f.stat().st_ino in inodes for f in staging.rglob("*") if f.is_file())
    assert any(staging.glob(".export-*"))  # SIGKILL leaves the export's temp folder behind ...
    r = cli("build", built["recipe"], "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _temps(out), _temps(out)  # ... and the next build removes it, never renames it in
    assert not staging.exists() and not list(out.parent.glob(f".{out.name}.old-*"))
    from vpexport.manifest import read_manifest

    read_manifest(out)  # every file verifies


def test_sigterm_during_export_removes_its_temp_folder(built, tmp_path):
    out = tmp_path / "exp"
    p = _popen("export", built["recipe"], "--out", out)
    _wait_for(p, "[export] prefill.onnx")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert not _temps(out), _temps(out)


def test_an_interrupted_swap_is_restored_before_anything_reads_the_folder(built):
    out = built["out"]
    before = _snapshot(out)
    old = out.with_name(f".{out.name}.old-999999")
    out.rename(old)  # what a build killed between its two renames leaves
    r = cli("validate", out, "--samples", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_dir() and not old.exists()
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


def test_a_staging_folder_sharing_files_with_the_artifact_is_started_afresh(built):
    out = built["out"]
    staging = out.with_name(f".{out.name}.staging")
    import shutil

    shutil.copytree(out, staging, copy_function=os.link)  # an older vpexport's hard-linked staging
    before = _snapshot(out)
    r = cli("build", built["recipe"], "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shares files with" in r.stderr
    assert {k: v for k, v in _snapshot(out).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


# --------------------------------------------------------------------------- environment faults
def _mount_tmpfs(where: Path, size: str, ro: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()[:100]}); needs root")


def _umount(where: Path):
    subprocess.run(["umount", str(where)], capture_output=True)


def test_disk_full_is_one_line_with_exit_8_and_leaves_nothing_half_written(built, tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "600k")
    try:
        r = cli("export", built["recipe"], "--out", mnt / "art")
        assert r.returncode == 8, r.stderr[-2000:]
        line = _one_error_line(r)
        assert "no space left on the device" in line and "--out" in line
        assert not _temps(mnt), _temps(mnt)
        assert not (mnt / "art" / "manifest.json").exists()
    finally:
        _umount(mnt)


def test_a_read_only_file_system_is_one_line_with_exit_8(built, tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "1m", ro=True)
    try:
        for cmd in ("export", "build"):
            r = cli(cmd, built["recipe"], "--out", mnt / "art")
            assert r.returncode == 8, (cmd, r.stderr[-2000:])
            assert "read-only" in _one_error_line(r)
    finally:
        _umount(mnt)


def test_out_naming_a_file_is_one_line_with_exit_2(built, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for cmd in ("export", "build", "calibrate"):
        r = cli(cmd, built["recipe"], "--out", f)
        assert r.returncode == 2, (cmd, r.stderr[-2000:])
        assert "is a file, not an artifact folder" in _one_error_line(r)
    assert f.read_text() == "x"


# --------------------------------------------------------------------------- verified reuse
def test_a_file_missing_from_the_file_table_is_refused(built, tmp_path):
    import shutil

    art = tmp_path / "copy"
    shutil.copytree(built["out"], art)
    (art / "runtime" / "extra.json").write_text("{}")
    r = cli("run", art, "--image", ROOT / "data/mini/images/eval/eval_00000.png", "--prompt", "what?")
    assert r.returncode == 3 and "is not in the file table" in _one_error_line(r)
    (art / "runtime" / "extra.json").unlink()
    m = json.loads((art / "manifest.json").read_text())
    del m["files"]["onnx/decode.onnx"]
    (art / "manifest.json").write_text(json.dumps(m))
    r = cli("run", art, "--image", ROOT / "data/mini/images/eval/eval_00000.png", "--prompt", "what?")
    assert r.returncode == 3 and "does not list onnx/decode.onnx" in _one_error_line(r)


def test_an_edited_schedule_json_is_calibrated_again_not_reused(tmp_path):
    """The calibrate stage is reused only if schedule.json is the file it wrote; a standalone
    export refuses a schedule.json that differs from the one the manifest hashed."""
    from vpexport.testbed.data import generate
    from vpexport.testbed.model import PROMPT_TEMPLATE, build_mini, save_checkpoint

    m, _, p = build_mini(0)
    save_checkpoint(tmp_path / "model", m, p, {"template": PROMPT_TEMPLATE})
    generate(tmp_path / "data", n_calib=4, n_eval=4)
    rp = tmp_path / "cal.yaml"
    rp.write_text(
        f"name: cal\nmodel: {{path: {tmp_path / 'model'}}}\n"
        f"task:\n  type: vqa\n  data: {{calib: {tmp_path}/data/vqa/calib.jsonl, eval: {tmp_path}/data/vqa/eval.jsonl}}\n"
        '  prompt: "SYSTEM: read the digits. USER: <image>\\n{question} ASSISTANT:"\n  max_new_tokens: 3\n'
        "pruning:\n  method: fastv\n  calibrate: {tolerance: 0.5, max_samples: 4}\n"
        "export:\n  text_length: {max: 24}\nvalidate:\n  samples: 2\n")
    out = tmp_path / "art"
    r = cli("build", rp, "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sched = out / "schedule.json"
    original = json.loads(sched.read_text())
    edited = json.loads(sched.read_text())
    k = edited["schedule"]["points"][0]["keep"]
    edited["schedule"]["points"][0]["keep"] = k + 1 if k == 1 else k - 1
    sched.write_text(json.dumps(edited, indent=2))

    r = cli("export", rp, "--out", out)
    assert r.returncode == 3 and "was changed after calibration" in _one_error_line(r)

    r = cli("build", rp, "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not the file calibration wrote; calibrating again" in r.stderr
    assert json.loads(sched.read_text())["schedule"] == original["schedule"]  # the search is deterministic
    from vpexport.manifest import read_manifest

    man = read_manifest(out)
    assert man["export"]["schedule"] == original["schedule"]


def test_derived_outputs_name_the_final_folder_and_a_re_export_removes_a_stale_triton_repo(built, tmp_path):
    """`vpexport build` validates and packages its staging folder: what they record must name the
    folder the build swapped into place (and the digest of its graphs), and exporting into that
    folder again removes the Triton repository made from the previous graphs."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
    from vpexport.manifest import artifact_digest

    rp = tmp_path / "deploy.yaml"
    rp.write_text(built["recipe"].read_text() + "deploy:\n  triton: {enabled: true, max_batch_size: 4}\n")
    out = tmp_path / "art"
    r = cli("build", rp, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    marker = json.loads((out / "triton" / ".vpexport-package.json").read_text())
    assert marker["artifact"] == str(out.resolve()) and marker["artifact_digest"] == artifact_digest(m)
    assert "artifact_dir" not in m["validation"] and m["validation"]["artifact_digest"] == artifact_digest(m)
    assert ".staging" not in (out / "triton" / ".vpexport-package.json").read_text()
    r = cli("package", "--check", out / "triton")
    assert r.returncode == 0, r.stderr
    rp.write_text(rp.read_text().replace("keep: 72", "keep: 60"))  # other graphs
    r = cli("export", rp, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "triton").exists(), "triton/ still serves the previous graphs"
    assert "package" not in json.loads((out / "manifest.json").read_text())

"""One writer per artifact folder, and a folder that is whole when that writer starts.

    with artifact_lock(folder, "build") as lock: ...

takes an exclusive `flock` on `.<name>.lock` beside the folder (not inside it: the folder itself is
renamed into place by `vpexport build`). The kernel drops the lock when the holding process ends,
however it ends, so a lock left by a killed process is never mistaken for a live one: the file
still names the dead holder, `lock.stale` says so, and the next writer takes over. A second writer
while the first is alive gets `ArtifactBusy` (exit 7) naming the holder's pid and command.

Holding the lock, `recover` repairs what a killed writer can leave behind, before anything reads
the folder:
  - a build killed between its two renames (final -> `.<name>.old-PID`, staging -> final): the
    final folder is missing and the old one is renamed back (the previous artifact, unchanged);
    old folders next to a complete final one are removed;
  - temp folders of killed writers inside the folder and its staging folder (`.export-*`,
    `.engines-*`, `.manifest.*.tmp`, `.<x>.tmp-*`): removed, never renamed into place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import ArtifactBusy, StorageError, UserInputError

TEMP_PATTERNS = (".export-*", ".engines-*", ".manifest.*.tmp", ".*.tmp-*", "*.tmp-*", ".schedule.json.tmp")


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def staging_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.staging")


@dataclass
class Lock:
    folder: Path
    stale: dict | None  # the holder a killed process left in the lock file, if any
    removed: list  # temp folders and old copies `recover` removed or restored


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def storage_error(e: OSError, path) -> StorageError:
    """An OSError from writing artifacts as one line (exit 8) naming the path and what to do."""
    what = {
        errno.ENOSPC: ("no space left on the device", "free space there or give --out on another disk"),
        errno.EDQUOT: ("the disk quota is exhausted", "free space there or give --out on another disk"),
        errno.EROFS: ("the file system is read-only", "give --out on a writable disk"),
        errno.EACCES: ("permission denied", "give --out in a folder you can write, or fix its permissions"),
        errno.EPERM: ("operation not permitted", "give --out in a folder you can write, or fix its permissions"),
        errno.ENOTDIR: ("a path component is a file, not a folder", "give --out as a folder path"),
        errno.EEXIST: ("a file is in the way", "remove it or give another --out"),
    }.get(e.errno, (os.strerror(e.errno) if e.errno else str(e), "check the disk and the path"))
    where = getattr(e, "filename", None) or path
    return StorageError(f"cannot write {where}: {what[0]} (errno {e.errno})", field="--out", fix=what[1])


def _remove_temps(folder: Path, removed: list) -> None:
    if not folder.is_dir():
        return
    for pattern in TEMP_PATTERNS:
        for t in folder.glob(pattern):
            if t.name.endswith(".lock"):
                continue
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            else:
                t.unlink(missing_ok=True)
            removed.append(str(t))


def recover(folder: Path) -> list:
    """Repair what a killed writer left (see the module docstring); returns what was touched."""
    removed: list = []
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if olds and not folder.exists():
        olds[-1].rename(folder)  # the previous artifact, as it was before the interrupted swap
        removed.append(f"restored {folder} from {olds[-1].name}")
        olds = olds[:-1]
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)
        removed.append(str(o))
    _remove_temps(folder, removed)
    _remove_temps(staging_path(folder), removed)
    return removed


@contextmanager
def artifact_lock(folder, command: str, create: bool = True):
    """`create`: the folder may not exist yet (build, export, calibrate). With create=False a
    missing folder is not locked (nor its parent made): the command reports it missing itself."""
    folder = Path(folder)
    interrupted = any(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else False
    if not create and not folder.is_dir() and not interrupted:
        yield Lock(folder, None, [])
        return
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} is a file, not an artifact folder", field="--out",
                             fix="give a folder path (it is created), or move the file away")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise storage_error(e, folder) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        h = _read_holder(fd) or {}
        os.close(fd)
        since = time.strftime("%H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
        raise ArtifactBusy(
            f"{folder} is being written by another vpexport process (pid {h.get('pid', '?')}, "
            f"`vpexport {h.get('command', '?')}`, since {since})",
            field="artifacts",
            fix="wait for it to finish or stop it; the lock is released when that process ends",
        ) from None
    try:
        prev = _read_holder(fd)
        pid = int((prev or {}).get("pid", 0) or 0)
        stale = prev if prev and pid != os.getpid() and not _pid_alive(pid) else None
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "started": time.time()}).encode())
            removed = recover(folder)
        except OSError as e:
            raise storage_error(e, folder) from None
        yield Lock(folder, stale, removed)
    finally:
        try:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder named in the file
        except OSError:
            pass
        os.close(fd)  # closing releases the flock

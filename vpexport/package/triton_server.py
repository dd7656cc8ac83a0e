"""Start the `tritonserver` binary shipped in the `nvidia-pytriton` wheel on a model repository.

The wheel (0.7.0) carries a real Triton server with only the Python backend:

    site-packages/pytriton/tritonserver/bin/tritonserver            the server
    site-packages/pytriton/tritonserver/backends/python/            libtriton_python.so + triton_python_backend_utils.py
    site-packages/pytriton/tritonserver/python_backend_stubs/3.X/   triton_python_backend_stub, one per Python version
    site-packages/pytriton/tritonserver/caches/local/               the response cache
    site-packages/nvidia_pytriton.libs/                             libtritonserver and its bundled libraries

What the server needs (this mirrors `pytriton.triton.Triton._prepare_triton_inference_server` and
`pytriton.server.triton_server.TritonServer._get_env`):

* a backend directory whose `python/` folder holds libtriton_python.so, triton_python_backend_utils.py
  AND the stub for *this* interpreter's version (the python backend looks for the stub next to
  itself). The wheel keeps stubs apart, so we assemble that folder (symlinks) in a work dir;
* `LD_LIBRARY_PATH` with `nvidia_pytriton.libs` (libtritonserver) and this interpreter's
  `LIBDIR` first (the stub links `libpython3.X.so.1.0`; without it, it would pick up the
  system's libpython and the system's site-packages);
* `PYTHONHOME` = this interpreter's base prefix and `PYTHONPATH` = its site-packages, so the stub's
  embedded interpreter sees the same numpy / onnxruntime / tokenizers / pillow as we do;
* `--model-control-mode explicit --load-model NAME` to load only the Python-backend model (this
  build has no onnxruntime / tensorrt backend, so `vision`/`prefill`/`decode` cannot load here).

Manual run (what `start_server` does; see docs/triton.md):

    python -m vpexport.package.triton_server REPO --models vlm --http-port 8000

Used by tests/test_triton_server.py. Stop is by process id (the server's own process group).
"""

from __future__ import annotations

import os
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vpexport.errors import RuntimeUnavailable, VpexportError


def _pytriton_root() -> Path:
    try:
        import pytriton  # noqa: F401 (only its location)
    except ImportError:
        raise RuntimeUnavailable(
            "nvidia-pytriton is not installed (it ships the tritonserver binary)",
            field="triton",
            fix="pip install 'vpexport[triton]'  (or: pip install nvidia-pytriton)",
        ) from None
    return Path(pytriton.__file__).resolve().parent


@dataclass
class ServerLayout:
    binary: Path
    libs: Path
    backends: Path  # the wheel's backends/ (python backend without its stub)
    stub: Path
    caches: Path


def find_layout() -> ServerLayout:
    """Where the wheel put the server pieces; RuntimeUnavailable (exit 5) if one is missing."""
    root = _pytriton_root()
    ts = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    lay = ServerLayout(
        binary=ts / "bin" / "tritonserver",
        libs=root.parent / "nvidia_pytriton.libs",
        backends=ts / "backends",
        stub=ts / "python_backend_stubs" / version / "triton_python_backend_stub",
        caches=ts / "caches",
    )
    if not lay.libs.is_dir():  # editable pytriton installs keep them here
        lay.libs = ts / "external_libs"
    for what, p in (("tritonserver binary", lay.binary), ("python backend", lay.backends / "python" / "libtriton_python.so"),
                    (f"python backend stub for Python {version}", lay.stub), ("server libraries", lay.libs)):
        if not p.exists():
            raise RuntimeUnavailable(f"the nvidia-pytriton wheel has no {what} ({p})", field="triton",
                                     fix="reinstall nvidia-pytriton>=0.7 for this Python version")
    return lay


def prepare_backends(work: Path, lay: ServerLayout | None = None) -> Path:
    """A backend directory `work/backends` with the python backend and this interpreter's stub."""
    lay = lay or find_layout()
    dst = work / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted((lay.backends / "python").iterdir()):
        if src.name == "__pycache__":
            continue
        link = dst / src.name
        if not link.exists():
            link.symlink_to(src)
    stub = dst / "triton_python_backend_stub"
    if not stub.exists():
        stub.symlink_to(lay.stub)
    return work / "backends"


def server_env(lay: ServerLayout | None = None, extra_pythonpath=()) -> dict:
    lay = lay or find_layout()
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    ld = [libdir, str(lay.libs)]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    env["PYTHONHOME"] = sys.base_prefix
    pp = [str(p) for p in extra_pythonpath] + list(site.getsitepackages())
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(pp)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # one thread per op in the stubs unless the caller says otherwise (the machine is shared)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    pid: int
    proc: subprocess.Popen
    command: list[str]
    http_url: str
    grpc_url: str
    metrics_url: str
    log_path: Path
    work_dir: Path
    started_at: float = field(default_factory=time.monotonic)
    _tmp: object = None
    final_log: str | None = None

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def server_command(repo, http_port, grpc_port, metrics_port, models, backends: Path, caches: Path,
                   host: str = "127.0.0.1", log_verbose: int = 0) -> list[str]:
    lay_binary = find_layout().binary
    cmd = [
        str(lay_binary),
        f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={backends}",
        f"--cache-directory={caches}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--exit-timeout-secs=5",
        f"--log-verbose={log_verbose}",
    ]
    if models is not None:
        cmd.append("--model-control-mode=explicit")
        cmd += [f"--load-model={m}" for m in models]
    return cmd


def start_server(repo, http_port: int | None = None, grpc_port: int | None = None, metrics_port: int | None = None,
                 models=("vlm",), host: str = "127.0.0.1", work_dir=None, env_extra: dict | None = None,
                 log_verbose: int = 0) -> ServerHandle:
    """Start tritonserver on REPO in the background (its own process group); returns at once.

    `models`: names loaded with `--model-control-mode explicit` (None: load every model in the repo).
    Ports default to free ones. The server's stdout+stderr go to `<work_dir>/tritonserver.log`.
    """
    lay = find_layout()
    repo = Path(repo)
    if not repo.is_dir():
        from vpexport.errors import UserInputError

        raise UserInputError(f"model repository {repo} does not exist", field="--model-repository")
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vpexport-triton-")
        work_dir = tmp.name
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(work, lay)
    http_port = http_port or free_port()
    grpc_port = grpc_port or free_port()
    metrics_port = metrics_port or free_port()
    cmd = server_command(repo, http_port, grpc_port, metrics_port, models, backends, lay.caches, host, log_verbose)
    env = server_env(lay)
    if env_extra:
        env.update(env_extra)
    log_path = work / "tritonserver.log"
    logf = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    logf.close()
    return ServerHandle(pid=proc.pid, proc=proc, command=cmd, http_url=f"{host}:{http_port}",
                        grpc_url=f"{host}:{grpc_port}", metrics_url=f"{host}:{metrics_port}",
                        log_path=log_path, work_dir=work, _tmp=tmp)


def wait_ready(handle: ServerHandle, models=("vlm",), timeout: float = 120.0) -> float:
    """Block until the server and `models` are ready (HTTP /v2/health/ready and /v2/models/M/ready).

    Returns the seconds since start. RuntimeUnavailable with the log's tail if the server exits
    or is not ready within `timeout`.
    """
    import http.client

    def ok(path):
        host, port = handle.http_url.rsplit(":", 1)
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            return r.status == 200
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeUnavailable(f"tritonserver exited with code {handle.proc.returncode}: {_log_error(handle.log())}",
                                     field="triton", fix=f"see the server log ({handle.log_path})")
        if ok("/v2/health/ready") and all(ok(f"/v2/models/{m}/ready") for m in (models or ())):
            return time.monotonic() - handle.started_at
        time.sleep(0.25)
    tail = " | ".join(handle.log().strip().splitlines()[-8:])
    raise RuntimeUnavailable(f"tritonserver not ready after {timeout:.0f} s: {tail}", field="triton")


# Error lines tritonserver prints on a machine without a GPU driver, before it goes on normally.
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)


def _log_error(log: str) -> str:
    """The server's own error line (e.g. a model that failed to load), else the log's last line.

    A CPU-only server logs CUDA errors at start that stop nothing; they are passed over so that the
    line returned is the one that made the server exit."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or ln.startswith("E")]
    fatal = [ln for ln in errors if not any(b in ln for b in _BENIGN_ERRORS)]
    for ln in fatal or errors:
        return ln[:400]
    return lines[-1][:400] if lines else "(empty log)"


def stop(handle: ServerHandle, timeout: float = 30.0) -> int | None:
    """Stop the server by its pid: SIGTERM (Triton unloads its models and stops its python stubs),
    SIGKILL to its process group after `timeout`; then any stub left in that group is killed too."""
    proc = handle.proc
    if proc.poll() is None:
        try:
            os.kill(handle.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(handle.pid)
            proc.wait(timeout=10)
    _killpg(handle.pid)  # start_new_session: the group id is the server's pid; stubs left behind die here
    handle.final_log = handle.log()
    if handle._tmp is not None:
        handle._tmp.cleanup()
        handle._tmp = None
    return proc.returncode


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None):  # python -m vpexport.package.triton_server REPO [--models a,b] [--http-port N]
    import argparse

    ap = argparse.ArgumentParser(description="Run the nvidia-pytriton tritonserver on a model repository.")
    ap.add_argument("repo")
    ap.add_argument("--models", default="vlm", help="comma-separated models to load ('' = all)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--print-command", action="store_true", help="print the environment and command line, do not run")
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m] or None
    if a.print_command:
        lay = find_layout()
        work = Path(tempfile.mkdtemp(prefix="vpexport-triton-"))
        backends = prepare_backends(work, lay)
        env = server_env(lay)
        for k in ("LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONPATH"):
            print(f"export {k}={env[k]}")
        print(" ".join(server_command(a.repo, a.http_port, a.grpc_port, a.metrics_port, models, backends, lay.caches, a.host)))
        return
    # SIGTERM / SIGHUP (a service manager, `kill`, a closed terminal) unwind like Ctrl-C, so the
    # `finally` below stops tritonserver (its own session: it would outlive us) and removes the work dir.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    h = None
    try:
        h = start_server(a.repo, a.http_port, a.grpc_port, a.metrics_port, models, a.host)
        t = wait_ready(h, models or ())
        print(f"tritonserver pid {h.pid} ready in {t:.1f} s on http://{h.http_url} grpc {h.grpc_url} (log {h.log_path}); "
              "Ctrl-C or SIGTERM stops it", flush=True)
        h.proc.wait()
        if h.proc.returncode:
            print(f"error: tritonserver exited with {h.proc.returncode}: {_log_error(h.log())}", file=sys.stderr)
            sys.exit(5)
    except KeyboardInterrupt:
        pass
    except VpexportError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        if h is not None:
            stop(h)


def _interrupt(signum, frame):
    raise KeyboardInterrupt

if __name__ == "__main__":
    main()

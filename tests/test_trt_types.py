"""The TensorRT code (vpexport/engine/, vpexport/runtime/trt_session.py) type-checked with mypy
against tensorrt-stubs 10.13: the real API's names and signatures, without TensorRT's libraries
(which cannot be installed on machines without an NVIDIA GPU). The README's test line installs
both (`tensorrt-stubs` with --no-deps: it depends on the `tensorrt` installer package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trt_stubs import stub_dir

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["vpexport/engine", "vpexport/runtime/trt_session.py"]


def _mypy(tmp_path: Path, *targets: str) -> list[str]:
    pytest.importorskip("mypy", reason="mypy is not installed (the `test` extra installs it)")
    stubs = stub_dir(tmp_path)
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    env = {**os.environ, "MYPYPATH": str(stubs)}
    r = subprocess.run([sys.executable, "-m", "mypy", "--check-untyped-defs", "--follow-imports=silent",
                        "--ignore-missing-imports", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
                        *targets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # The stubs' own files have errors of their own (names such as `bool` shadowed); only ours count.
    return [ln for ln in r.stdout.splitlines() if not ln.startswith(str(stubs)) and ": error:" in ln]


def test_tensorrt_code_passes_mypy_against_the_stubs(tmp_path):
    errors = _mypy(tmp_path, *CHECKED)
    assert errors == [], "\n".join(errors)


def test_the_check_sees_the_real_api(tmp_path):
    """A control: a misspelt TensorRT call is an error, so the passing check above read the stubs."""
    bad = tmp_path / "uses_trt.py"
    bad.write_text("def f() -> None:\n    import tensorrt as trt\n\n"
                   "    b = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "    b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
                   "    b.build_serialised_network()\n")
    errors = _mypy(tmp_path, str(bad))
    assert len(errors) == 1 and "build_serialised_network" in errors[0], errors

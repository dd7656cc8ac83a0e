"""A real Triton server (the nvidia-pytriton wheel's tritonserver, python backend only) serving the
packaged repository of recipes/mini_vqa.yaml on 127.0.0.1.

* inprocess mode: 24 requests, 4 at a time from 4 client threads through tritonclient.http; every
  answer must equal `vpexport run ARTIFACT_DIR` (the torch-free runtime) on the same image/prompt.
* bls mode: the vlm model drives vision/prefill/decode through BLS requests. This server build
  has no onnxruntime backend, so the test swaps those three configs for python-backend stand-ins
  that run the same model.onnx with ONNX Runtime and keep the packaged inputs/outputs.

The artifact is exported into a tmp dir from recipes/mini_vqa.yaml: with the trained checkpoint
when `vpexport/testbed/checkpoints/mini-llava` exists, else with an untrained mini model built in
the tmp dir (same architecture and recipe). The server is stopped by its process id.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (pip install 'vpexport[triton]')")
pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) is not installed")

from vpexport.package.triton_server import find_layout, start_server, stop, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mini_vqa.yaml"
N_REQUESTS = 24
CONCURRENCY = 4
UNTRAINED_SCALE = 6.0  # 24 questions -> ~22 distinct answers from the untrained mini model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import yaml

    from vpexport.export.onnx_export import export_artifacts
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe

    try:
        find_layout()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the nvidia-pytriton wheel has no usable tritonserver here: {e}")
    tmp = tmp_path_factory.mktemp("triton_art")
    recipe_path = RECIPE
    raw = yaml.safe_load(RECIPE.read_text())
    ckpt = (RECIPE.parent / raw["model"]["path"]).resolve()
    if not (ckpt / "config.json").is_file():  # no trained checkpoint here: same model, untrained
        from vpexport.testbed.model import build_mini, save_checkpoint

        import torch

        model, _, proc = build_mini(seed=0)
        with torch.no_grad():  # fresh weights answer every input alike; larger ones make answers input-dependent
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(UNTRAINED_SCALE)
        save_checkpoint(tmp / "ckpt", model, proc, {"untrained": True})
        raw["model"]["path"] = str(tmp / "ckpt")
        raw["task"]["data"] = {}
        recipe_path = tmp / "mini_vqa.yaml"
        recipe_path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(recipe_path)
    arch = recipe.resolve_arch()
    art = tmp / "artifacts" / "mini_vqa"
    if recipe.calibrating:
        # This test is about serving, not about the schedule's choice: with no calibration run in
        # this tmp dir, serve the method's published default (HiMAP's for method auto).
        method = "himap" if recipe.pruning.method == "auto" else None
        sched = recipe.default_schedule(arch, method)
    else:
        sched = resolve_schedule(recipe, arch, art)
    export_artifacts(recipe, art, sched, log=lambda m: None)
    return art


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """(image path, question) pairs from the digit-grid VQA generator."""
    from vpexport.testbed.data import generate

    d = tmp_path_factory.mktemp("triton_data")
    generate(d, seed=5, n_calib=N_REQUESTS, n_eval=0)
    recs = [json.loads(line) for line in (d / "vqa" / "calib.jsonl").read_text().splitlines()]
    return [((d / "vqa" / r["image"]).resolve(), r["question"]) for r in recs][:N_REQUESTS]


@pytest.fixture(scope="module")
def reference(artifact, samples):
    """`vpexport run ARTIFACT_DIR --image P --prompt Q --json` for each sample (the runtime's answer)."""
    from click.testing import CliRunner

    from vpexport.cli import cli

    runner = CliRunner()
    out = []
    for img, q in samples:
        r = runner.invoke(cli, ["run", str(artifact), "--image", str(img), "--prompt", q, "--json"])
        assert r.exit_code == 0, r.output
        out.append(json.loads(r.output)["answers"][0]["text"])
    return out


def _infer_all(url, samples, model="vlm"):
    """Send every sample, CONCURRENCY at a time, each thread with its own HTTP client."""
    import tritonclient.http as httpclient

    local = threading.local()
    clients = []

    def one(item):
        if not hasattr(local, "c"):
            local.c = httpclient.InferenceServerClient(url, network_timeout=120.0)
            clients.append(local.c)
        img, q = item
        image = httpclient.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[Path(img).read_bytes()]], dtype=np.object_))
        prompt = httpclient.InferInput("prompt", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[q.encode()]], dtype=np.object_))
        res = local.c.infer(model, [image, prompt], outputs=[httpclient.InferRequestedOutput("text")])
        return res.as_numpy("text")[0, 0].decode(), threading.get_ident()

    try:
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as ex:
            results = list(ex.map(one, samples))
    finally:
        for c in clients:
            c.close()
    return [r[0] for r in results], {r[1] for r in results}


def _stats(url, model):
    """(inference_count, execution_count) of MODEL: fewer executions than inferences = dynamic batching."""
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url)
    try:
        st = c.get_inference_statistics(model)["model_stats"][0]
    finally:
        c.close()
    return int(st["inference_count"]), int(st["execution_count"])


def _serve_and_compare(repo, models, samples, reference, tmp_path, min_requests=20):
    h = start_server(repo, models=models, work_dir=tmp_path / "server")
    try:
        ready_s = wait_ready(h, models, timeout=180)
        t0 = time.monotonic()
        answers, threads = _infer_all(h.http_url, samples)
        took = time.monotonic() - t0
        # The server counts an inference after its response is sent: wait briefly for the last ones.
        deadline = time.monotonic() + 10
        while (stats := _stats(h.http_url, "vlm"))[0] < len(samples) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        rc = stop(h)
    assert h.proc.poll() is not None, "the server is still running after stop()"
    with pytest.raises(ProcessLookupError):
        os.kill(h.pid, 0)
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(answers, reference)) if a != b]
    print(f"\n[triton] {models}: ready in {ready_s:.1f} s, {len(answers)} requests ({CONCURRENCY} at a time, "
          f"{len(threads)} client threads) in {took:.1f} s, {len(answers) - len(mismatches)}/{len(answers)} "
          f"answers equal vpexport run ({len(set(reference))} distinct); vlm ran {stats[1]} executions for "
          f"{stats[0]} inferences; server exit code {rc}")
    assert len(answers) == len(samples) >= min_requests
    assert len(threads) > 1
    assert stats[0] == len(samples)
    assert len(set(reference)) > 1, "the reference answers are all alike: the comparison would prove little"
    assert not mismatches, f"server answers differ from `vpexport run`: {mismatches[:3]}"
    assert rc == 0, h.log()[-2000:]


def test_server_inprocess_matches_vpexport_run(artifact, samples, reference, tmp_path):
    from vpexport.package.triton import check_repository, package_triton

    repo = tmp_path / "repo"
    s = package_triton(artifact, repo, None)  # deploy.triton of the exported recipe: inprocess, cpu
    assert s["deploy"]["mode"] == "inprocess" and check_repository(repo) == []
    _serve_and_compare(repo, ["vlm"], samples, reference, tmp_path)


STANDIN = '''"""Test stand-in: the packaged ONNX graph run by ONNX Runtime inside a python-backend model."""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel:
    def initialize(self, args):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.s = ort.InferenceSession(os.path.join(HERE, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.s.get_inputs()]
        self.outputs = [o.name for o in self.s.get_outputs()]

    def execute(self, requests):
        responses = []
        for r in requests:
            feeds = dict((n, pb_utils.get_input_tensor_by_name(r, n).as_numpy()) for n in self.inputs)
            outs = self.s.run(None, feeds)
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def test_server_bls_matches_vpexport_run(artifact, samples, reference, tmp_path):
    from vpexport.package.triton import COMPONENTS, check_repository, package_triton

    repo = tmp_path / "repo"
    package_triton(artifact, repo, {"enabled": True, "max_batch_size": 8, "mode": "bls"})
    assert check_repository(repo) == []
    for n in COMPONENTS:  # onnxruntime_onnx -> python stand-in with the same inputs/outputs
        c = repo / n / "config.pbtxt"
        c.write_text(re.sub(r'platform: "onnxruntime_onnx"', 'backend: "python"', c.read_text()))
        (repo / n / "1" / "model.py").write_text(STANDIN)
    assert check_repository(repo) == []  # the BLS wiring still names models with those inputs/outputs
    n = 8  # fewer requests: every decode step is a BLS round trip
    _serve_and_compare(repo, ["vision", "prefill", "decode", "vlm"], samples[:n], reference[:n], tmp_path, min_requests=n)


def test_server_inprocess_openvino_matches_vpexport_run(artifact, samples, reference, tmp_path):
    """The python model runs the graphs with OpenVINO (f32) on CPU instances: answers equal ONNX Runtime's."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'vpexport[openvino]')")
    from vpexport.package.triton import check_repository, package_triton

    repo = tmp_path / "repo"
    s = package_triton(artifact, repo, None, provider="openvino", precision="f32")
    assert s["models"]["vlm"]["provider"] == "openvino" and check_repository(repo) == []
    cfg = (repo / "vlm" / "config.pbtxt").read_text()
    assert re.search(r'key: "provider"\s+value \{\s+string_value: "openvino"', cfg)
    _serve_and_compare(repo, ["vlm"], samples, reference, tmp_path)


def test_sigterm_to_the_server_command_stops_tritonserver_and_removes_its_work_dir(artifact, tmp_path):
    """`python -m vpexport.package.triton_server` under a service manager: SIGTERM stops the server
    it started (tritonserver runs in its own session, so it would outlive us) and removes the work dir."""
    import signal
    import subprocess
    import sys

    from vpexport.package.triton import package_triton
    from vpexport.package.triton_server import free_port

    repo = tmp_path / "repo"
    package_triton(artifact, repo, None)
    for d in [repo, *[p for p in repo.rglob("*") if p.is_dir()]]:
        assert d.stat().st_mode & 0o755 == 0o755, f"{d} is mode {oct(d.stat().st_mode & 0o777)}: the server's user may not read it"
    ports = [str(free_port()) for _ in range(3)]
    p = subprocess.Popen([sys.executable, "-m", "vpexport.package.triton_server", str(repo), "--http-port", ports[0],
                          "--grpc-port", ports[1], "--metrics-port", ports[2]], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"tritonserver pid (\d+) ready .* \(log (\S+)\)", line)
        assert m, line + p.stderr.read()[-2000:] if p.poll() is not None else line
        server_pid, work = int(m.group(1)), Path(m.group(2)).parent
        assert work.is_dir()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, p.stderr.read()[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(server_pid, 9)
        raise AssertionError("tritonserver still runs after its launcher got SIGTERM")
    assert not work.exists(), f"the server's work dir {work} was left behind"
    assert "Traceback" not in p.stderr.read()


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory):
    """A tiny random Qwen2.5-VL folder (model, tokenizer, preprocessor_config.json) exported with a
    HiMAP schedule: M-RoPE positions and the fixed-grid resize run inside the python model."""
    from tests.artifact_helpers import QWEN_TEMPLATE, build_qwen_checkpoint
    from vpexport.export.onnx_export import export_artifacts
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe

    try:
        find_layout()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the nvidia-pytriton wheel has no usable tritonserver here: {e}")
    tmp = tmp_path_factory.mktemp("triton_qwen")
    ckpt = build_qwen_checkpoint(tmp / "ckpt", "qwen2.5-vl")
    recipe_path = tmp / "qwen.yaml"
    recipe_path.write_text(f"""name: qwen
model: {{path: {ckpt}, dtype: float32, image_size: [112, 140]}}
task: {{type: vqa, prompt: {json.dumps(QWEN_TEMPLATE)}, max_new_tokens: 5}}
pruning: {{method: himap, points: [{{layer: 2, keep: 12}}, {{layer: 5, keep: 4}}]}}
export: {{text_length: {{mode: padded, max: 16}}}}
""")
    recipe = load_recipe(recipe_path)
    art = tmp / "art"
    export_artifacts(recipe, art, resolve_schedule(recipe, recipe.resolve_arch(), art), log=lambda m: None)
    return art


def test_server_serves_a_qwen_artifact_as_vpexport_run_answers(qwen_artifact, samples, tmp_path):
    """The same repository layout and python model for another model family: answers equal `vpexport run`."""
    from click.testing import CliRunner

    from vpexport.cli import cli
    from vpexport.package.triton import check_repository, package_triton

    n = 8
    reference = []
    for img, q in samples[:n]:
        r = CliRunner().invoke(cli, ["run", str(qwen_artifact), "--image", str(img), "--prompt", q, "--json"])
        assert r.exit_code == 0, r.output
        reference.append(json.loads(r.output)["answers"][0]["text"])
    repo = tmp_path / "repo"
    package_triton(qwen_artifact, repo, None)
    assert check_repository(repo) == []
    h = start_server(repo, models=["vlm"], work_dir=tmp_path / "server")
    try:
        wait_ready(h, ["vlm"], timeout=180)
        answers, _ = _infer_all(h.http_url, samples[:n])
    finally:
        rc = stop(h)
    assert answers == reference
    assert rc == 0, h.log()[-2000:]

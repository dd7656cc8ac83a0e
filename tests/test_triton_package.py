"""`vpexport package --triton` and its offline checker, on a small synthetic artifact folder
(graphs with the exported I/O names built with onnx.helper: no torch, no export, no server).

The checker must catch, before any server sees them: a wrong platform, a dim that does not match
the graph, a missing model file (through the real CLI: non-zero exit, one clear line), plus a
BLS component that names no model and a leftover template marker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (Triton's config schema) is not installed")

from vpexport.manifest import update_manifest  # noqa: E402
from vpexport.package.triton import check_repository, package_triton  # noqa: E402

LAYERS = 2


def _graph(path: Path, inputs, outputs):
    """A valid ONNX graph with these (name, elem_type, dims) inputs/outputs (outputs = casts of input 0)."""
    import onnx
    from onnx import TensorProto, helper

    vi = lambda n, t, d: helper.make_tensor_value_info(n, t, d)  # noqa: E731
    nodes = [helper.make_node("Cast", [inputs[0][0]], [o[0]], to=o[1]) for o in outputs]
    g = helper.make_graph(nodes, path.stem, [vi(*i) for i in inputs], [vi(*o) for o in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    assert TensorProto.FLOAT == 1


def make_artifact(d: Path, deploy: dict | None = None) -> Path:
    from onnx import TensorProto as T

    F, I = T.FLOAT, T.INT64
    kv_in = [(f"past.{i}.{kv}", F, ["batch", 4, f"past_len.{i}", 32]) for i in range(LAYERS) for kv in ("key", "value")]
    kv_out = [(f"present.{i}.{kv}", F, ["batch", 4, 153, 32]) for i in range(LAYERS) for kv in ("key", "value")]
    _graph(d / "onnx/vision.onnx", [("pixel_values", F, ["batch", 3, 96, 96])], [("image_features", F, ["batch", 144, 128])])
    _graph(d / "onnx/prefill.onnx",
           [("input_ids", I, ["batch", 177]), ("attention_mask", I, ["batch", 177]), ("image_features", F, ["batch", 144, 128])],
           [("logits", F, ["batch", 51])] + kv_out)
    _graph(d / "onnx/decode.onnx",
           [("input_ids", I, ["batch", 1]), ("position_ids", I, ["batch", 1]), ("text_mask", I, ["batch", "text_total"])] + kv_in,
           [("logits", F, ["batch", 51])] + kv_out)
    rt = d / "runtime"
    rt.mkdir(parents=True, exist_ok=True)
    for n in ("tokenizer.json", "preprocess.json", "generation.json"):
        (rt / n).write_text(json.dumps({"batch_max": 8}))
    files = [f"onnx/{n}.onnx" for n in ("vision", "prefill", "decode")] + [f"runtime/{n}" for n in
                                                                          ("tokenizer.json", "preprocess.json", "generation.json")]
    # as `save_resolved` writes it: absolute paths of the machine that built the artifact
    (d / "recipe.resolved.yaml").write_text(f"name: fake\nmodel: {{path: {d.parent / 'ckpt'}, dtype: float32}}\n"
                                            f"task: {{type: vqa, data: {{eval: {d.parent / 'data' / 'eval.jsonl'}}}}}\n")
    files.append("recipe.resolved.yaml")
    update_manifest(d, "recipe", {"deploy": {"triton": deploy or {"enabled": True, "max_batch_size": 8, "mode": "inprocess"}}})
    sched = {"method": "fastv", "points": [{"layer": 1, "keep": 72, "rule": "last_token"}], "sink_layers": 0, "seed": 0}
    update_manifest(d, "schedule", sched)
    update_manifest(d, "export", {"batch": {"max": 8}, "schedule": sched}, files=files)
    return d


@pytest.fixture()
def repo(tmp_path):
    art = make_artifact(tmp_path / "art")
    package_triton(art, tmp_path / "repo", None)
    return tmp_path / "repo"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vpexport", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_generated_repository_is_sound(repo):
    assert check_repository(repo) == []
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["decode", "prefill", "vision", "vlm"]
    text = (repo / "vision" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 8" in text
    assert "dims: 3\n  dims: 96\n  dims: 96" in text  # batch dim dropped
    dec = (repo / "decode" / "config.pbtxt").read_text()
    assert re.search(r'name: "text_mask"\s+data_type: TYPE_INT64\s+dims: -1', dec)
    py = (repo / "vlm" / "config.pbtxt").read_text()
    assert 'backend: "python"' in py and "KIND_CPU" in py and 'string_value: "inprocess"' in py
    assert (repo / "vlm/1/model.py").is_file() and (repo / "vlm/1/vpexport/runtime/generate.py").is_file()
    assert (repo / "vlm/1/artifact/onnx/prefill.onnx").is_file()
    for f in repo.rglob("*"):  # the runtime copy is torch-free
        if f.suffix == ".py" and "vpexport" in f.parts:
            assert not re.search(r"^\s*(import|from)\s+(torch|transformers)\b", f.read_text(), re.M), f
    assert not list(repo.parent.glob(".repo.tmp-*"))  # temp folder renamed away
    # No path of the build machine in the packaged recipe (it is served elsewhere): names only.
    import yaml

    packaged = yaml.safe_load((repo / "vlm/1/artifact/recipe.resolved.yaml").read_text())
    assert not Path(packaged["model"]["path"]).is_absolute() and "/" not in packaged["model"]["path"]
    assert str(repo.parent) not in (repo / "vlm/1/artifact/recipe.resolved.yaml").read_text()
    r = cli("package", "--check", repo)
    assert r.returncode == 0 and "ok" in r.stdout


def test_deploy_settings_bls_gpu(tmp_path):
    art = make_artifact(tmp_path / "art")
    cfg = {"enabled": True, "max_batch_size": 4, "max_queue_delay_us": 500, "preferred_batch_sizes": [2, 4],
           "instances": 2, "device": "gpu", "mode": "bls"}
    s = package_triton(art, tmp_path / "repo", cfg)
    repo = tmp_path / "repo"
    assert check_repository(repo) == []
    v = (repo / "vision" / "config.pbtxt").read_text()
    assert "KIND_GPU" in v and "count: 2" in v and "preferred_batch_size: 2" in v and "max_queue_delay_microseconds: 500" in v
    assert 'string_value: "bls"' in (repo / "vlm" / "config.pbtxt").read_text()
    assert not (repo / "vlm/1/artifact/onnx").exists()  # bls: the graphs live in the component models only
    assert s["models"]["vlm"]["provider"] == "cuda"
    # `vpexport build` passes the recipe's whole deploy section; a repository written here is replaced
    from vpexport.recipe.schema import DeploySection

    s = package_triton(art, repo, DeploySection.model_validate({"triton": {**cfg, "mode": "inprocess"}}))
    assert s["deploy"]["mode"] == "inprocess" and check_repository(repo) == []
    assert (repo / "vlm/1/artifact/onnx/vision.onnx").is_file()


def test_check_catches_wrong_platform(repo):
    c = repo / "vision" / "config.pbtxt"
    c.write_text(c.read_text().replace('platform: "onnxruntime_onnx"', 'platform: "onnxruntime_onx"'))
    r = cli("package", "--check", repo)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip().splitlines()[0]
    assert "unknown platform 'onnxruntime_onx'" in line and "did you mean 'onnxruntime_onnx'" in line
    assert "Traceback" not in r.stderr


def test_check_catches_dim_mismatch(repo):
    c = repo / "vision" / "config.pbtxt"
    c.write_text(c.read_text().replace("dims: 96\n", "dims: 97\n", 1))
    r = cli("package", "--check", repo)
    assert r.returncode == 3
    line = r.stderr.strip().splitlines()[0]
    assert "input 'pixel_values' dims [3, 97, 96] do not match the graph's [3, 96, 96]" in line, line


def test_check_catches_missing_model_file(repo):
    (repo / "prefill" / "1" / "model.onnx").unlink()
    r = cli("package", "--check", repo)
    assert r.returncode == 3
    assert "prefill/1: model file model.onnx is missing" in r.stderr.strip().splitlines()[0]


def test_check_reads_the_artifact_copy_as_the_runtime_does(repo):
    """The python model loads vlm/1/artifact through its manifest at start; a copy whose manifest the
    runtime would refuse, or whose files differ from it, fails `package --check` instead of the server."""
    art = repo / "vlm/1/artifact"
    (art / "runtime/generation.json").write_text("{}")  # shorter than recorded
    r = cli("package", "--check", repo)
    assert r.returncode == 3, r.stderr
    assert "vlm/1: artifact/runtime/generation.json has 2 bytes, its manifest says" in r.stderr, r.stderr
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["recipe.resolved.yaml"] = "0" * 64  # a bare hash, not a {size, sha256} entry
    (art / "manifest.json").write_text(json.dumps(m))
    r = cli("package", "--check", repo)
    assert r.returncode == 3 and "recipe.resolved.yaml" in r.stderr.strip().splitlines()[0], r.stderr
    assert "Traceback" not in r.stderr


def test_server_error_line_passes_over_cuda_notices():
    """A CPU-only tritonserver logs a CUDA error at start and goes on; the error reported is the fatal one."""
    from vpexport.package.triton_server import _log_error

    log = ('I1204 11:24:16.3 4220 pinned_memory_manager.cc:277] "Pinned memory pool is not available"\n'
           'E1204 11:24:16.361261 4220 server.cc:241] "CudaDriverHelper has not been initialized."\n'
           "E1204 11:24:17.1 4220 model_lifecycle.cc:654] \"failed to load 'vlm' version 1: bad manifest\"\n"
           "I1204 11:24:17.2 4220 server.cc:305] Waiting for in-flight requests to complete.\n")
    assert "failed to load 'vlm'" in _log_error(log)
    assert "CudaDriverHelper" in _log_error(log.splitlines()[1])  # the only error line is still named
    assert _log_error("") == "(empty log)"


def test_check_catches_type_name_and_schema_errors(repo):
    c = repo / "decode" / "config.pbtxt"
    c.write_text(c.read_text().replace('name: "position_ids"\n  data_type: TYPE_INT64', 'name: "position_ids"\n  data_type: TYPE_INT32'))
    p = repo / "prefill" / "config.pbtxt"
    p.write_text(p.read_text().replace('name: "logits"', 'name: "logit"'))
    v = repo / "vision" / "config.pbtxt"
    v.write_text(v.read_text().replace("max_batch_size: 8", "max_batch_sise: 8"))
    problems = check_repository(repo)
    assert any("position_ids' data_type TYPE_INT32, the graph has TYPE_INT64" in p for p in problems), problems
    assert any("output 'logit' is not a graph output (did you mean 'logits'?)" in p for p in problems), problems
    assert any(p.startswith("vision/config.pbtxt: does not parse as a Triton ModelConfig") for p in problems), problems


def test_check_catches_bls_wiring_and_placeholders(tmp_path):
    art = make_artifact(tmp_path / "art")
    package_triton(art, tmp_path / "repo", {"mode": "bls"})
    repo = tmp_path / "repo"
    c = repo / "vlm" / "config.pbtxt"
    c.write_text(c.read_text().replace('"vision,prefill,decode"', '"vision,prefil,decode"'))
    m = repo / "vlm" / "1" / "model.py"
    m.write_text(m.read_text() + "\nMODE = '{{mode}}'\n")
    problems = check_repository(repo)
    assert any("BLS component 'prefil' is not a model in the repository (did you mean 'prefill'?)" in p for p in problems)
    assert any("template placeholder left" in p and "model.py" in p for p in problems), problems


def test_package_cli_errors_are_one_line(tmp_path):
    r = cli("package", tmp_path / "nope", "--triton", tmp_path / "repo")
    assert r.returncode == 3 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    art = make_artifact(tmp_path / "art")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "x").write_text("keep")
    r = cli("package", art, "--triton", tmp_path / "repo")
    assert r.returncode == 2 and "--force" in r.stderr
    r = cli("package", art, "--triton", tmp_path / "repo", "--force", "--mode", "bls", "--max-batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert "max_batch_size: 4" in (tmp_path / "repo" / "vision" / "config.pbtxt").read_text()
    # a corrupt artifact (manifest hash mismatch) is refused before anything is written
    (art / "onnx" / "vision.onnx").write_bytes(b"corrupt")
    r = cli("package", art, "--triton", tmp_path / "repo2")
    assert r.returncode == 3 and "vision.onnx" in r.stderr and not (tmp_path / "repo2").exists()


def test_engines_become_tensorrt_plan_models(tmp_path):
    """With `vpexport engine`'s plans in the artifact, the components are tensorrt_plan models whose
    dims are still checked against the graph the plan was built from (offline: the plan is not parsed)."""
    art = make_artifact(tmp_path / "art")
    (art / "engines").mkdir()
    for n in ("vision", "prefill", "decode"):
        (art / "engines" / f"{n}.plan").write_bytes(b"plan bytes")
    (art / "engines" / "engines.json").write_text("{}")
    update_manifest(art, "engine", {"plans": {n: f"engines/{n}.plan" for n in ("vision", "prefill", "decode")}},
                    files=[f"engines/{n}.plan" for n in ("vision", "prefill", "decode")] + ["engines/engines.json"])
    repo = tmp_path / "repo"
    s = package_triton(art, repo, {"device": "gpu", "mode": "bls"})
    assert {s["models"][n]["platform"] for n in ("vision", "prefill", "decode")} == {"tensorrt_plan"}
    assert (repo / "vision/1/model.plan").is_file() and not (repo / "vision/1/model.onnx").exists()
    assert check_repository(repo) == []
    c = repo / "decode" / "config.pbtxt"
    c.write_text(c.read_text().replace("dims: 153", "dims: 154", 1))
    assert any("decode/config.pbtxt: output 'present.0.key' dims [4, 154, 32]" in p for p in check_repository(repo))
    (repo / "vision/1/model.plan").unlink()
    assert "vision/1: model file model.plan is missing" in check_repository(repo)


def test_a_repository_is_refused_once_its_artifact_was_exported_again(tmp_path):
    """The marker records the artifact's digest; `package --check` compares it with the artifact now."""
    art = make_artifact(tmp_path / "art")
    repo = tmp_path / "repo"
    package_triton(art, repo, None)
    marker = json.loads((repo / ".vpexport-package.json").read_text())
    assert marker["artifact"] == str(art.resolve()) and len(marker["artifact_digest"]) == 64
    assert check_repository(repo) == []
    assert (repo.stat().st_mode & 0o777) == (0o777 & ~_umask())  # not mkdtemp's 0700
    # A re-export as `export` writes it: new files renamed into place, so the repository's hard-linked
    # copies keep the old content (an in-place edit would change them too; the check reports that apart).
    new = art / "runtime" / "preprocess.json.new"
    new.write_text(json.dumps({"batch_max": 8, "size": 1}))
    os.replace(new, art / "runtime" / "preprocess.json")
    update_manifest(art, None, None, files=["runtime/preprocess.json"])  # new hashes
    problems = check_repository(repo)
    assert len(problems) == 1 and "earlier export" in problems[0], problems
    r = cli("package", "--check", repo)
    assert r.returncode != 0 and "earlier export" in r.stderr + r.stdout and "Traceback" not in r.stderr


def _umask() -> int:
    import os

    u = os.umask(0)
    os.umask(u)
    return u

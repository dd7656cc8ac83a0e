"""TensorRT engines: `vpexport engine`, plan compatibility, profiles, engines.json, the TRT runner.

CPU tests (always run): the no-TensorRT exit (5, one line, nothing written) in a subprocess with
a `tensorrt` blocker module on PYTHONPATH (so it also holds on a GPU box), the compatibility
rules, optimization profiles from generation.json, engines.json formatting, and the control flow
of the builder and of the runner against a fake `tensorrt` / fake CUDA (API-shaped stand-ins:
they check our calls, not TensorRT itself).

GPU tests (`-m gpu`): build real plans for a tiny hand-made artifact folder and for
recipes/mini_vqa.yaml, and compare TensorRT with ONNX Runtime CPU. They skip with a reason when
`tensorrt` or a CUDA device is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from vpexport.engine.compat import check_plan_compatible, parse_version
from vpexport.engine.profiles import LengthSpec, check_within, compute_profile
from vpexport.engine.report import binding, format_engines
from vpexport.errors import ArtifactError, RuntimeUnavailable, UserInputError

ROOT = Path(__file__).resolve().parents[1]

# the tiny artifact folder's layout
PREFIX, VISUAL, T, D, V = 2, 4, 3, 6, 10
KV_STATIC = [PREFIX + 4, PREFIX + 2]  # layer 1 keeps 2 of the 4 visual tokens
GEN = {
    "prefix": PREFIX,
    "visual_tokens": VISUAL,
    "max_new_tokens": 3,
    "text_length": {"mode": "padded", "max": T},
    "batch_max": 4,
    "num_layers": 2,
    "kv_static_len": KV_STATIC,
    "visual_per_layer": [4, 2],
}


# --------------------------------------------------------------------------- a tiny artifact folder
def _tiny_graphs(out: Path) -> None:
    """vision / prefill / decode graphs with the exporter's I/O names and dynamic axis names."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w_vis = nh.from_array(rng.standard_normal((12, D)).astype(np.float32), "w_vis")
    emb = nh.from_array(rng.standard_normal((V, D)).astype(np.float32), "emb")
    w_out = nh.from_array(rng.standard_normal((D, V)).astype(np.float32), "w_out")
    const = lambda name, arr: nh.from_array(np.asarray(arr), name)  # noqa: E731

    def save(graph, name):
        m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="vpexport-test")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        onnx.save(m, str(out / f"{name}.onnx"))

    B = "batch"
    vision = h.make_graph(
        [h.make_node("Reshape", ["pixel_values", "shp"], ["flat"]), h.make_node("MatMul", ["flat", "w_vis"], ["image_features"])],
        "vision",
        [h.make_tensor_value_info("pixel_values", TP.FLOAT, [B, 3, 4, 4])],
        [h.make_tensor_value_info("image_features", TP.FLOAT, [B, VISUAL, D])],
        [w_vis, const("shp", np.array([0, VISUAL, 12], np.int64))],
    )
    save(vision, "vision")

    L = PREFIX + VISUAL + T
    prefill = h.make_graph(
        [
            h.make_node("Gather", ["emb", "input_ids"], ["e"]),
            h.make_node("Cast", ["attention_mask"], ["mf"], to=TP.FLOAT),
            h.make_node("Unsqueeze", ["mf", "ax2"], ["m3"]),
            h.make_node("Mul", ["e", "m3"], ["em"]),
            h.make_node("ReduceSum", ["em", "ax1"], ["s"], keepdims=0),
            h.make_node("ReduceSum", ["image_features", "ax1"], ["f"], keepdims=0),
            h.make_node("Add", ["s", "f"], ["sf"]),
            h.make_node("MatMul", ["sf", "w_out"], ["logits"]),
            h.make_node("Unsqueeze", ["em", "ax1"], ["present.0.key"]),
            h.make_node("Neg", ["present.0.key"], ["present.0.value"]),
            h.make_node("Slice", ["present.0.key", "s_start", "s_end", "ax2"], ["present.1.key"]),
            h.make_node("Slice", ["present.0.value", "s_start", "s_end", "ax2"], ["present.1.value"]),
            h.make_node("ReduceSum", ["image_features", "ax2"], ["score"], keepdims=0),
            h.make_node("TopK", ["score", "k2"], ["topv", "kept.0"], axis=1),
        ],
        "prefill",
        [
            h.make_tensor_value_info("input_ids", TP.INT64, [B, L]),
            h.make_tensor_value_info("attention_mask", TP.INT64, [B, L]),
            h.make_tensor_value_info("image_features", TP.FLOAT, [B, VISUAL, D]),
        ],
        [
            h.make_tensor_value_info("logits", TP.FLOAT, [B, V]),
            h.make_tensor_value_info("present.0.key", TP.FLOAT, [B, 1, KV_STATIC[0] + T, D]),
            h.make_tensor_value_info("present.0.value", TP.FLOAT, [B, 1, KV_STATIC[0] + T, D]),
            h.make_tensor_value_info("present.1.key", TP.FLOAT, [B, 1, KV_STATIC[1] + T, D]),
            h.make_tensor_value_info("present.1.value", TP.FLOAT, [B, 1, KV_STATIC[1] + T, D]),
            h.make_tensor_value_info("kept.0", TP.INT64, [B, 2]),
        ],
        [emb, w_out, const("ax1", np.array([1], np.int64)), const("ax2", np.array([2], np.int64)),
         const("s_start", np.array([2], np.int64)), const("s_end", np.array([L], np.int64)), const("k2", np.array([2], np.int64))],
    )
    save(prefill, "prefill")

    decode = h.make_graph(
        [
            h.make_node("Gather", ["emb", "input_ids"], ["e"]),  # (B,1,D)
            h.make_node("Cast", ["position_ids"], ["pf"], to=TP.FLOAT),
            h.make_node("Unsqueeze", ["pf", "ax2"], ["p3"]),
            h.make_node("Mul", ["p3", "c01"], ["p3s"]),
            h.make_node("Add", ["e", "p3s"], ["e2"]),
            h.make_node("Unsqueeze", ["e2", "ax1"], ["new.0.key"]),  # (B,1,1,D): the step's own slot
            h.make_node("Neg", ["new.0.key"], ["new.0.value"]),
            h.make_node("Identity", ["new.0.key"], ["new.1.key"]),
            h.make_node("Identity", ["new.0.value"], ["new.1.value"]),
            h.make_node("ReduceSum", ["past.1.key", "ax12"], ["rp"], keepdims=0),  # (B,D)
            h.make_node("ReduceSum", ["new.1.key", "ax12"], ["rn"], keepdims=0),
            h.make_node("Add", ["rp", "rn"], ["r"]),
            h.make_node("Cast", ["text_mask"], ["tf"], to=TP.FLOAT),
            h.make_node("ReduceSum", ["tf", "ax1"], ["tn"], keepdims=1),  # (B,1)
            h.make_node("Mul", ["r", "tn"], ["rt"]),
            h.make_node("MatMul", ["rt", "w_out"], ["logits"]),
        ],
        "decode",
        [
            h.make_tensor_value_info("input_ids", TP.INT64, [B, 1]),
            h.make_tensor_value_info("position_ids", TP.INT64, [B, 1]),
            h.make_tensor_value_info("text_mask", TP.INT64, [B, "text_total"]),
            h.make_tensor_value_info("past.0.key", TP.FLOAT, [B, 1, "past_len.0", D]),
            h.make_tensor_value_info("past.0.value", TP.FLOAT, [B, 1, "past_len.0", D]),
            h.make_tensor_value_info("past.1.key", TP.FLOAT, [B, 1, "past_len.1", D]),
            h.make_tensor_value_info("past.1.value", TP.FLOAT, [B, 1, "past_len.1", D]),
        ],
        [
            h.make_tensor_value_info("logits", TP.FLOAT, [B, V]),
            *[h.make_tensor_value_info(f"new.{i}.{w}", TP.FLOAT, [B, 1, 1, D]) for i in (0, 1) for w in ("key", "value")],
        ],
        [emb, w_out, const("ax1", np.array([1], np.int64)), const("ax2", np.array([2], np.int64)),
         const("ax12", np.array([1, 2], np.int64)), const("c01", np.array(0.01, np.float32))],
    )
    save(decode, "decode")


def _graph_inputs(path: Path) -> list[dict]:
    from vpexport.engine.build import _onnx_inputs

    return _onnx_inputs(path)


@pytest.fixture
def tiny_art(tmp_path) -> Path:
    """An artifact folder shaped like `vpexport export`'s, with tiny hand-made graphs."""
    from vpexport.manifest import update_manifest

    art = tmp_path / "art"
    (art / "onnx").mkdir(parents=True)
    (art / "runtime").mkdir()
    _tiny_graphs(art / "onnx")
    (art / "runtime" / "generation.json").write_text(json.dumps(GEN, indent=2))
    files = [f"onnx/{g}.onnx" for g in ("vision", "prefill", "decode")] + ["runtime/generation.json"]
    update_manifest(art, None, None, files=files)
    update_manifest(art, "recipe", {"name": "tiny", "engine": {"precision": "fp16", "workspace_gb": 1.0, "timing_cache": None, "version_compatible": False}})
    graphs = {g: {"inputs": _graph_inputs(art / "onnx" / f"{g}.onnx")} for g in ("vision", "prefill", "decode")}
    sched = {"method": "fastv", "points": [{"layer": 1, "keep": 8, "rule": "last_token"}], "sink_layers": 0, "seed": 0}
    update_manifest(art, "schedule", sched)
    update_manifest(art, "export", {"precision": "fp32", "graphs": graphs, "schedule": sched})
    return art


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()} | {
        "__dirs__": sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_dir())
    }


def _tiny_feeds(batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    L = PREFIX + VISUAL + T
    px = rng.standard_normal((batch, 3, 4, 4)).astype(np.float32)
    ids = rng.integers(0, V, (batch, L)).astype(np.int64)
    mask = np.ones((batch, L), np.int64)
    mask[-1, -1] = 0
    return px, ids, mask


def _run_tiny(graphs, batch=2, steps=2) -> dict:
    """vision -> prefill -> `steps` decode steps, fed the way ArtifactRuntime.generate feeds them."""
    px, ids, mask = _tiny_feeds(batch)
    out = {}
    feats = graphs.run("vision", {"pixel_values": px})["image_features"]
    pre = graphs.run("prefill", {"input_ids": ids, "attention_mask": mask, "image_features": feats})
    out["image_features"], out["prefill"] = feats, pre
    from vpexport.runtime.kv_cache import KVCache

    cache = KVCache([[pre[f"present.{i}.key"], pre[f"present.{i}.value"]] for i in (0, 1)], mask[:, PREFIX + VISUAL :], steps)
    pos = np.full((batch, 1), PREFIX + VISUAL + T, np.int64)
    nxt = pre["logits"].argmax(-1)[:, None].astype(np.int64)
    for s in range(steps):
        dec = graphs.run("decode", {"input_ids": nxt, "position_ids": pos + s, **cache.feeds()})
        out[f"decode.{s}"] = dec
        cache.append(dec)
        nxt = dec["logits"].argmax(-1)[:, None].astype(np.int64)
    return out


class _OrtGraphs:
    def __init__(self, art: Path):
        import onnxruntime as ort

        self.s = {g: ort.InferenceSession(str(art / "onnx" / f"{g}.onnx"), providers=["CPUExecutionProvider"]) for g in ("vision", "prefill", "decode")}

    def run(self, name, feeds):
        s = self.s[name]
        outs = s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
        return dict(zip([o.name for o in s.get_outputs()], outs))


def test_tiny_artifacts_run_in_onnxruntime(tiny_art):
    """The fixture's graphs are valid and their shapes follow the exporter's conventions."""
    out = _run_tiny(_OrtGraphs(tiny_art), batch=2, steps=2)
    assert out["prefill"]["present.1.key"].shape == (2, 1, KV_STATIC[1] + T, D)
    assert out["decode.1"]["new.0.key"].shape == (2, 1, 1, D)
    assert out["prefill"]["kept.0"].dtype == np.int64


# --------------------------------------------------------------------------- no TensorRT: exit 5, one line, nothing written
def _blocker(tmp_path: Path, body: str = "raise ImportError('tensorrt is blocked by the test (simulating a machine without it)')") -> Path:
    d = tmp_path / "blocker"
    d.mkdir(exist_ok=True)
    (d / "tensorrt.py").write_text(body + "\n")
    return d


def _cli(args, pythonpath: Path, cwd: Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "vpexport", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_engine_without_tensorrt_exits_5_one_line_nothing_written(tiny_art, tmp_path):
    before = _snapshot(tiny_art)
    cache = tmp_path / "cache" / "trt.cache"
    cache.parent.mkdir()
    r = _cli(["engine", str(tiny_art), "--precision", "fp16", "--timing-cache", str(cache)], _blocker(tmp_path), tmp_path)
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: ") and "NVIDIA GPU" in line and "TensorRT" in line
    assert "`tensorrt`" in line and "blocked by the test" in line  # says what was looked for and why it failed
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _snapshot(tiny_art) == before  # nothing written (no engines/, no temp folder, manifest untouched)
    assert not cache.exists()


def test_engine_with_old_tensorrt_exits_5(tiny_art, tmp_path):
    before = _snapshot(tiny_art)
    r = _cli(["engine", str(tiny_art)], _blocker(tmp_path, "__version__ = '8.6.1'"), tmp_path)
    assert r.returncode == 5 and len(r.stderr.strip().splitlines()) == 1
    assert "8.6.1" in r.stderr and "older than 10" in r.stderr
    assert _snapshot(tiny_art) == before


def test_engine_tensorrt_but_no_gpu_exits_5(tiny_art, monkeypatch, capsys):
    """tensorrt importable, no CUDA device: exit 5 naming what was looked for (in-process, probe faked)."""
    from vpexport.cli import main
    from vpexport.engine import cuda

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(cuda, "probe_gpu", lambda: cuda.GpuProbe(ok=False, looked_for=["cuda-python", "libcuda.so.1"], reason="no CUDA device is visible"))
    before = _snapshot(tiny_art)
    with pytest.raises(SystemExit) as e:
        main(["engine", str(tiny_art)])
    assert e.value.code == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable CUDA device" in err[0] and "libcuda.so.1" in err[0]
    assert _snapshot(tiny_art) == before


def test_engine_bad_folder_is_an_artifact_error(tmp_path, capsys):
    from vpexport.cli import main

    with pytest.raises(SystemExit) as e:
        main(["engine", str(tmp_path / "missing")])
    assert e.value.code == 3
    with pytest.raises(SystemExit) as e:
        main(["engine", str(tmp_path)])  # a folder without manifest.json
    assert e.value.code == 3
    assert "manifest.json" in capsys.readouterr().err


def test_engine_is_registered_and_has_help():
    from click.testing import CliRunner

    from vpexport.cli import COMMANDS, cli

    assert COMMANDS["engine"][:2] == ("vpexport.commands.engine", "engine")
    r = CliRunner().invoke(cli, ["engine", "--help"])
    assert r.exit_code == 0
    for opt in ("--precision", "--workspace", "--timing-cache", "--version-compatible"):
        assert opt in r.output


def test_engine_modules_import_no_torch_or_tensorrt():
    code = (
        "import sys; import vpexport.commands.engine, vpexport.engine.build, vpexport.runtime.trt_session; "
        "bad = [m for m in ('torch', 'tensorrt', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- plan compatibility
REC = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}, "version_compatible": False}


def _env(trt="10.3.0", cc="8.7", name="Orin"):
    return {"tensorrt": trt, "gpu": {"name": name, "compute_capability": cc}}


def test_plan_compatible_same_machine():
    assert check_plan_compatible(REC, _env()) == []
    assert check_plan_compatible(REC, _env(trt="10.3.0.26")) == []  # build number does not matter


def test_plan_refused_on_another_gpu_architecture():
    with pytest.raises(ArtifactError) as e:
        check_plan_compatible(REC, _env(cc="9.0", name="NVIDIA H100"))
    msg = e.value.one_line()
    assert "compute capability 8.7 (Orin)" in msg and "9.0 (NVIDIA H100)" in msg and "vpexport engine" in msg


@pytest.mark.parametrize("here", ["10.4.0", "10.2.1", "11.0.0"])
def test_plan_refused_on_another_tensorrt_version(here):
    with pytest.raises(ArtifactError) as e:
        check_plan_compatible(REC, _env(trt=here))
    assert "TensorRT 10.3.0" in str(e.value) and f"TensorRT {here}" in str(e.value) and "exact version" in str(e.value)


def test_version_compatible_plan_runs_on_later_tensorrt_only():
    rec = dict(REC, version_compatible=True)
    w = check_plan_compatible(rec, _env(trt="10.8.0"))
    assert len(w) == 1 and "10.8.0" in w[0]
    assert check_plan_compatible(rec, _env()) == []
    with pytest.raises(ArtifactError, match="older"):
        check_plan_compatible(rec, _env(trt="10.2.0"))
    with pytest.raises(ArtifactError, match="compute capability"):  # version compatibility is not hardware compatibility
        check_plan_compatible(rec, _env(trt="10.8.0", cc="8.6"))


def test_same_capability_other_board_warns():
    w = check_plan_compatible(REC, _env(name="Orin Nano"))
    assert len(w) == 1 and "Orin Nano" in w[0]


def test_plan_compat_needs_a_record():
    with pytest.raises(ArtifactError, match="no engine section"):
        check_plan_compatible({}, _env())
    with pytest.raises(ArtifactError, match="does not record"):
        check_plan_compatible({"tensorrt": "10.3.0"}, _env())


def test_parse_version():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("10.0.1.post12") == (10, 0, 1)
    assert parse_version("8.6") == (8, 6)
    with pytest.raises(ValueError):
        parse_version("abc")


# --------------------------------------------------------------------------- profiles
def test_length_spec_from_generation():
    s = LengthSpec.from_generation(GEN)
    assert s.batch() == (1, 2, 4)
    assert s.text() == (T, T, T)  # padded: static text
    assert s.sequence() == (PREFIX + VISUAL + T,) * 3
    assert s.text_total() == (T + 1, T + 1, T + 3)  # cache text slots C = T + steps; max_new_tokens 3 (+1 headroom)
    assert s.past_len(1) == (KV_STATIC[1] + T + 1, KV_STATIC[1] + T + 1, KV_STATIC[1] + T + 3)
    with pytest.raises(ArtifactError):
        s.past_len(2)
    with pytest.raises(ArtifactError, match="text_length is incomplete"):
        LengthSpec.from_generation({"prefix": 1})
    with pytest.raises(ArtifactError, match="lacks the shape information"):
        LengthSpec.from_generation({"prefix": 1, "text_length": {"mode": "padded", "max": 4}})
    with pytest.raises(ArtifactError, match="unknown text_length.mode 'ragged'"):
        LengthSpec.from_generation(dict(GEN, text_length={"mode": "ragged", "max": 4}))


def test_length_spec_with_text_buckets():
    s = LengthSpec.from_generation(dict(GEN, text_length={"mode": "dynamic", "max": 16, "buckets": [4, 8, 16]}))
    assert s.text() == (4, 4, 16)  # from the smallest bucket, tuned for it
    assert s.sequence() == (PREFIX + VISUAL + 4, PREFIX + VISUAL + 4, PREFIX + VISUAL + 16)
    with pytest.raises(ArtifactError, match="not an increasing list ending at max 16"):
        LengthSpec.from_generation(dict(GEN, text_length={"mode": "dynamic", "max": 16, "buckets": [8, 4]}))


@pytest.mark.parametrize("batch_max,opt", [(1, 1), (2, 1), (6, 3), (8, 4), (16, 8)])
def test_batch_opt_is_the_middle(batch_max, opt):
    assert LengthSpec.from_generation(dict(GEN, batch_max=batch_max)).batch() == (1, opt, batch_max)


def test_profiles_of_the_tiny_artifacts(tiny_art):
    s = LengthSpec.from_generation(GEN)
    vis = compute_profile("vision", _graph_inputs(tiny_art / "onnx" / "vision.onnx"), s)
    assert vis == {"pixel_values": {"min": [1, 3, 4, 4], "opt": [2, 3, 4, 4], "max": [4, 3, 4, 4]}}
    pre = compute_profile("prefill", _graph_inputs(tiny_art / "onnx" / "prefill.onnx"), s)
    L = PREFIX + VISUAL + T
    assert pre["input_ids"] == {"min": [1, L], "opt": [2, L], "max": [4, L]}
    assert set(pre) == {"input_ids", "attention_mask", "image_features"}
    dec = compute_profile("decode", _graph_inputs(tiny_art / "onnx" / "decode.onnx"), s)
    assert dec["text_mask"] == {"min": [1, T + 1], "opt": [2, T + 1], "max": [4, T + 3]}
    assert dec["past.0.key"]["min"] == [1, 1, KV_STATIC[0] + T + 1, D]
    assert dec["past.1.value"]["max"] == [4, 1, KV_STATIC[1] + T + 3, D]
    assert dec["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}


@pytest.mark.parametrize("mode", ["padded", "dynamic"])
def test_profiles_cover_every_shape_generation_feeds(mode):
    """Every (batch, text length, max_new_tokens) ArtifactRuntime.generate can feed is inside the profiles."""
    gen = dict(GEN, text_length={"mode": mode, "max": 5}, max_new_tokens=4, batch_max=3)
    s = LengthSpec.from_generation(gen)
    head = PREFIX + VISUAL
    pre = compute_profile("prefill", {"input_ids": ["batch", "sequence" if mode == "dynamic" else head + 5]}, s)
    dec = compute_profile(
        "decode",
        {"text_mask": ["batch", "text_total"], **{f"past.{i}.key": ["batch", 1, f"past_len.{i}", D] for i in (0, 1)}},
        s,
    )
    texts = range(1, 6) if mode == "dynamic" else [5]
    for b in range(1, 4):
        for t in texts:
            assert check_within(pre, {"input_ids": (b, head + t)}) is None
            for m in range(2, gen["max_new_tokens"] + 1):  # m new tokens: C = t + m - 1 slots, past = kv_static + C
                c = t + m - 1
                shapes = {"text_mask": (b, c), **{f"past.{i}.key": (b, 1, KV_STATIC[i] + c, D) for i in (0, 1)}}
                assert check_within(dec, shapes) is None, (b, t, m)
    if mode == "dynamic":
        assert pre["input_ids"]["min"] == [1, head + 1] and pre["input_ids"]["max"] == [3, head + 5]
    why = check_within(dec, {"text_mask": (4, 6)}, where="decode.plan")
    assert why and "decode.plan" in why and "text_mask axis 0 is 4" in why and "1..3" in why


def test_profile_axis_without_symbol_uses_its_role_and_unknown_is_refused():
    s = LengthSpec.from_generation(GEN)
    # -1 / None dims (as TensorRT's network reports them) get their role from the name and axis
    p = compute_profile("decode", {"past.1.key": [-1, 1, -1, D], "text_mask": [None, None]}, s)
    assert p["past.1.key"]["max"] == [4, 1, KV_STATIC[1] + T + 3, D]
    assert p["text_mask"]["min"] == [1, T + 1]
    with pytest.raises(ArtifactError, match="no known range"):
        compute_profile("vision", {"pixel_values": ["batch", 3, "height", 4]}, s)
    assert compute_profile("vision", {"pixel_values": [2, 3, 4, 4]}, s) == {}  # static inputs need no profile


@pytest.mark.parametrize("mode", ["padded", "dynamic"])
def test_profiles_of_a_real_export_cover_what_the_runtime_feeds(tmp_path, mode, monkeypatch):
    """A real (tiny) `vpexport export`, then the ONNX Runtime generation loop: every shape it feeds
    each graph is inside the profile computed for that graph (guards the exporter's axis names)."""
    from tests.artifact_helpers import build_checkpoint, export_py, make_eval, write_recipe
    from vpexport.data import load_samples
    from vpexport.engine.build import prepare
    from vpexport.runtime import ArtifactRuntime
    from vpexport.runtime.session import Graphs

    ckpt, ev = build_checkpoint(tmp_path / "ckpt"), make_eval(tmp_path / "eval")
    art = tmp_path / "art"
    export_py(write_recipe(tmp_path / "r.yaml", ckpt, "himap", ev, mode=mode, text_max=16), art)
    plan = prepare(art)
    seen = []
    orig = Graphs.run

    def spy(self, name, feeds):
        seen.append((name, {k: v.shape for k, v in feeds.items()}))
        return orig(self, name, feeds)

    monkeypatch.setattr(Graphs, "run", spy)
    rt = ArtifactRuntime.open(art, provider="cpu")
    samples = load_samples(ev)
    for b in (1, 3):
        rt.answer([x.image for x in samples[:b]], [x.question for x in samples[:b]], max_new_tokens=rt.max_new_tokens)
    assert {n for n, _ in seen} == {"vision", "prefill", "decode"}
    for name, shapes in seen:
        assert check_within(plan.profiles[name], shapes, name) is None
    assert set(plan.profiles["decode"]) >= {"text_mask", "past.0.key", "input_ids"}
    assert ("input_ids" in plan.profiles["prefill"]) and (plan.profiles["prefill"]["input_ids"]["min"][1] < plan.profiles["prefill"]["input_ids"]["max"][1]) == (mode == "dynamic")


# --------------------------------------------------------------------------- engines.json
DOC = {
    "format": 1,
    "tensorrt": "10.3.0",
    "gpu": {"name": "Orin", "compute_capability": "8.7"},
    "precision": "fp16",
    "workspace_gb": 1.0,
    "version_compatible": True,
    "engines": [
        {
            "segment": "vision",
            "plan": "engines/vision.plan",
            "bytes": 3 * 2**20,
            "build_seconds": 12.34,
            "device_memory": 2048,
            "bindings": [
                binding("pixel_values", "input", "float32", [-1, 3, 336, 336],
                        {"min": [1, 3, 336, 336], "opt": [4, 3, 336, 336], "max": [8, 3, 336, 336]}),
                binding("image_features", "output", "float16", [-1, 576, 4096]),
            ],
        },
        {
            "segment": "decode",
            "plan": "engines/decode.plan",
            "bytes": 100,
            "build_seconds": 1,
            "bindings": [binding(f"past.{i}.key", "input", "float16", [-1, 32, -1, 128]) for i in range(20)],
        },
    ],
}


def test_format_engines():
    text = format_engines(DOC, max_bindings=12)
    lines = text.splitlines()
    assert lines[0] == "TensorRT 10.3.0 on Orin (compute capability 8.7), fp16, version-compatible, workspace 1.0 GB"
    assert lines[1] == "vision: engines/vision.plan (3.0 MiB, built in 12.3 s, device memory 2.0 KiB)"
    assert lines[2] == "  in  pixel_values             float32  (?, 3, 336, 336)  min (1, 3, 336, 336) opt (4, 3, 336, 336) max (8, 3, 336, 336)"
    assert lines[3] == "  out image_features           float16  (?, 576, 4096)"
    assert "decode: engines/decode.plan (100 B, built in 1.0 s)" in lines
    assert lines[-1] == "  ... 8 more bindings (see engines/engines.json)"
    assert json.loads(json.dumps(DOC)) == DOC  # plain JSON


def test_binding_normalises_types():
    b = binding("x", "input", "int64", (np.int64(-1), 5), {"min": (1, 5), "opt": [2, 5], "max": [np.int32(3), 5]})
    assert b == {"name": "x", "mode": "input", "dtype": "int64", "shape": [-1, 5], "profile": {"min": [1, 5], "opt": [2, 5], "max": [3, 5]}}
    assert all(type(v) is int for v in b["shape"] + b["profile"]["max"])


# --------------------------------------------------------------------------- settings and preparation
def test_resolve_settings_cli_over_recipe_over_default(tmp_path):
    from vpexport.engine.build import resolve_settings

    m = {"recipe": {"engine": {"precision": "bf16", "workspace_gb": 2, "timing_cache": None, "version_compatible": True}}}
    s = resolve_settings(m)
    assert (s.precision, s.workspace_gb, s.version_compatible) == ("bf16", 2.0, True)
    assert s.source == {"precision": "recipe", "workspace_gb": "recipe", "timing_cache": "default", "version_compatible": "recipe"}
    s = resolve_settings(m, precision="fp32", workspace_gb=0.5, timing_cache=str(tmp_path / "c"))
    assert (s.precision, s.workspace_gb, s.timing_cache) == ("fp32", 0.5, str(tmp_path / "c"))
    assert resolve_settings({}).precision == "fp16"  # the schema's default
    # a server path recorded in the recipe that does not exist here (e.g. on a Jetson): in-memory cache
    s = resolve_settings({"recipe": {"engine": {"timing_cache": "/nonexistent/dir/trt.cache"}}})
    assert s.timing_cache is None and "not on this machine" in s.source["timing_cache"]
    with pytest.raises(UserInputError):
        resolve_settings({}, precision="int8")
    with pytest.raises(UserInputError):
        resolve_settings({}, workspace_gb=0)


def test_prepare_reads_profiles_and_checks_hashes(tiny_art):
    from vpexport.engine.build import prepare

    plan = prepare(tiny_art)
    assert set(plan.onnx) == {"vision", "prefill", "decode"}
    assert plan.profiles["decode"]["past.1.key"]["max"] == [4, 1, KV_STATIC[1] + T + 3, D]
    with open(tiny_art / "onnx" / "vision.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        prepare(tiny_art)


def test_prepare_needs_generation_json(tiny_art):
    from vpexport.engine.build import prepare

    (tiny_art / "runtime" / "generation.json").unlink()
    with pytest.raises(ArtifactError, match="generation.json"):
        prepare(tiny_art)


def test_prepare_ignores_stale_engine_entries(tiny_art):
    """A folder copied to a Jetson without engines/ still lists the server's plans: not an error."""
    from vpexport.engine.build import prepare
    from vpexport.manifest import _load_raw, _write_json_atomic

    m = _load_raw(tiny_art)
    m["files"]["engines/vision.plan"] = {"sha256": "0" * 64, "size": 1}
    _write_json_atomic(tiny_art / "manifest.json", m)
    assert prepare(tiny_art).profiles["vision"]


# --------------------------------------------------------------------------- fake TensorRT / CUDA: our control flow
class FakeCuda:
    """Host memory posing as device memory: pointers are keys into a dict of ctypes buffers."""

    name = "fake"

    def __init__(self):
        self.mem, self.next, self.freed = {}, 1, []

    def set_device(self, dev=0):
        pass

    def malloc(self, n):
        p = self.next * 4096
        self.next += 1
        self.mem[p] = ctypes.create_string_buffer(max(int(n), 1))
        return p

    def free(self, p):
        self.freed.append(p)
        self.mem.pop(p)

    def stream_create(self):
        return "stream"

    def stream_handle(self, s):
        return 7

    def stream_sync(self, s):
        pass

    def stream_destroy(self, s):
        pass

    def htod_async(self, dst, host, n, s):
        ctypes.memmove(self.mem[dst], host, n)

    def dtoh_async(self, host, src, n, s):
        ctypes.memmove(host, self.mem[src], n)

    def array(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.mem[ptr].raw[:n], dtype=dtype).reshape(shape).copy()

    def write(self, ptr, a):
        ctypes.memmove(self.mem[ptr], a.ctypes.data, a.nbytes)


def _fake_trt(cuda: FakeCuda, calls: list, version="10.3.0"):
    """The slice of the tensorrt module vpexport uses, recording the calls that matter. Shaped as
    TensorRT 10 (weakly typed FP16 / BF16 builder flags and strongly typed networks) or, for a
    version 11.x, TensorRT 11 (strongly typed networks only: no FP16 / BF16 flags)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])

    class Sev:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        Severity = Sev
        WARNING = Sev.WARNING

        def __init__(self, *a):
            pass

    trt.ILogger = ILogger
    trt.Logger = ILogger
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    flags = dict(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    if major < 11:
        flags.update(FP16="FP16", BF16="BF16")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # its value in 10.13 and 11
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dt: {"FLOAT": np.float32, "INT64": np.int64}[dt]

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            import onnx

            m = onnx.load(path, load_external_data=False)
            self.network.onnx = path
            for vi in m.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(vi.name, dims))
            return True

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (list(lo), list(mid), list(hi))

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, n):
            calls.append(("workspace", pool, n))

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            calls.append(("clear", f))

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, data):
            calls.append(("cache_in", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, c, ignore):
            self.cache = c

        def get_timing_cache(self):
            return self.cache

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network", "strong" if flags == 1 << 1 else "weak" if flags == 0 else flags))
            net = Network()
            net.flags = flags
            return net

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", Path(network.onnx).stem, sorted(config.flags), {k: v for p in config.profiles for k, v in p.shapes.items()}))
            doc = {"inputs": [(t.name, t.shape) for t in network.inputs], "profile": {k: v for p in config.profiles for k, v in p.shapes.items()}}
            return json.dumps(doc).encode()

    trt.Builder = Builder
    trt.OnnxParser = Parser

    class Engine:
        """Plays an engine whose outputs are every float input * 2 + 1 (same shapes)."""

        def __init__(self, doc):
            self.ins = [(n, s) for n, s in doc["inputs"]]
            self.prof = doc["profile"]
            self.names = [n for n, _ in self.ins] + [f"{n}.out" for n, _ in self.ins]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "OUTPUT" if name.endswith(".out") else "INPUT"

        def get_tensor_dtype(self, name):
            base = name.removesuffix(".out")
            return "INT64" if base in ("input_ids", "attention_mask", "position_ids", "text_mask") else "FLOAT"

        def get_tensor_shape(self, name):
            return dict(self.ins)[name.removesuffix(".out")]

        def get_tensor_profile_shape(self, name, i):
            return self.prof[name]

        def create_execution_context(self):
            return Context(self)

        device_memory_size_v2 = 1024

    class Context:
        def __init__(self, engine):
            self.e, self.shapes, self.addr = engine, {}, {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes[name.removesuffix(".out")]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, handle):
            calls.append(("execute", handle))
            for n, _ in self.e.ins:
                dt = trt.nptype(self.e.get_tensor_dtype(n))
                x = cuda.array(self.addr[n], self.shapes[n], dt)
                cuda.write(self.addr[n + ".out"], (x * 2 + 1).astype(dt))
            return True

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize", self.engine_host_code_allowed))
            return Engine(json.loads(bytes(data)))

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    from vpexport.engine import cuda as cuda_mod

    calls: list = []
    cuda = FakeCuda()
    trt = _fake_trt(cuda, calls)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda_mod, "probe_gpu", lambda: cuda_mod.GpuProbe(ok=True, name="Fake Orin", compute_capability="8.7", total_memory=8 << 30, count=1, backend="fake"))
    monkeypatch.setattr(cuda_mod, "cuda_backend", lambda prefer=None: cuda)
    return types.SimpleNamespace(trt=trt, cuda=cuda, calls=calls)


def test_build_engines_control_flow_with_fake_tensorrt(tiny_art, tmp_path, fake_gpu):
    """The GPU half of build_engines against an API-shaped fake: files, manifest, flags, profiles, cache."""
    from vpexport.engine.build import build_engines
    from vpexport.manifest import read_manifest

    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"C")
    log = []
    doc = build_engines(tiny_art, precision="fp16", workspace_gb=0.5, timing_cache=str(cache), version_compatible=True, echo=log.append)
    calls = fake_gpu.calls
    builds = [c for c in calls if c[0] == "build"]
    assert [b[1] for b in builds] == ["vision", "prefill", "decode"]
    assert all(b[2] == ["FP16", "VERSION_COMPATIBLE"] for b in builds)
    assert ("workspace", "WORKSPACE", 2**29) in calls
    dec_prof = builds[2][3]
    assert dec_prof["past.1.key"] == ([1, 1, KV_STATIC[1] + T + 1, D], [2, 1, KV_STATIC[1] + T + 1, D], [4, 1, KV_STATIC[1] + T + 3, D])
    # the timing cache is threaded through the builds and saved once
    assert [c[1] for c in calls if c[0] == "cache_in"] == [b"C", b"C+", b"C++"]
    assert cache.read_bytes() == b"C+++"
    # version-compatible plans are deserialized with host code allowed
    assert all(c[1] is True for c in calls if c[0] == "deserialize")
    assert sorted(p.name for p in (tiny_art / "engines").iterdir()) == ["decode.plan", "engines.json", "prefill.plan", "vision.plan"]
    assert not [p for p in tiny_art.iterdir() if p.name.startswith(".engines")]
    m = read_manifest(tiny_art)  # hashes of the plans recorded and valid
    e = m["engine"]
    assert e["tensorrt"] == "10.3.0" and e["gpu"]["compute_capability"] == "8.7" and e["gpu"]["name"] == "Fake Orin"
    assert e["precision"] == "fp16" and e["version_compatible"] is True and e["plans"]["decode"] == "engines/decode.plan"
    assert "engines/decode.plan" in m["files"]
    on_disk = json.loads((tiny_art / "engines" / "engines.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    vis = on_disk["engines"][0]["bindings"]
    assert vis[0] == {"name": "pixel_values", "mode": "input", "dtype": "float32", "shape": [-1, 3, 4, 4],
                      "profile": {"min": [1, 3, 4, 4], "opt": [2, 3, 4, 4], "max": [4, 3, 4, 4]}}
    assert "vision:" in format_engines(on_disk)
    # a rebuild replaces engines/ (fp32 clears TF32, no fp16 flag)
    fake_gpu.calls.clear()
    build_engines(tiny_art, precision="fp32", echo=log.append)
    assert ("clear", "TF32") in fake_gpu.calls
    assert all(c[2] == [] for c in fake_gpu.calls if c[0] == "build")
    assert read_manifest(tiny_art)["engine"]["precision"] == "fp32"


def test_build_failure_leaves_no_trace(tiny_art, fake_gpu):
    from vpexport.engine.build import build_engines

    before = _snapshot(tiny_art)
    fake_gpu.trt.Builder.build_serialized_network = lambda self, n, c: None
    with pytest.raises(ArtifactError, match="failed to build vision"):
        build_engines(tiny_art, echo=lambda m: None)
    assert _snapshot(tiny_art) == before


def test_bf16_needs_ampere(tiny_art, fake_gpu, monkeypatch):
    from vpexport.engine import cuda as cuda_mod
    from vpexport.engine.build import build_engines

    monkeypatch.setattr(cuda_mod, "probe_gpu", lambda: cuda_mod.GpuProbe(ok=True, name="T4", compute_capability="7.5", count=1))
    with pytest.raises(UserInputError, match="bf16 needs compute capability"):
        build_engines(tiny_art, precision="bf16", echo=lambda m: None)
    assert not (tiny_art / "engines").exists()


# --------------------------------------------------------------------------- network typing (TensorRT 10 and 11)
@pytest.mark.parametrize("export,precision,strong,weak,want", [
    ("fp16", "fp16", True, True, (True, ())),        # TensorRT 10: the ONNX's types
    ("fp16", "fp16", True, False, (True, ())),       # TensorRT 11: the same
    ("fp32", "fp32", True, False, (True, ())),
    ("fp32", "fp16", True, True, (False, ("FP16",))),  # TensorRT 10 only: the weakly typed flag
    ("fp32", "bf16", True, True, (False, ("BF16",))),
])
def test_network_typing_table(export, precision, strong, weak, want):
    from vpexport.engine.build import network_typing

    t = network_typing(export, precision, has_strong=strong, has_weak_flags=weak)
    assert (t.strong, t.flags) == want


@pytest.mark.parametrize("export,precision,weak,needle", [
    ("fp32", "fp16", False, "export.precision: fp16"),   # TensorRT 11 has no FP16 flag
    ("fp32", "bf16", False, "--precision fp32"),
    ("fp16", "fp32", True, "export.precision: fp32"),   # never: fp16 tensors in an fp32 plan
    ("fp16", "bf16", True, "--precision fp16"),
])
def test_network_typing_refusals_are_one_line(export, precision, weak, needle):
    from vpexport.engine.build import network_typing

    with pytest.raises(UserInputError) as e:
        network_typing(export, precision, has_strong=True, has_weak_flags=weak, version="11.0.0")
    line = e.value.one_line()
    assert e.value.exit_code == 2 and "\n" not in line and line.startswith("--precision: ") and needle in line


def _fake_version(fake_gpu, monkeypatch, version):
    trt = _fake_trt(fake_gpu.cuda, fake_gpu.calls, version=version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def _set_export_precision(art, precision):
    from vpexport.manifest import read_manifest, update_manifest

    update_manifest(art, "export", {**read_manifest(art)["export"], "precision": precision})


def test_tensorrt_11_builds_the_fp16_export_strongly_typed(tiny_art, fake_gpu, monkeypatch):
    """The default recipe (fp16 export, engine.precision fp16) on TensorRT 11: a strongly typed
    network, no precision flag, recorded as such."""
    from vpexport.engine.build import build_engines
    from vpexport.manifest import read_manifest

    _fake_version(fake_gpu, monkeypatch, "11.0.0")
    _set_export_precision(tiny_art, "fp16")
    log: list = []
    doc = build_engines(tiny_art, echo=log.append)  # precision from the recipe: fp16
    nets = [c[1] for c in fake_gpu.calls if c[0] == "network"]
    assert nets == ["strong"] * 3
    assert all(c[2] == [] for c in fake_gpu.calls if c[0] == "build")
    assert doc["network"] == "strongly typed" and doc["export_precision"] == "fp16" and doc["tensorrt"] == "11.0.0"
    assert read_manifest(tiny_art)["engine"]["network"] == "strongly typed"
    assert "fp16 from the fp16 export, strongly typed" in log[0]


def test_tensorrt_11_refuses_fp16_plans_of_an_fp32_export(tiny_art, fake_gpu, monkeypatch):
    from vpexport.engine.build import build_engines

    _fake_version(fake_gpu, monkeypatch, "11.0.0")
    before = _snapshot(tiny_art)
    with pytest.raises(UserInputError, match="strongly typed networks only") as e:
        build_engines(tiny_art, precision="fp16", echo=lambda m: None)
    assert "export.precision: fp16" in e.value.one_line()
    assert _snapshot(tiny_art) == before  # nothing written
    build_engines(tiny_art, precision="fp32", echo=lambda m: None)  # fp32 plans of the fp32 export build
    assert [c[1] for c in fake_gpu.calls if c[0] == "network"] == ["strong"] * 3
    assert ("clear", "TF32") in fake_gpu.calls


def test_tensorrt_10_keeps_weak_flags_below_the_export_precision(tiny_art, fake_gpu):
    from vpexport.engine.build import build_engines

    doc = build_engines(tiny_art, precision="fp16", echo=lambda m: None)  # fp32 export
    assert [c[1] for c in fake_gpu.calls if c[0] == "network"] == ["weak"] * 3
    assert doc["network"] == "weakly typed (FP16)"
    fake_gpu.calls.clear()
    build_engines(tiny_art, precision="fp32", echo=lambda m: None)
    assert [c[1] for c in fake_gpu.calls if c[0] == "network"] == ["strong"] * 3


def test_trt_graphs_run_and_refuse_foreign_plans(tiny_art, fake_gpu):
    """TrtGraphs: same interface as runtime.session.Graphs; profile checks; compatibility refusal."""
    from vpexport.engine.build import build_engines
    from vpexport.manifest import _load_raw, _write_json_atomic
    from vpexport.runtime.trt_session import TrtGraphs, has_engines

    assert not has_engines(tiny_art)
    build_engines(tiny_art, precision="fp32", echo=lambda m: None)
    assert has_engines(tiny_art)
    g = TrtGraphs(tiny_art)
    assert g.inputs["decode"][:3] == ["input_ids", "position_ids", "text_mask"]
    px, ids, mask = _tiny_feeds(2)
    out = g.run("prefill", {"input_ids": ids.astype(np.int32), "attention_mask": mask, "image_features": np.ones((2, VISUAL, D), np.float32)})
    np.testing.assert_array_equal(out["input_ids.out"], ids * 2 + 1)  # cast back to the engine's int64
    assert out["input_ids.out"].dtype == np.int64
    np.testing.assert_array_equal(out["image_features.out"], np.full((2, VISUAL, D), 3, np.float32))
    s = g.sessions["vision"]
    assert [i.name for i in s.get_inputs()] == ["pixel_values"] and s.get_inputs()[0].shape == [None, 3, 4, 4]
    assert s.get_inputs()[0].type == "tensor(float)"
    (res,) = s.run(["pixel_values.out"], {"pixel_values": px})
    np.testing.assert_allclose(res, px * 2 + 1)
    with pytest.raises(UserInputError, match="outside the engine's profile range 1..4"):
        s.run(None, {"pixel_values": np.zeros((5, 3, 4, 4), np.float32)})
    g.close()
    # plans recorded for another GPU are refused before deserializing
    m = _load_raw(tiny_art)
    m["engine"]["gpu"]["compute_capability"] = "9.0"
    _write_json_atomic(tiny_art / "manifest.json", m)
    with pytest.raises(ArtifactError, match="compute capability 9.0"):
        TrtGraphs(tiny_art)


def test_trt_session_without_tensorrt(tiny_art, tmp_path, monkeypatch):
    from vpexport.runtime.trt_session import TrtGraphs, TrtSession

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"x")
    with pytest.raises(RuntimeUnavailable) as e:
        TrtSession(plan)
    assert "NVIDIA GPU with TensorRT" in str(e.value) and "`tensorrt`" in str(e.value) and e.value.exit_code == 5
    from vpexport.manifest import update_manifest

    update_manifest(tiny_art, "engine", {"tensorrt": "10.3.0", "gpu": {"compute_capability": "8.7"}})
    with pytest.raises(RuntimeUnavailable):
        TrtGraphs(tiny_art)


def test_cuda_python_backend_checks_errors():
    from vpexport.engine.cuda import CudaPythonBackend

    class Err(int):
        pass

    props = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00\x00", major=9, minor=0, totalGlobalMem=80 << 30)
    rt = types.SimpleNamespace(
        cudaGetDeviceCount=lambda: (Err(0), 1),
        cudaGetDeviceProperties=lambda d: (Err(0), props),
        cudaMalloc=lambda n: (Err(2), None),
        cudaGetErrorString=lambda e: (Err(0), b"out of memory"),
    )
    be = CudaPythonBackend(rt)
    assert be.device_count() == 1
    assert be.device_info(0) == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory": 80 << 30}
    with pytest.raises(RuntimeUnavailable, match="out of memory"):
        be.malloc(10)


def test_probe_gpu_reports_what_it_looked_for(monkeypatch):
    from vpexport.engine import cuda

    def nope(prefer=None):
        raise RuntimeUnavailable("no CUDA access: cuda-python is not installed; libcuda.so.1 was not found")

    monkeypatch.setattr(cuda, "cuda_backend", nope)
    p = cuda.probe_gpu()
    assert not p.ok and "libcuda.so.1" in " ".join(p.looked_for) and "not installed" in p.reason


# --------------------------------------------------------------------------- GPU: real TensorRT
def _real_gpu_or_skip():
    from vpexport.engine.build import import_tensorrt

    try:
        import_tensorrt()  # also refuses tensorrt-stubs' empty namespace package
    except RuntimeUnavailable as e:
        pytest.skip(f"no TensorRT library here: {e}")
    from vpexport.engine.cuda import probe_gpu

    p = probe_gpu()
    if not p.ok:
        pytest.skip(f"no CUDA device: {p.reason}")
    return p


# precision-aware tolerances (atol, rtol) against ONNX Runtime CPU fp32
TOL = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 2e-2), "bf16": (2e-1, 5e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_tiny_engines_match_onnxruntime(tiny_art, tmp_path, precision):
    _real_gpu_or_skip()
    from vpexport.engine.build import build_engines, current_environment
    from vpexport.manifest import read_manifest
    from vpexport.runtime.trt_session import TrtGraphs

    cache = tmp_path / "trt.cache"
    build_engines(tiny_art, precision=precision, timing_cache=str(cache), echo=print)
    assert cache.stat().st_size > 0
    m = read_manifest(tiny_art)
    assert check_plan_compatible(m["engine"], current_environment()) == []
    trt_out = _run_tiny(TrtGraphs(tiny_art, m), batch=3, steps=2)
    ref = _run_tiny(_OrtGraphs(tiny_art), batch=3, steps=2)
    atol, rtol = TOL[precision]
    np.testing.assert_array_equal(trt_out["prefill"]["kept.0"], ref["prefill"]["kept.0"])  # TopK indices exactly
    for key in ("image_features",):
        np.testing.assert_allclose(trt_out[key], ref[key], atol=atol, rtol=rtol)
    for seg in ("prefill", "decode.0", "decode.1"):
        for name, v in ref[seg].items():
            if name.startswith("kept."):
                continue
            np.testing.assert_allclose(trt_out[seg][name], v, atol=atol * max(1.0, float(np.abs(v).max())), rtol=rtol, err_msg=f"{seg}/{name}")
    # a second build reuses the timing cache
    n = cache.stat().st_size
    build_engines(tiny_art, precision=precision, timing_cache=str(cache), echo=print)
    assert cache.stat().st_size >= n


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_mini_recipe_engines(tmp_path, precision):
    """recipes/mini_vqa.yaml: export, build engines, compare with ONNX Runtime CPU; fp32 generation matches."""
    _real_gpu_or_skip()
    from vpexport.recipe import load_recipe

    try:
        recipe = load_recipe(ROOT / "recipes" / "mini_vqa.yaml")
        ckpt = recipe.model_dir
    except Exception as e:  # noqa: BLE001 - e.g. the recipe's data or checkpoint does not exist yet
        pytest.skip(f"recipes/mini_vqa.yaml is not usable here: {e}")
    if ckpt is None or not (Path(ckpt) / "config.json").is_file():
        pytest.skip(f"mini checkpoint {ckpt} is missing (train it with the testbed first)")
    pytest.importorskip("torch", reason="export needs torch")
    from vpexport.engine.build import build_engines
    from vpexport.export.onnx_export import export_artifacts
    from vpexport.paths import resolve_schedule
    from vpexport.runtime import ArtifactRuntime

    art = tmp_path / "mini"
    export_artifacts(recipe, art, resolve_schedule(recipe, recipe.resolve_arch(), art), log=print)
    build_engines(art, precision=precision, workspace_gb=1, echo=print)
    cpu = ArtifactRuntime.open(art, provider="cpu")
    gpu = ArtifactRuntime.open(art, provider="tensorrt")
    assert type(gpu.graphs).__name__ == "TrtGraphs"
    from vpexport.data import load_samples

    samples = load_samples(recipe.task.data.eval)[:4]
    images, questions = [str(s.image) for s in samples], [s.question for s in samples]
    ids, mask, px = cpu.encode(images, questions)
    atol, rtol = TOL[precision]
    f_cpu, f_gpu = cpu.encode_image(px), gpu.encode_image(px)
    np.testing.assert_allclose(f_gpu, f_cpu, atol=atol * max(1.0, float(np.abs(f_cpu).max())), rtol=rtol)
    p_cpu, p_gpu = cpu.prefill(ids, mask, f_cpu), gpu.prefill(ids, mask, f_cpu)
    scale = max(1.0, float(np.abs(p_cpu.logits).max()))
    np.testing.assert_allclose(p_gpu.logits, p_cpu.logits, atol=atol * scale, rtol=rtol)
    for kc, kg in zip(p_cpu.kept, p_gpu.kept):
        if precision == "fp32":
            np.testing.assert_array_equal(np.sort(kg, -1), np.sort(kc, -1))
    if precision == "fp32":
        assert gpu.answer(images, questions) == cpu.answer(images, questions)

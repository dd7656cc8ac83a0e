"""`vpexport bench` on a tiny export: every figure is present and consistent with the raw timings.

Nothing here asserts a speed: timings are measured in benchmarks (docs/benchmarks.md), not tests.
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.artifact_helpers import build_checkpoint, cli, export_py, make_eval, write_recipe


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny FastV export with a 2-sample eval split (shared: bench only reads it and caches bench/)."""
    tmp = tmp_path_factory.mktemp("bench")
    ckpt = build_checkpoint(tmp / "mini")
    ev = make_eval(tmp / "data", n=2)
    rp = write_recipe(tmp / "bench_fastv.yaml", ckpt, "fastv", eval_file=ev)
    export_py(rp, tmp / "art")
    return tmp / "art"


def test_bench_reports_every_figure(art, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", art, "--reps", "3", "--decode-steps", "2", "--json", "--save", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("providers", "peers", "best", "flops", "kv_cache"):
        assert key in res, key
    from vpexport.manifest import artifact_digest

    assert res["artifact_digest"] == artifact_digest(json.loads((art / "manifest.json").read_text()))
    assert 0 < res["flops"]["ratio"] < 1 and 0 < res["kv_cache"]["ratio"] < 1
    # The bench's FLOPs are at the timed length: the recipe's layout with the text at the graphs' width
    # (padded to export.text_length.max = 16), named as such; plan / eval give the recipe's own.
    from vpexport.accounting import prefill_flops
    from vpexport.recipe import load_recipe

    recipe = load_recipe(art / "recipe.resolved.yaml")
    arch = recipe.resolve_arch()
    layout = recipe.layout(arch)
    assert res["flops"]["tokens"] == {"prefix": layout.prefix, "visual": layout.visual, "text": 16}
    from dataclasses import replace

    from vpexport.paths import resolve_schedule

    timed = prefill_flops(arch, resolve_schedule(recipe, arch, art), replace(layout, text=16))
    assert res["flops"]["ratio"] == round(timed["ratio"], 4)
    cpu = res["providers"]["cpu"]
    for key in ("ttft", "prefill", "decode", "memory"):
        assert key in cpu, key
    raw = res["raw_ms"]
    # the HF peer is timed inside the same interleaved loop as the two ONNX variants
    assert len(raw["cpu/pruned"]["prefill"]) == len(raw["cpu/dense"]["prefill"]) == len(raw["peer/hf_pytorch"]["prefill"]) == 3
    assert abs(cpu["prefill"]["pruned_ms"] - statistics.median(raw["cpu/pruned"]["prefill"])) < 1e-2
    assert abs(cpu["ttft"]["pruned_ms"] - statistics.median(raw["cpu/pruned"]["ttft"])) < 1e-2
    hf = res["peers"]["hf_pytorch"]
    assert abs(hf["ttft_ms"] - statistics.median(raw["peer/hf_pytorch"]["ttft"])) < 1e-2
    assert hf["peak_mb"] > 0
    b = res["best"]
    assert b["provider"] == "cpu" and b["ttft_ms"] == cpu["ttft"]["pruned_ms"]
    assert abs(b["ttft_vs_hf_pytorch"] - b["ttft_ms"] / hf["ttft_ms"]) < 1e-3
    assert abs(cpu["prefill"]["latency_over_flops"] - cpu["prefill"]["latency_ratio"] / res["flops"]["ratio"]) < 1e-3
    assert (art / "bench" / "dense" / "manifest.json").is_file()


def test_bench_bad_options_are_one_line(tmp_path):
    r = cli("bench", tmp_path, "--reps", "0")
    assert r.returncode == 2 and "--reps" in r.stderr and "Traceback" not in r.stderr


def test_bench_two_providers_side_by_side(art, tmp_path):
    """cpu and openvino in one interleaved run; --precision applies to openvino only."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'vpexport[openvino]')")
    out = tmp_path / "bench.json"
    r = cli("bench", art, "--provider", "cpu", "--provider", "openvino", "--precision", "f32", "--no-hf",
            "--no-memory", "--reps", "2", "--decode-steps", "2", "--json", "--save", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["providers"]) == {"cpu", "openvino"} and res["peers"] == {}
    assert res["providers"]["openvino"]["precision"] == "f32" and res["providers"]["cpu"]["precision"] == "fp32"
    assert len(res["raw_ms"]["openvino/pruned"]["ttft"]) == 2
    best = min(res["providers"], key=lambda p: res["providers"][p]["ttft"]["pruned_ms"])
    assert res["best"]["provider"] == best


def test_unpruned_reference_is_exported_again_when_the_exporting_code_changes(art, monkeypatch):
    """bench/dense/ is reused for the same recipe and exporter code, and redone for other code."""
    from vpexport.bench import runner
    from vpexport.recipe import load_recipe

    recipe = load_recipe(art / "recipe.resolved.yaml")
    logs = []
    dense = runner.ensure_dense_export(art, recipe, log=logs.append)
    first = (dense / "onnx" / "prefill.onnx").stat().st_mtime_ns
    runner.ensure_dense_export(art, recipe, log=logs.append)
    assert (dense / "onnx" / "prefill.onnx").stat().st_mtime_ns == first  # same code: reused
    monkeypatch.setattr(runner, "exporter_fingerprint", lambda: "other exporter")
    logs.clear()
    runner.ensure_dense_export(art, recipe, log=logs.append)
    assert any("exporting the unpruned reference" in m for m in logs)
    assert (dense / "onnx" / "prefill.onnx").stat().st_mtime_ns != first

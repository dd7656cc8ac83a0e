"""`vpexport bench` on a tiny export: every figure is present and consistent with the raw timings.

Nothing here asserts a speed: timings are measured in benchmarks (docs/benchmarks.md), not tests.
"""

from __future__ import annotations

import json
import statistics

from tests.artifact_helpers import build_checkpoint, cli, export_py, make_eval, write_recipe


def test_bench_reports_every_figure(tmp_path):
    ckpt = build_checkpoint(tmp_path / "mini")
    ev = make_eval(tmp_path / "data", n=2)
    rp = write_recipe(tmp_path / "bench_fastv.yaml", ckpt, "fastv", eval_file=ev)
    art = tmp_path / "art"
    export_py(rp, art)
    out = tmp_path / "bench.json"
    r = cli("bench", art, "--reps", "3", "--decode-steps", "2", "--json", "--save", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("prefill", "decode", "flops", "kv_cache", "hf_pytorch", "memory"):
        assert key in res, key
    assert 0 < res["flops"]["ratio"] < 1 and 0 < res["kv_cache"]["ratio"] < 1
    raw = res["raw_ms"]
    # the HF reference is timed inside the same interleaved loop as the two ONNX variants
    assert len(raw["pruned"]["prefill"]) == len(raw["dense"]["prefill"]) == len(raw["hf"]["prefill"]) == 3
    assert abs(res["prefill"]["pruned_ms"] - statistics.median(raw["pruned"]["prefill"])) < 1e-2
    hf = res["hf_pytorch"]
    assert abs(hf["prefill_ms"] - statistics.median(raw["hf"]["prefill"])) < 1e-2
    assert abs(hf["prefill_speedup"] - hf["prefill_ms"] / res["prefill"]["pruned_ms"]) < 1e-2
    assert (art / "bench" / "dense" / "manifest.json").is_file()

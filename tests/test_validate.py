"""`vpexport validate`: passes on a good export; a tampered ONNX file fails with exit 4 and every mismatch listed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.artifact_helpers import build_checkpoint, cli, export_py, make_eval, write_recipe


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    ckpt = build_checkpoint(d / "mini")
    ev = make_eval(d / "data", n=6)
    rp = write_recipe(d / "fastv.yaml", ckpt, "fastv", eval_file=ev, samples=6)
    export_py(rp, d / "art")
    return d / "art"


def _perturb(path, pick, scale=0.5):
    """Add noise to one weight initializer of an ONNX file (chosen by `pick(name, dims)`)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for i, init in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(init)
        if pick(init.name, a.shape):
            noisy = a + np.random.RandomState(0).normal(0, scale, a.shape).astype(a.dtype)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, init.name))
            onnx.save(m, str(path))
            return init.name
    raise AssertionError("no initializer picked")


def test_validate_passes_on_good_export(good):
    r = cli("validate", good, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["passed"] is True and rep["failures"] == []
    assert rep["samples"] == 6 and rep["generation_match_rate"] == 1.0 and rep["kept_indices_equal"] is True
    assert rep["accuracy"]["onnx"] == rep["accuracy"]["torch"]
    outs = rep["outputs"]
    assert {"vision.image_features", "prefill.logits", "decode.logits", "prefill.present.7.value",
            "decode.new.0.key"} <= set(outs)
    assert len([k for k in outs if k.startswith("prefill.present.")]) == 16
    for o in outs.values():
        assert o["passed"] and o["max_abs"] <= o["atol"] + 1e-12 and o["atol"] == 1e-4 and o["rtol"] == 1e-3
    man = json.loads((good / "manifest.json").read_text())
    assert man["validation"]["passed"] is True and man["validation"]["generation_match_rate"] == 1.0


def test_validate_fails_on_tampered_weights(good, tmp_path):
    from vpexport.manifest import read_manifest, update_manifest

    art = tmp_path / "art"
    shutil.copytree(good, art)
    # the first FFN down-projection (384 -> 128) of prefill, and the first 128x128 weight of decode
    picked = _perturb(art / "onnx" / "prefill.onnx", lambda n, s: tuple(s) == (384, 128))
    _perturb(art / "onnx" / "decode.onnx", lambda n, s: tuple(s) == (128, 128))
    update_manifest(art, None, None, files=["onnx/prefill.onnx", "onnx/decode.onnx"])  # re-hash: not a hash failure
    read_manifest(art)
    r = cli("validate", art, "--json")
    assert r.returncode == 4, (picked, r.stderr[-2000:])
    rep = json.loads(r.stdout)
    assert rep["passed"] is False
    outs = rep["outputs"]
    assert outs["vision.image_features"]["passed"]  # untouched graph still passes
    assert not outs["prefill.logits"]["passed"] and not outs["decode.logits"]["passed"]
    failed = [k for k, o in outs.items() if not o["passed"]]
    assert any(k.startswith("prefill.present.") for k in failed)
    # every failing output is listed, not just the first
    for k in failed:
        assert any(f.startswith(k + ":") for f in rep["failures"])
    assert len(rep["failures"]) >= len(failed) >= 3
    assert "error: validate:" in r.stderr and "mismatch" in r.stderr
    man = json.loads((art / "manifest.json").read_text())
    assert man["validation"]["passed"] is False


def test_validate_table_and_exit_codes(good, tmp_path):
    r = cli("validate", good, "--samples", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prefill.logits" in r.stdout and "PASS" in r.stdout and "PASSED" in r.stdout
    assert "greedy generation: 2/2 identical" in r.stdout
    art = tmp_path / "art"
    shutil.copytree(good, art)
    (art / "onnx" / "prefill.onnx").unlink()
    r = cli("validate", art)
    assert r.returncode == 3 and "missing" in r.stderr


def test_validate_openvino_f32_passes_with_full_precision_checks(good):
    import pytest

    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'vpexport[openvino]')")
    r = cli("validate", good, "--provider", "openvino", "--precision", "f32", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["runtime_precision"] == "fp32" and rep["reduced_precision"] is False
    assert rep["kept_indices_equal"] is True and rep["generation_match_rate"] == 1.0
    assert all(o["rule"] == "elementwise" for o in rep["outputs"].values())


def test_validate_precision_on_a_fixed_precision_provider_is_one_line(good):
    r = cli("validate", good, "--provider", "cpu", "--precision", "bf16")
    assert r.returncode == 2 and "--precision" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method,keep", [("dart", 40), ("divprune", 30), ("cdpruner", 36), ("dart_projector", 41)])
def test_attention_free_methods_export_validate_and_run_without_torch_from_the_cli(tmp_path, method, keep):
    """The attention-free methods end to end (DART in the decoder, DivPrune before it): export,
    validate (every output, kept indices, all generations), and the torch-free runtime answering
    with the same kept indices as PyTorch."""
    d = tmp_path
    ckpt = build_checkpoint(d / "mini")
    ev = make_eval(d / "data", n=4)
    rp = write_recipe(d / f"{method}.yaml", ckpt, method, eval_file=ev, samples=4)
    r = cli("export", rp, "--out", d / "art")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("validate", d / "art", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["kept_indices_equal"] is True and rep["generation_match_rate"] == 1.0
    img = sorted((d / "data").rglob("*.png"))[0]
    runs = [json.loads(cli("run", t, "--image", img, "--prompt", "what is it", "--json").stdout) for t in (rp, d / "art")]
    kept = [x["answers"][0]["kept"] for x in runs]
    assert kept[0] == kept[1] and len(kept[0][0]) == keep

"""`vpexport build` end to end on a tiny checkpoint: stages, reuse, atomic failure."""

from __future__ import annotations

import json

import pytest

from tests.artifact_helpers import checkpoint_and_eval, cli, write_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return checkpoint_and_eval(tmp_path_factory.mktemp("build"), n=4)


def test_build_runs_every_stage_then_reuses_them(setup):
    d, ckpt, ev = setup
    rp = write_recipe(d / "b_fastv.yaml", ckpt, "fastv", eval_file=ev, samples=4)
    out = d / "art"
    r = cli("build", rp, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    st = m["build"]["stages"]
    assert m["build"]["complete"] is True
    assert st["export"]["status"] == "done" and st["validate"]["status"] == "done"
    assert st["calibrate"]["status"] == "not requested"
    # No GPU here: the engine stage is skipped with one line, not a failure (done on a GPU box).
    assert st["engine"]["status"] in ("skipped", "done")
    if st["engine"]["status"] == "skipped":
        assert "engine: skipped" in r.stderr
    assert (out / "onnx" / "prefill.onnx").is_file() and m["validation"]["passed"] is True
    assert "next:" in r.stdout and f"vpexport run {out}" in r.stdout
    # The summary says what was built with, and a skip's full reason is printed once (on stderr).
    assert "schedule: fastv (2:72), from the recipe" in r.stdout
    if st["engine"]["status"] == "skipped":
        reason = st["engine"]["reason"]
        assert reason.split(":")[0] in r.stdout and reason not in r.stdout and reason in r.stderr
    assert not (d / ".art.staging").exists()

    again = cli("build", rp, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "export: unchanged inputs, reusing" in again.stderr
    assert "validate: unchanged inputs, reusing" in again.stderr
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["build"]["stages"]["export"]["reused"] is True
    assert m2["files"]["onnx/prefill.onnx"] == m["files"]["onnx/prefill.onnx"]

    # A changed recipe section re-runs the stages that depend on it.
    rp.write_text(rp.read_text().replace("max_new_tokens: 5", "max_new_tokens: 4"))
    third = cli("build", rp, "--out", out)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "export: unchanged inputs" not in third.stderr


def test_failed_build_leaves_no_final_artifact(setup, tmp_path):
    d, ckpt, ev = setup
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not a png")  # exists (passes the up-front check), fails to decode
    (data / "eval.jsonl").write_text(ev.read_text() + json.dumps({"image": "broken.png", "question": "q",
                                                                   "answer": "a"}) + "\n")
    for line in ev.read_text().splitlines():
        (data / json.loads(line)["image"]).write_bytes((ev.parent / json.loads(line)["image"]).read_bytes())
    rp = write_recipe(d / "b_badimage.yaml", ckpt, "fastv", eval_file=data / "eval.jsonl", samples=5)
    out = d / "art_fail"
    r = cli("build", rp, "--out", out)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "task.data.eval" in err[0] and "eval.jsonl:5" in err[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not out.exists()  # the final folder is only ever a complete build
    assert (d / ".art_fail.staging" / "onnx" / "prefill.onnx").is_file()  # finished stages kept for a re-run


@pytest.mark.parametrize("problem", ["no eval split", "a row without answer"])
def test_data_problems_fail_before_any_stage(setup, tmp_path, problem):
    d, ckpt, ev = setup
    if problem == "no eval split":  # validation reads task.data.eval
        rp = write_recipe(tmp_path / "b.yaml", ckpt, "fastv", eval_file=None)
    else:
        bad = tmp_path / "eval.jsonl"
        bad.write_text(ev.read_text().replace('"answer"', '"answers"', 1))
        for line in ev.read_text().splitlines():
            img = json.loads(line)["image"]
            (tmp_path / img).write_bytes((ev.parent / img).read_bytes())
        rp = write_recipe(tmp_path / "b.yaml", ckpt, "fastv", eval_file=bad)
    out = tmp_path / "art"
    r = cli("build", rp, "--out", out)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "task.data.eval" in err[0], r.stderr[-1500:]
    assert "[build] export" not in r.stderr and "[export]" not in r.stderr  # nothing ran
    assert not out.exists() and not (tmp_path / ".art.staging").exists()


def test_summary_names_the_calibrated_schedule(tmp_path):
    from vpexport.commands.build import _chosen

    (tmp_path / "schedule.json").write_text(json.dumps({
        "schedule": {"method": "visipruner", "points": [{"layer": 1, "keep": 11}, {"layer": 7, "keep": 0}]},
        "flops": {"ratio": 0.24541}, "eval": {"accuracy": 0.94333, "unpruned_accuracy": 0.95333, "samples": 300}}))
    assert _chosen(tmp_path) == ("visipruner (1:11, 7:0), calibrated: exact prefill FLOPs ratio 0.245, "
                                 "eval accuracy 0.9433 against 0.9533 unpruned (300 samples)")
    s = json.loads((tmp_path / "schedule.json").read_text())
    s["flops"]["tokens"] = {"prefix": 9, "visual": 144, "text": 7}  # the prompt layout the ratio is for
    (tmp_path / "schedule.json").write_text(json.dumps(s))
    assert _chosen(tmp_path) == ("visipruner (1:11, 7:0), calibrated: exact prefill FLOPs ratio 0.245 "
                                 "(prompt 9+144+7 tokens), eval accuracy 0.9433 against 0.9533 unpruned (300 samples)")

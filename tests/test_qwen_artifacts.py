"""A Qwen2-VL / Qwen2.5-VL folder as a user has it (model + tokenizer + preprocessor_config.json,
no combined processor) through plan / build / validate / run from a recipe."""

from __future__ import annotations

import json

import pytest

from tests.artifact_helpers import QWEN_TEMPLATE, build_qwen_checkpoint, cli, make_eval, require_real_peer

IMAGE_SIZE = [112, 140]  # 4 x 5 merged tokens


def _recipe(path, ckpt, eval_file, image_size=IMAGE_SIZE):
    size = f", image_size: {image_size}" if image_size is not None else ""
    path.write_text(f"""name: {path.stem}
model: {{path: {ckpt}, dtype: float32{size}}}
task:
  type: vqa
  data: {{eval: {eval_file}}}
  prompt: {json.dumps(QWEN_TEMPLATE)}
  max_new_tokens: 5
pruning:
  method: himap
  points: [{{layer: 2, keep: 12}}, {{layer: 5, keep: 4}}]
export:
  text_length: {{mode: padded, max: 16}}
validate:
  samples: 4
""")
    return path


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_qwen_checkpoint(root / "ckpt", request.param)
    eval_file = make_eval(root / "data", n=4)
    recipe = _recipe(root / "recipe.yaml", ckpt, eval_file)
    out = root / "art"
    r = cli("build", recipe, "--out", out, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root, recipe, out, r


def test_build_validates_every_output(built):
    _, _, out, r = built
    log = r.stdout + r.stderr
    for row in ("preprocess.pixel_values", "vision.image_features", "prefill.logits", "decode.logits"):
        assert any(line.startswith(row) and line.rstrip().endswith("PASS") for line in log.splitlines()), row
    assert "kept indices: identical at every prune point" in log
    assert "greedy generation: 4/4 identical" in log
    gen = json.loads((out / "runtime" / "generation.json").read_text())
    assert gen["visual_tokens"] == 20 and gen["image_size"] == IMAGE_SIZE
    assert gen["text_position_start"] == gen["prefix"] + 5  # after max(4, 5) merged rows / columns


def test_prefill_stores_only_the_rope_rows_it_reaches(built):
    """prefill.onnx looks RoPE rows up in a table of the positions below its last text position;
    decode.onnx keeps the config's whole max_position_embeddings (generation may run that far)."""
    import onnx

    root, _, out, _ = built
    limit = json.loads((root / "ckpt" / "config.json").read_text())
    limit = (limit.get("text_config") or limit)["max_position_embeddings"]
    gen = json.loads((out / "runtime" / "generation.json").read_text())
    rows = {}
    for name in ("prefill", "decode"):
        m = onnx.load(str(out / "onnx" / f"{name}.onnx"), load_external_data=False)
        consts = [list(t.dims) for t in m.graph.initializer] + [
            list(a.t.dims) for n in m.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        rows[name] = {d[0] for d in consts if len(d) == 2 and d[1] == 16}  # (positions, head dim) tables
    assert rows["decode"] == {limit}, rows
    assert rows["prefill"] == {gen["text_position_start"] + 16}, rows  # text_length.max 16


def test_run_agrees_on_both_paths(built):
    root, recipe, out, _ = built
    img = root / "data" / "img1.png"
    a = cli("run", out, "--image", img, "--prompt", "how many digits are there ?", "--json")
    b = cli("run", recipe, "--image", img, "--prompt", "how many digits are there ?", "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    ans_a, ans_b = json.loads(a.stdout)["answers"][0], json.loads(b.stdout)["answers"][0]
    assert ans_a["tokens"] == ans_b["tokens"] and len(ans_a["tokens"]) > 0
    assert ans_a["kept"] == ans_b["kept"] and [len(k) for k in ans_a["kept"]] == [12, 4]


def test_plan_counts_the_qwen_vision_tower(built):
    _, recipe, _, _ = built
    r = cli("plan", recipe, "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["arch"]["family"] in ("qwen2-vl", "qwen2.5-vl") and p["arch"]["visual_tokens"] == 20
    v = p["flops"]["vision"]
    assert v["encoder"] > 0 and v["projector"] > 0 and v["total"] == sum(x for k, x in v.items() if k != "total")


def test_bench_times_openvino_genai_and_its_cdpruner_side_by_side(built, tmp_path):
    """The peer runs the same checkpoint (exported by optimum-intel) on the same 20 visual tokens, and
    its CDPruner at each of the schedule's keep budgets, counted from the pipeline's own input."""
    require_real_peer()
    _, _, out, _ = built
    save = tmp_path / "bench.json"
    r = cli("bench", out, "--provider", "cpu", "--peer", "openvino-genai", "--peer", "openvino-genai-cdpruner",
            "--reps", "2", "--decode-steps", "1", "--no-memory", "--json", "--save", save, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(save.read_text())
    assert res["peers_skipped"] == {}
    dense = res["peers"]["openvino_genai"]
    assert dense["visual_tokens"] == 20 and "pruning_ratio" not in dense
    # The smallest integer ratio that keeps that many: 20 x 0.62 = 12.4 -> 12, 20 x 0.22 = 4.4 -> 4.
    for keep, ratio in ((12, 38), (4, 78)):
        row = res["peers"][f"openvino_genai_cdpruner_keep{keep}"]
        assert (row["pruning_ratio"], row["visual_tokens"]) == (ratio, keep), row
        assert dense["input_tokens"] - row["input_tokens"] == 20 - keep
        assert len(res["raw_ms"][f"peer/openvino_genai_cdpruner_keep{keep}"]["ttft"]) == 2
        b = res["best"]
        assert abs(b[f"ttft_vs_openvino_genai_cdpruner_keep{keep}"] - b["ttft_ms"] / row["ttft_ms"]) < 1e-3
    assert len(res["raw_ms"]["peer/openvino_genai"]["ttft"]) == len(res["raw_ms"]["cpu/pruned"]["ttft"]) == 2


def test_missing_image_size_is_one_line(built, tmp_path):
    root, _, _, _ = built
    recipe = _recipe(tmp_path / "r.yaml", root / "ckpt", root / "data" / "eval.jsonl", image_size=None)
    r = cli("plan", recipe)
    assert r.returncode == 2
    assert "model.image_size" in r.stderr and "multiples of 28" in r.stderr and "Traceback" not in r.stderr


def test_image_size_off_the_grid_is_one_line(built, tmp_path):
    root, _, _, _ = built
    recipe = _recipe(tmp_path / "r.yaml", root / "ckpt", root / "data" / "eval.jsonl", image_size=[100, 140])
    r = cli("plan", recipe)
    assert r.returncode == 2 and "not a multiple of 28" in r.stderr and "[112, 140]" in r.stderr

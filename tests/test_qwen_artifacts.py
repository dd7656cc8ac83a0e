"""A Qwen2-VL / Qwen2.5-VL folder as a user has it (model + tokenizer + preprocessor_config.json,
no combined processor) through plan / build / validate / run from a recipe."""

from __future__ import annotations

import json

import pytest

from tests.artifact_helpers import QWEN_TEMPLATE, build_qwen_checkpoint, cli, make_eval

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

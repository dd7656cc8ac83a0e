"""Strict recipes: every bad recipe is ONE line on stderr, exit code 2, naming the field.

Checked through the real CLI entry point (`vpexport.cli.main`, as `vpexport plan` calls it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vpexport.cli import main
from vpexport.errors import RecipeError
from vpexport.recipe import load_recipe, save_resolved

ROOT = Path(__file__).resolve().parents[1]


def make_model_dir(d: Path, layers=4, image=28, patch=14, hidden=64, heads=4, kv_heads=2) -> Path:
    """A weight-free LLaVA-style dir: config.json + a word-level tokenizer.json with <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d.mkdir(parents=True, exist_ok=True)
    words = ["[UNK]", "SYSTEM:", "hello", "there", "USER:", "ASSISTANT:", "what", "colour", "is", "it", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>"])
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "model_type": "llava",
        "image_token_index": tok.token_to_id("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                          "image_size": image, "patch_size": patch, "num_channels": 3},
        "text_config": {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden,
                        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                        "vocab_size": 100},
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    return d


BASE = {
    "model": {"arch": "llava-1.5-7b"},
    "task": {"type": "vqa", "prompt": "USER: <image>\n{question} ASSISTANT:"},
    "pruning": {"method": "himap", "points": [{"layer": 2, "keep": 288}, {"layer": 8, "keep": 72}]},
}


def write(tmp_path: Path, doc, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def patch(**sections) -> dict:
    d = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def cli_error(capsys, path: Path) -> str:
    """Run `vpexport plan PATH`; assert exit 2 and exactly one stderr line; return it."""
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path)])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert out == ""
    return lines[0]


# ----------------------------------------------------------------------------- keys
def test_misspelt_key_suggests(tmp_path, capsys):
    d = patch()
    d["pruning"]["pionts"] = d["pruning"].pop("points")
    line = cli_error(capsys, write(tmp_path, d))
    assert line == "error: pruning.pionts: unknown key (fix: did you mean 'points'?)"


def test_misspelt_section_suggests_and_counts_more(tmp_path, capsys):
    d = patch()
    d["pruneing"] = d.pop("pruning")
    line = cli_error(capsys, write(tmp_path, d))
    # the misspelt key is reported first, the resulting missing 'pruning' is counted
    assert line == "error: pruneing: unknown key (and 1 more problem) (fix: did you mean 'pruning'?)"


@pytest.mark.parametrize(
    "section,value,field,suggest",
    [
        ("export", {"text_lenght": {"max": 64}}, "export.text_lenght", "text_length"),
        ("validate", {"sampels": 3}, "validate.sampels", "samples"),  # aliased field
        ("deploy", {"triton": {"max_batch_sise": 4}}, "deploy.triton.max_batch_sise", "max_batch_size"),
        ("task", {"type": "vqa", "prompt": "<image>{question}", "dat": {}}, "task.dat", "data"),
    ],
)
def test_nested_misspelt_keys(tmp_path, capsys, section, value, field, suggest):
    line = cli_error(capsys, write(tmp_path, patch(**{section: value})))
    assert line.startswith(f"error: {field}: unknown key")
    assert f"did you mean '{suggest}'?" in line


def test_point_misspelt_key(tmp_path, capsys):
    d = patch()
    d["pruning"]["points"][1] = {"layer": 8, "kepp": 72}
    line = cli_error(capsys, write(tmp_path, d))
    assert line == "error: pruning.points[1].kepp: unknown key (fix: did you mean 'keep'?)"


def test_unknown_key_without_close_match_lists_allowed(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(engine={"zzz": 1})))
    assert line.startswith("error: engine.zzz: unknown key")
    assert "allowed keys here: precision, workspace_gb, timing_cache, version_compatible" in line


def test_wrong_type_and_enum(tmp_path, capsys):
    d = patch()
    d["pruning"]["points"][0]["keep"] = "288"  # a string is not silently an int
    assert cli_error(capsys, write(tmp_path, d)).startswith("error: pruning.points[0].keep: Input should be a valid integer")
    line = cli_error(capsys, write(tmp_path, patch(export={"precision": "int4"})))
    assert line.startswith("error: export.precision: Input should be 'fp32' or 'fp16' (got 'int4')")


def test_missing_required_section(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(task=None)))
    assert line.startswith("error: task: is required but missing")


def test_bad_yaml_names_line(tmp_path, capsys):
    p = write(tmp_path, "model:\n  arch: llava-1.5-7b\ntask: [unclosed\n")
    line = cli_error(capsys, p)
    assert "invalid YAML at line 4" in line and "while parsing a flow sequence started at line 3" in line
    assert cli_error(capsys, write(tmp_path, "- a\n- b\n", "l.yaml")).startswith("error: recipe: a recipe is a YAML mapping, not list")


def test_duplicate_key(tmp_path, capsys):
    p = write(tmp_path, "model: {arch: llava-1.5-7b}\nmodel: {arch: llava-1.5-13b}\n")
    line = cli_error(capsys, p)
    assert line.startswith("error: model: duplicate key 'model' (line 2; first on line 1)")


def test_missing_recipe_file(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("layer", [0, 32, 40])
def test_prune_layer_out_of_range(tmp_path, capsys, layer):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": [{"layer": layer, "keep": 288}]})))
    assert line.startswith(f"error: pruning.points[0].layer: layer {layer} is out of range for a 32-layer decoder")
    assert "choose 1..31" in line


def test_prune_layers_not_increasing(tmp_path, capsys):
    pts = [{"layer": 8, "keep": 288}, {"layer": 8, "keep": 72}]
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himap", "points": pts})))
    assert line.startswith("error: pruning.points[1].layer: layer 8 does not come after the previous point's layer 8")


def test_keep_not_positive(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": [{"layer": 3, "keep": 0}]})))
    assert line.startswith("error: pruning.points[0].keep: keep=0 must be positive")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": [{"layer": 3, "keep": -5}]})))
    assert line.startswith("error: pruning.points[0].keep: keep=-5 must be positive")


def test_keep_more_than_present(tmp_path, capsys):
    pts = [{"layer": 2, "keep": 288}, {"layer": 8, "keep": 300}]
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himap", "points": pts})))
    assert line.startswith("error: pruning.points[1].keep: keep=300 is more than the 288 visual tokens present at layer 8")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": [{"layer": 3, "keep": 577}]})))
    assert "more than the 576 visual tokens" in line


def test_keep_fraction_resolves_against_tokens_present(tmp_path):
    pts = [{"layer": 2, "keep_fraction": 0.5}, {"layer": 8, "keep_fraction": 0.25}]
    r = load_recipe(write(tmp_path, patch(pruning={"method": "himap", "points": pts})))
    s = r.schedule(r.resolve_arch())
    assert [(p.layer, p.keep, p.rule) for p in s.points] == [(2, 288, "text_attention"), (8, 72, "visual_attention")]
    tiny = patch(pruning={"method": "fastv", "points": [{"layer": 3, "keep_fraction": 0.0001}]})
    assert load_recipe(write(tmp_path, tiny, "t.yaml")).schedule().points[0].keep == 1  # min 1


def test_keep_and_keep_fraction_exclusive(tmp_path, capsys):
    pts = [{"layer": 3, "keep": 288, "keep_fraction": 0.5}]
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": pts})))
    assert line.startswith("error: pruning.points[0]: give exactly one of keep / keep_fraction")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "fastv", "points": [{"layer": 3, "keep_fraction": 1.5}]})))
    assert line.startswith("error: pruning.points[0].keep_fraction:")


def test_wrong_point_count(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himap", "points": [{"layer": 2, "keep": 288}]})))
    assert line.startswith("error: pruning.points: method himap takes 2 prune point(s) (text_attention, visual_attention), got 1")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "none", "points": [{"layer": 2, "keep": 288}]})))
    assert line.startswith("error: pruning.points: method none takes 0 prune point(s)")


def test_points_required_without_calibrate(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himap"})))
    assert line.startswith("error: pruning.points: method himap needs points or calibrate")
    assert "{layer: 2, keep: 288}, {layer: 8, keep: 72}" in line


def test_sink_layers_on_method_without_sink(tmp_path, capsys):
    pr = {"method": "fastv", "points": [{"layer": 3, "keep": 288}], "sink_layers": 2}
    line = cli_error(capsys, write(tmp_path, patch(pruning=pr)))
    assert line.startswith("error: pruning.sink_layers: method fastv has no sink stage")
    assert "visipruner" in line


def test_visipruner_sink_and_drop_all(tmp_path, capsys):
    pr = {"method": "visipruner", "points": [{"layer": 9, "keep": 10}, {"layer": 24, "keep": 0}], "sink_layers": 6}
    s = load_recipe(write(tmp_path, patch(pruning=pr))).schedule()
    assert s.sink_layers == 6 and [p.rule for p in s.points] == ["value_contribution", "drop_all"]
    pr["points"][1]["keep"] = 5
    assert cli_error(capsys, write(tmp_path, patch(pruning=pr))).startswith("error: pruning.points[1].keep: point 1 of visipruner drops")
    pr["points"][1]["keep"], pr["sink_layers"] = 0, 12
    assert cli_error(capsys, write(tmp_path, patch(pruning=pr))).startswith("error: pruning.sink_layers: the shallow sink stage")


def test_calibrate_and_points_exclusive(tmp_path, capsys):
    pr = dict(BASE["pruning"], calibrate={"tolerance": 0.01})
    line = cli_error(capsys, write(tmp_path, patch(pruning=pr)))
    assert line.startswith("error: pruning.calibrate: points and calibrate are mutually exclusive")


def test_calibrate_tolerance_range_and_auto(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himap", "calibrate": {"tolerance": 2}})))
    assert line.startswith("error: pruning.calibrate.tolerance: Input should be less than or equal to 1")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "auto", "points": []})))
    assert line.startswith("error: pruning.method: method auto needs calibrate")
    r = load_recipe(write(tmp_path, patch(pruning={"method": "auto", "calibrate": {}})))
    assert r.schedule() is None and r.calibrating
    assert r.pruning.calibrate.objective == "min_flops" and r.pruning.calibrate.tolerance == 0.01


def test_calibrate_flops_budget(tmp_path, capsys):
    r = load_recipe(write(tmp_path, patch(pruning={"method": "auto", "calibrate": {"flops_budget": 0.3}})))
    c = r.pruning.calibrate
    assert c.objective == "max_accuracy" and c.flops_budget == 0.3 and c.tolerance is None
    r = load_recipe(write(tmp_path, patch(pruning={"method": "auto", "calibrate": {"flops_budget": 0.3, "tolerance": 0.02}})))
    assert r.pruning.calibrate.tolerance == 0.02
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "auto", "calibrate": {"flops_budget": 1.5}})))
    assert line.startswith("error: pruning.calibrate.flops_budget: Input should be less than 1")
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "auto", "calibrate": {"flops_buget": 0.3}})))
    assert "flops_buget" in line and "flops_budget" in line
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "random", "calibrate": {"tolerance": 0.01}})))
    assert line.startswith("error: pruning.calibrate: method random has nothing to calibrate")
    shipped = load_recipe(ROOT / "recipes" / "mini_vqa_latency.yaml").pruning.calibrate
    assert (shipped.objective, shipped.flops_budget, shipped.tolerance) == ("max_accuracy", 0.25, 0.02)


def test_unknown_method_suggests(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(pruning={"method": "himpa", "points": []})))
    assert line == "error: pruning.method: unknown method 'himpa' (fix: did you mean 'himap'?)"


# ----------------------------------------------------------------------------- model / env / prompt
def test_model_path_and_arch_exclusive(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(model={"arch": "llava-1.5-7b", "path": str(tmp_path)})))
    assert line.startswith("error: model: give exactly one of path / arch (both are set)")
    line = cli_error(capsys, write(tmp_path, patch(model={"arch": "llava-1.5-7bb"})))
    assert line == "error: model.arch: unknown built-in architecture 'llava-1.5-7bb' (fix: did you mean 'llava-1.5-7b'?)"


def test_missing_model_dir(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(model={"path": "no/such/dir"})))
    assert line.startswith(f"error: model.path: model directory {tmp_path / 'no/such/dir'} does not exist")
    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, write(tmp_path, patch(model={"path": "empty"})))
    assert line.startswith(f"error: model.path: no config.json in {tmp_path / 'empty'}")


def test_broken_config_json(tmp_path, capsys):
    make_model_dir(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["text_config"]["hidden_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, write(tmp_path, patch(model={"path": "m"})))
    assert line.startswith(f"error: model.path: config.json in {tmp_path / 'm'} has no 'hidden_size'")
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert cli_error(capsys, write(tmp_path, patch(model={"path": "m"}))).startswith("error: model.path: config.json in")


def test_unset_env_var(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VPX_TEST_MODEL", raising=False)
    line = cli_error(capsys, write(tmp_path, patch(model={"path": "${VPX_TEST_MODEL}"})))
    assert line.startswith("error: model.path: environment variable VPX_TEST_MODEL is not set (fix: export VPX_TEST_MODEL=")
    d = patch(model={"path": "${VPX_TEST_MODEL}"})
    d["task"]["data"] = {"calib": "${VPX_TEST_DATA}/calib.jsonl"}
    monkeypatch.delenv("VPX_TEST_DATA", raising=False)
    monkeypatch.setenv("VPX_TEST_MODEL", str(make_model_dir(tmp_path / "m", layers=16, image=336)))
    assert cli_error(capsys, write(tmp_path, d)).startswith("error: task.data.calib: environment variable VPX_TEST_DATA")


def test_env_var_expansion_and_default(tmp_path, monkeypatch):
    make_model_dir(tmp_path / "m", layers=16, image=336)
    monkeypatch.setenv("VPX_TEST_MODEL", str(tmp_path / "m"))
    monkeypatch.delenv("VPX_TEST_DATA", raising=False)
    d = patch(model={"path": "${VPX_TEST_MODEL}"})
    d["task"]["data"] = {"calib": "${VPX_TEST_DATA:-data}/calib.jsonl"}
    r = load_recipe(write(tmp_path, d))
    assert r.model.path == str((tmp_path / "m").resolve())
    assert r.task.data.calib == str((tmp_path / "data" / "calib.jsonl").resolve())  # relative to the recipe's folder


@pytest.mark.parametrize(
    "prompt,msg",
    [
        ("USER: {question} ASSISTANT:", "exactly once (found 0)"),
        ("USER: <image><image>\n{question} ASSISTANT:", "exactly once (found 2)"),
        ("USER: <image>\nWhat is it? ASSISTANT:", "has no {question} slot"),
    ],
)
def test_bad_prompt(tmp_path, capsys, prompt, msg):
    line = cli_error(capsys, write(tmp_path, patch(task={"type": "vqa", "prompt": prompt})))
    assert line.startswith("error: task.prompt: ") and msg in line


def test_text_longer_than_export_max(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(task={"type": "vqa", "prompt": "<image>{question}", "text_tokens": 100})))
    assert line.startswith("error: task.text_tokens: text_tokens 100 is more than export.text_length.max (64)")


@pytest.mark.parametrize(
    "text_length,msg",
    [
        ({"mode": "padded", "max": 48, "buckets": [16]}, "text_length.buckets needs a dynamic text axis"),
        ({"mode": "dynamic", "max": 48, "buckets": [16, 64]}, "must be lengths between 1 and max (48)"),
        ({"mode": "dynamic", "max": 48, "buckets": []}, "must be lengths between 1 and max (48)"),
        ({"mode": "dynamic", "max": 48, "buckets": [32, 16]}, "must be increasing, without repeats"),
    ],
)
def test_text_buckets_checked(tmp_path, capsys, text_length, msg):
    line = cli_error(capsys, write(tmp_path, patch(export={"text_length": text_length})))
    assert line.startswith("error: export.text_length.buckets: ") and msg in line


def test_text_bucket_widths(tmp_path):
    from vpexport.runtime.text_length import TextLength, text_length_meta

    r = load_recipe(write(tmp_path, patch(export={"text_length": {"mode": "dynamic", "max": 48, "buckets": [8, 16]}})))
    meta = text_length_meta(r.export.text_length)
    assert meta == {"mode": "dynamic", "max": 48, "buckets": [8, 16, 48]}  # max is always the last bucket
    tl = TextLength.from_generation({"text_length": meta})
    assert [tl.width(n) for n in (1, 8, 9, 16, 17, 48)] == [8, 8, 16, 16, 48, 48]
    assert TextLength.from_generation({"text_length": {"mode": "padded", "max": 48}}).width(3) == 48
    assert TextLength.from_generation({"text_length": {"mode": "dynamic", "max": 48}}).width(3) == 3


def test_triton_batch_checks(tmp_path, capsys):
    line = cli_error(capsys, write(tmp_path, patch(deploy={"triton": {"preferred_batch_sizes": [4, 16]}})))
    assert line.startswith("error: deploy.triton.preferred_batch_sizes[1]: 16 is outside 1..max_batch_size (8)")


# ----------------------------------------------------------------------------- local dir: layout, data, resolved
def test_local_dir_layout_from_tokenizer(tmp_path):
    make_model_dir(tmp_path / "m", layers=4)
    d = patch(model={"path": "m"}, pruning={"method": "fastv", "points": [{"layer": 1, "keep_fraction": 0.5}]})
    d["task"] = {"type": "vqa", "prompt": "SYSTEM: hello there USER: <image>\n{question} ASSISTANT:", "data": {"calib": "c.jsonl"}}
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "x.png", "question": "what colour is it ?", "answer": "red"}) + "\n")
    r = load_recipe(write(tmp_path, d))
    arch = r.resolve_arch()
    assert arch.visual_tokens == 4 and arch.text.kv_heads == 2
    lay = r.layout(arch)
    # prefix: SYSTEM: hello there USER: -> 4; text: what colour is it ? ASSISTANT: -> 6
    assert (lay.prefix, lay.visual, lay.text) == (4, 4, 6)
    assert r.schedule(arch).points[0].keep == 2


def test_require_data(tmp_path, capsys):
    r = load_recipe(write(tmp_path, patch()))
    with pytest.raises(RecipeError) as e:
        r.require_data("calib")
    assert e.value.field == "task.data.calib" and "names none" in str(e.value) and e.value.fix
    d = patch()
    d["task"]["data"] = {"calib": "c.jsonl", "eval": "sub/e.jsonl"}
    r = load_recipe(write(tmp_path, d))
    with pytest.raises(RecipeError) as e:
        r.require_data("eval")
    assert e.value.field == "task.data.eval" and str(tmp_path / "sub" / "e.jsonl") in str(e.value)
    (tmp_path / "c.jsonl").write_text("{}\n")
    assert r.require_data("calib") == tmp_path / "c.jsonl"


def test_resolved_round_trip(tmp_path, monkeypatch):
    make_model_dir(tmp_path / "m", layers=16, image=336)
    monkeypatch.setenv("VPX_TEST_MODEL", "m")
    pts = [{"layer": 2, "keep_fraction": 0.5}, {"layer": 8, "keep": 72}]
    d = patch(model={"path": "${VPX_TEST_MODEL}"}, pruning={"method": "himap", "points": pts})
    r = load_recipe(write(tmp_path, d, "orig.yaml"))
    res = r.resolved()
    assert res["name"] == "orig"
    assert res["model"]["path"] == str((tmp_path / "m").resolve())
    assert res["pruning"]["points"][0] == {"layer": 2, "keep": 288, "keep_fraction": None}
    assert res["export"]["text_length"] == {"mode": "padded", "max": 64, "buckets": None} and "validate" in res
    out = save_resolved(r, tmp_path / "art")
    monkeypatch.delenv("VPX_TEST_MODEL")
    again = load_recipe(out)
    assert again.resolved() == res


# ----------------------------------------------------------------------------- the shipped recipes
SHIPPED = [
    ROOT / "recipes" / n
    for n in ("llava7b_vqa.yaml", "llava7b_caption.yaml", "llava13b_vqa.yaml",
              "baselines/llava7b_fastv_k3_r50.yaml", "baselines/llava7b_himap_qa.yaml")
]  # fmt: skip


def test_shipped_recipes_exist():
    assert all(p.is_file() for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_load_with_a_stand_in_model(tmp_path, monkeypatch, path):
    # a config-only stand-in with LLaVA-1.5's token count (576) and enough layers for every recipe
    stand_in = make_model_dir(tmp_path / "m", layers=32, image=336)
    for var in ("LLAVA7B_PATH", "LLAVA13B_PATH"):
        monkeypatch.setenv(var, str(stand_in))
    r = load_recipe(path)
    arch = r.resolve_arch()
    r.layout(arch)
    assert r.calibrating or r.schedule(arch) is not None


def test_llava7b_recipe_names_unset_variable(capsys, monkeypatch):
    monkeypatch.delenv("LLAVA7B_PATH", raising=False)
    line = cli_error(capsys, ROOT / "recipes" / "llava7b_vqa.yaml")
    assert line.startswith("error: model.path: environment variable LLAVA7B_PATH is not set")


def test_baseline_schedules():
    r = load_recipe(ROOT / "recipes/baselines/llava7b_fastv_k3_r50.yaml")
    assert [(p.layer, p.keep, p.rule) for p in r.schedule().points] == [(3, 288, "last_token_attention")]
    r = load_recipe(ROOT / "recipes/baselines/llava7b_himap_qa.yaml")
    assert [(p.layer, p.keep) for p in r.schedule().points] == [(2, 288), (8, 72)]
    assert r.name == "llava7b_himap_qa" and r.layout(r.resolve_arch()).prefix == 35


def test_no_torch_in_recipe_package():
    src = "\n".join(p.read_text() for p in (ROOT / "vpexport" / "recipe").glob("*.py"))
    src += "\n".join(p.read_text() for p in (ROOT / "vpexport" / "accounting").glob("*.py"))
    assert "import torch" not in src and "from torch" not in src

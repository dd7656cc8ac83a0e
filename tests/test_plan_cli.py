"""`vpexport plan`: JSON keys and values, human table, calibrate/auto recipes, no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vpexport.accounting import kv_cache_bytes, paper_flops, prefill_flops
from vpexport.cli import main
from vpexport.methods import METHODS
from vpexport.recipe import auto_candidates, load_recipe, methods_markdown, rules_markdown

ROOT = Path(__file__).resolve().parents[1]
HIMAP = ROOT / "recipes" / "baselines" / "llava7b_himap_qa.yaml"
FASTV = ROOT / "recipes" / "baselines" / "llava7b_fastv_k3_r50.yaml"


def run_plan(capsys, *args) -> tuple[int, str, str]:
    code = 0
    try:
        main(["plan", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *args) -> dict:
    code, out, err = run_plan(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_plan_json_keys_and_values(capsys):
    p = plan_json(capsys, HIMAP)
    for key in ("segments", "flops", "paper_flops", "kv_cache", "arch", "layout", "schedule"):
        assert key in p
    for key in ("dense", "pruned", "ratio", "with_vision"):
        assert key in p["flops"]
    assert "ratio" in p["paper_flops"]
    assert p["kv_cache"]["dense_bytes"] > p["kv_cache"]["pruned_bytes"] > 0
    r = load_recipe(HIMAP)
    arch = r.resolve_arch()
    sched, lay = r.schedule(arch), r.layout(arch)
    assert p["flops"]["dense"] == prefill_flops(arch, sched, lay)["dense"]
    assert p["flops"]["pruned"] == prefill_flops(arch, sched, lay)["pruned"]
    assert p["paper_flops"]["ratio"] == pytest.approx(paper_flops(arch, sched)["ratio"])
    assert p["kv_cache"]["dense_bytes"] == kv_cache_bytes(arch, sched, lay, "float32")["dense_bytes"]
    assert p["arch"]["text"]["layers"] == 32 and p["arch"]["visual_tokens"] == 576
    assert (p["layout"]["prefix"], p["layout"]["visual"], p["layout"]["text"]) == (35, 576, 40)
    assert [(q["layer"], q["keep"]) for q in p["schedule"]["points"]] == [(2, 288), (8, 72)]


def test_plan_segments_and_static_shapes(capsys):
    p = plan_json(capsys, HIMAP)
    segs = p["segments"]
    assert [s["layers"] for s in segs] == [[0, 2], [2, 8], [8, 32]]
    assert [s["visual_tokens"] for s in segs] == [576, 288, 72]
    assert [s["seq_len"] for s in segs] == [651, 363, 147]
    # padded mode: text padded to export.text_length.max (64)
    assert [s["hidden_shape"] for s in segs] == [[1, 675, 4096], [1, 387, 4096], [1, 171, 4096]]
    assert segs[0]["prune_after"] == {"layer": 2, "keep": 288, "rule": "text_attention"}
    assert segs[-1]["prune_after"] is None
    assert p["kv_cache"]["kv_len_per_layer"] == [651] * 2 + [363] * 6 + [147] * 24


def test_plan_batch_option(capsys):
    p1, p4 = plan_json(capsys, FASTV), plan_json(capsys, FASTV, "--batch", "4")
    assert p4["flops"]["dense"] == 4 * p1["flops"]["dense"]
    assert p4["kv_cache"]["pruned_bytes"] == 4 * p1["kv_cache"]["pruned_bytes"]
    assert p4["segments"][0]["hidden_shape"][0] == 4
    assert p4["paper_flops"]["ratio"] == p1["paper_flops"]["ratio"]
    code, out, err = run_plan(capsys, FASTV, "--batch", "0")
    assert code == 2 and "--batch" in err


def test_plan_human_output(capsys):
    code, out, err = run_plan(capsys, FASTV)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[-1].startswith("next: vpexport ")
    assert any(line.startswith("segment") and "hidden states" in line for line in lines)
    assert any(line.startswith("paper convention") and line.rstrip().endswith("0.540") for line in lines)
    assert "[1, 675, 4096]" in out and "prune @3 -> 288 (last_token_attention)" in out


def _calib_recipe(tmp_path, method) -> Path:
    d = {
        "model": {"arch": "llava-1.5-7b"},
        "task": {"type": "caption", "prompt": "USER: <image>\n{question} ASSISTANT:"},
        "pruning": {"method": method, "calibrate": {"tolerance": 0.02}},
    }
    p = tmp_path / f"{method}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_plan_calibrate_shows_published_default(tmp_path, capsys):
    p = plan_json(capsys, _calib_recipe(tmp_path, "himap"))
    default = METHODS["himap"].default(32, 576, "caption")
    assert [(q["layer"], q["keep"]) for q in p["schedule"]["points"]] == [(q.layer, q.keep) for q in default.points]
    assert [(q["layer"], q["keep"]) for q in p["schedule"]["points"]] == [(2, 288), (15, 72)]  # captioning K2=15
    assert "calibration will replace it" in p["schedule"]["origin"]
    assert p["calibration"]["tolerance"] == 0.02
    code, out, _ = run_plan(capsys, _calib_recipe(tmp_path, "himap"))
    assert code == 0 and "calibration will replace it" in out


def test_plan_auto_lists_candidates(tmp_path, capsys):
    p = plan_json(capsys, _calib_recipe(tmp_path, "auto"))
    assert [c["method"] for c in p["calibration"]["candidates"]] == auto_candidates() == ["fastv", "himap", "visipruner", "dart", "dart_projector", "divprune", "divprune_exit", "cdpruner"]
    code, out, _ = run_plan(capsys, _calib_recipe(tmp_path, "auto"))
    assert "calibration will try fastv, himap, visipruner" in out


def test_plan_bad_recipe_is_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(HIMAP.read_text().replace("points:", "pionts:"))
    code, out, err = run_plan(capsys, p)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: pruning.pionts: unknown key (fix: did you mean 'points'?)"]


def test_plan_subprocess_without_torch(tmp_path):
    """The real `python -m vpexport plan` path: exit codes, and neither torch nor transformers imported."""
    code = (
        "import sys\n"
        "from vpexport.cli import main\n"
        "try:\n"
        f"    main(['plan', {str(HIMAP)!r}, '--json'])\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "    sys.stderr.write('IMPORTED=' + ','.join(bad) + '\\n')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED=\n" in r.stderr
    assert json.loads(r.stdout)["paper_flops"]["ratio"] == pytest.approx(0.2462, abs=1e-4)
    env = {k: v for k, v in os.environ.items() if k != "LLAVA7B_PATH"}
    r = subprocess.run(
        [sys.executable, "-m", "vpexport", "plan", str(ROOT / "recipes" / "llava7b_vqa.yaml")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: model.path: environment variable LLAVA7B_PATH is not set "
        "(fix: export LLAVA7B_PATH=... or write ${LLAVA7B_PATH:-default} / a literal value in the recipe)"
    ]


# ----------------------------------------------------------------------------- docs stay in sync
def test_docs_method_table_matches_methods():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert methods_markdown() in doc, "regenerate: python -c 'from vpexport.recipe import methods_markdown; print(methods_markdown())'"
    assert rules_markdown() in doc, "regenerate: python -c 'from vpexport.recipe import rules_markdown; print(rules_markdown())'"
    for name in METHODS:
        assert f"`{name}`" in doc


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("```")[1].split("\n")[1:]  # drop the fence's language tag
    cmds = [line for line in block if line.strip() and not line.lstrip().startswith("#")]
    assert len(cmds) == 2
    test_cmd = cmds[1].strip()
    assert test_cmd.endswith("python -m pytest -q")
    skip = ("#", "set ", "cd ")
    ci_cmds = [line for line in ci.splitlines() if line.strip() and not line.startswith(skip)]
    assert ci_cmds == [test_cmd]
    assert "set -euo pipefail" in ci


def test_plan_dynamic_text_shapes(tmp_path, capsys):
    d = yaml.safe_load(FASTV.read_text())
    d["export"] = {"text_length": {"mode": "dynamic", "max": 128}}
    p = tmp_path / "dyn.yaml"
    p.write_text(yaml.safe_dump(d))
    segs = plan_json(capsys, p)["segments"]
    assert [s["hidden_shape"] for s in segs] == [[1, "611+T", 4096], [1, "323+T", 4096]]


@pytest.mark.parametrize(
    "argv,option",
    [
        (["bench", ".", "--reps", "0"], "--reps"),
        (["bench", ".", "--decode-steps", "-1"], "--decode-steps"),
        (["bench", ".", "--threads", "0"], "--threads"),
        (["eval", str(HIMAP), "--limit", "0"], "--limit"),
        (["validate", ".", "--samples", "-3"], "--samples"),
        (["package", ".", "--max-batch-size", "0"], "--max-batch-size"),
    ],
)
def test_counts_out_of_range_exit_2_before_any_work(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert f"Invalid value for '{option}'" in err and "is not in the range" in err and out == ""


def test_calibrate_help_lists_the_methods_auto_searches():
    from click.testing import CliRunner

    from vpexport.commands.calibrate import calibrate

    out = " ".join(CliRunner().invoke(calibrate, ["--help"]).output.split())
    assert "(method auto: " + ", ".join(auto_candidates()) + ")" in out


def test_plan_shows_the_calibrated_schedule_of_a_recipe_and_of_its_artifact_folder(capsys, tmp_path):
    """Once calibration wrote schedule.json, `plan RECIPE` and `plan ARTIFACT_DIR` show that schedule
    (what eval / export / run use), saying where it came from; its FLOPs are that schedule's."""
    from vpexport.recipe import save_resolved

    raw = yaml.safe_load((ROOT / "recipes" / "mini_vqa.yaml").read_text())
    raw["model"]["path"] = str(ROOT / "vpexport" / "testbed" / "checkpoints" / "mini-llava")
    raw["task"]["data"] = {k: str(ROOT / "data" / "mini" / "vqa" / f"{k}.jsonl") for k in ("calib", "eval")}
    recipe_path = tmp_path / "mini_vqa.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    if not Path(raw["model"]["path"], "config.json").is_file():
        pytest.skip("the trained mini checkpoint is not in this checkout")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the recipe's artifact folder is artifacts/<name> under the working directory
    try:
        before = plan_json(capsys, recipe_path)
        assert before["schedule"]["origin"].startswith("published default")
        art = tmp_path / "artifacts" / "mini_vqa"
        art.mkdir(parents=True)
        chosen = METHODS["divprune"].schedule([(0, 20)])
        (art / "schedule.json").write_text(json.dumps({"schedule": chosen.to_dict()}))
        r = load_recipe(recipe_path)
        save_resolved(r, art)
        for source in (recipe_path, art):
            p = plan_json(capsys, source)
            assert p["schedule"]["method"] == "divprune" and [q["keep"] for q in p["schedule"]["points"]] == [20]
            assert p["schedule"]["origin"].startswith("calibrated: ") and "schedule.json" in p["schedule"]["origin"]
            arch = r.resolve_arch()
            assert p["flops"]["ratio"] == prefill_flops(arch, chosen, r.layout(arch))["ratio"]
            code, out, _ = run_plan(capsys, source)
            assert code == 0 and "schedule divprune: layer 0 keep 20 (diversity)  [calibrated: " in out
    finally:
        os.chdir(cwd)
    code, _, err = run_plan(capsys, tmp_path)  # a folder that is not an artifact folder
    assert code == 2 and "recipe.resolved.yaml" in err and "Traceback" not in err


def test_plan_and_eval_report_one_flops_ratio_at_one_named_layout(capsys, tmp_path):
    """plan and eval give the same exact prefill FLOPs ratio, at the same prompt layout, named in both."""
    from click.testing import CliRunner

    from vpexport.cli import cli

    raw = yaml.safe_load((ROOT / "recipes" / "mini_vqa.yaml").read_text())
    raw["model"]["path"] = str(ROOT / "vpexport" / "testbed" / "checkpoints" / "mini-llava")
    if not Path(raw["model"]["path"], "config.json").is_file():
        pytest.skip("the trained mini checkpoint is not in this checkout")
    raw["task"]["data"] = {k: str(ROOT / "data" / "mini" / "vqa" / f"{k}.jsonl") for k in ("calib", "eval")}
    raw["pruning"] = {"method": "divprune", "points": [{"layer": 0, "keep": 20}]}
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    p = plan_json(capsys, recipe_path)
    r = CliRunner().invoke(cli, ["eval", str(recipe_path), "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    e = json.loads(r.output[r.output.index("{"):])
    assert e["flops"]["ratio"] == p["flops"]["ratio"] and e["flops"]["tokens"] == p["flops"]["tokens"]
    t = p["flops"]["tokens"]
    text = CliRunner().invoke(cli, ["eval", str(recipe_path), "--limit", "2"]).output
    assert f"exact prefill FLOPs ratio: {p['flops']['ratio']:.3f} (prompt {t['prefix']}+{t['visual']}+{t['text']} tokens)" in text

"""calibrate: the search logic (lowest FLOPs within tolerance, determinism), the eval split never
seen by the search (data-loading spy), and failure modes through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpexport.calibrate.runner import RunResult
from vpexport.calibrate.search import Search, geometric
from vpexport.pruning.schedule import Schedule

PROMPT = "SYSTEM: read the digits. USER: <image>\\n{question} ASSISTANT:"


def write_recipe(root: Path, model: Path, data: Path, tolerance: float = 0.05, max_samples: int = 6, name="mini_t") -> Path:
    r = root / f"{name}.yaml"
    r.write_text(
        f"name: {name}\nmodel: {{path: {model}}}\n"
        f"task:\n  type: vqa\n  data: {{calib: {data}/vqa/calib.jsonl, eval: {data}/vqa/eval.jsonl}}\n"
        f'  prompt: "{PROMPT}"\n  max_new_tokens: 3\n'
        f"pruning:\n  method: auto\n  calibrate: {{tolerance: {tolerance}, max_samples: {max_samples}}}\n"
        "export:\n  text_length: {max: 24}\n"
    )
    return r


@pytest.fixture(scope="session")
def mini_setup(tmp_path_factory):
    """An untrained mini LLaVA (8 layers, 144 visual tokens) and 6 + 6 digit-grid samples."""
    from vpexport.testbed.data import generate
    from vpexport.testbed.model import PROMPT_TEMPLATE, build_mini, save_checkpoint

    root = tmp_path_factory.mktemp("mini")
    m, _, p = build_mini(0)
    save_checkpoint(root / "model", m, p, {"template": PROMPT_TEMPLATE})
    generate(root / "data", n_calib=6, n_eval=6)
    return root


@pytest.fixture
def mini_recipe(mini_setup, tmp_path):
    return write_recipe(tmp_path, mini_setup / "model", mini_setup / "data")


def cli(argv):
    from vpexport.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code or 0
    return 0


# ---------------------------------------------------------------------------- search logic (fake runner)
class FakeRunner:
    """Accuracy is a deterministic function of the schedule: a sample is right iff the visual
    tokens kept by layer 4 exceed its threshold (so more tokens / later points are better)."""

    def __init__(self, n=20):
        self.samples = list(range(n))
        self.thresholds = [2 * i for i in range(n)]
        self.runs = []

    def _tokens(self, s: Schedule) -> int:
        return s.visual_per_layer(8, 144)[4] + (5 if s.points and s.points[0].layer >= 3 else 0)

    def dense(self):
        return RunResult([1.0] * len(self.samples), ["x"] * len(self.samples))

    def run(self, schedule, min_accuracy=None, **kw):
        self.runs.append(schedule)
        t = self._tokens(schedule)
        scores = [1.0 if t > th else 0.0 for th in self.thresholds]
        return RunResult(scores, ["x"] * len(scores))

    def drop_segments(self):
        pass


@pytest.fixture(scope="module")
def arch_layout():
    from vpexport.arch.layout import PromptLayout

    return _mini_arch(), PromptLayout(prefix=9, visual=144, text=7)


def _mini_arch():
    import json as _j
    import tempfile

    from vpexport.arch.spec import ArchSpec
    from vpexport.testbed.model import mini_config
    from vpexport.testbed.tokenizer import build_tokenizer

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(_j.dumps(mini_config(build_tokenizer()).to_dict()))
    return ArchSpec.from_dir(d)


def test_geometric_grid():
    assert geometric(144, 2) == [72, 36, 18, 9, 4, 2, 1]
    g = geometric(144, 2 ** 0.25)
    assert g[0] == 121 and g[-1] == 1 and g == sorted(set(g), reverse=True)


def test_search_picks_lowest_flops_within_tolerance(arch_layout):
    arch, layout = arch_layout
    fr = FakeRunner()
    tol = 0.1  # 2 of 20 samples may flip
    s = Search(fr, arch, layout, ["fastv", "himap"], tol, progress=False)
    best = s.run()
    assert best is not None and best.passed
    # brute force over every coarse and fine candidate of the same spaces: none cheaper passes
    s.dense_acc = 1.0
    pool = s.coarse() + s.fine(best)
    for c in pool:
        acc = sum(fr.run(c.schedule).scores) / 20
        if 1.0 - acc <= tol:
            assert c.flops >= best.flops - 1e-12, (c.schedule, best.schedule)
    # every candidate evaluated during the search is recorded, cheapest first, with its FLOPs
    cands = s.candidates()
    assert all("flops_ratio" in c and "calib_accuracy" in c for c in cands)
    assert [c["flops_ratio"] for c in cands] == sorted(c["flops_ratio"] for c in cands)


def test_search_is_deterministic(arch_layout):
    arch, layout = arch_layout
    out = []
    for _ in range(2):
        s = Search(FakeRunner(), arch, layout, ["fastv", "himap", "visipruner"], 0.1, seed=3, progress=False)
        b = s.run()
        out.append((b.schedule.to_dict(), s.candidates()))
    assert out[0] == out[1]


def test_search_fails_cleanly_when_nothing_passes(arch_layout):
    arch, layout = arch_layout

    class Hopeless(FakeRunner):
        def run(self, schedule, min_accuracy=None, **kw):
            return RunResult([0.0] * len(self.samples), ["x"] * len(self.samples))

    assert Search(Hopeless(), arch, layout, ["fastv"], 0.0, progress=False).run() is None


# ---------------------------------------------------------------------------- real model: eval split isolation
def test_eval_split_never_touched_by_search(mini_recipe, monkeypatch, tmp_path):
    import vpexport.calibrate.search as S
    import vpexport.data as data_mod
    import vpexport.runtime.preprocess as loading  # the one image reader every path uses

    events = []
    real_load, real_img, real_run = data_mod.load_samples, loading.load_image, S.Search.run

    def spy_load(path, *a, **k):
        events.append(("samples", Path(path).name))
        return real_load(path, *a, **k)

    def spy_img(path, *a, **k):
        events.append(("image", Path(path).parent.name))
        return real_img(path, *a, **k)

    def spy_run(self):
        events.append(("search", "start"))
        r = real_run(self)
        events.append(("search", "end"))
        return r

    monkeypatch.setattr(data_mod, "load_samples", spy_load)
    monkeypatch.setattr(loading, "load_image", spy_img)
    monkeypatch.setattr(S.Search, "run", spy_run)
    out = tmp_path / "art"
    assert cli(["calibrate", str(mini_recipe), "--out", str(out), "--json"]) == 0
    end = events.index(("search", "end"))
    assert ("samples", "eval.jsonl") not in events[:end]
    assert ("image", "eval") not in events[:end]
    assert any(e[0] == "image" for e in events[:end]), "the spy saw no image: it watches the wrong reader"
    assert ("samples", "eval.jsonl") in events[end:]
    r = json.loads((out / "schedule.json").read_text())
    assert {"schedule", "flops", "eval", "calibration", "candidates", "published"} <= set(r)
    assert {"accuracy", "unpruned_accuracy", "accuracy_drop", "samples"} <= set(r["eval"])
    assert {p["method"] for p in r["published"]} >= {"fastv", "himap", "visipruner"}
    assert all("calib" in p and "eval" in p and "flops" in p for p in r["published"])
    Schedule.from_dict(r["schedule"]).check(8, 144)
    assert (out / "calibration.md").is_file() and (out / "analysis" / "analysis.json").is_file()


# ---------------------------------------------------------------------------- failure modes through the CLI
def test_empty_data_is_a_one_line_error(mini_setup, tmp_path, capsys):
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "calib.jsonl").write_text("\n")
    (tmp_path / "vqa" / "eval.jsonl").write_text("\n")
    r = write_recipe(tmp_path, mini_setup / "model", tmp_path)
    assert cli(["calibrate", str(r), "--out", str(tmp_path / "a")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "no samples" in err[0]
    assert cli(["analyze", str(r), "--out", str(tmp_path / "a")]) == 2


def test_unreadable_image_is_a_one_line_error(mini_setup, tmp_path, capsys):
    (tmp_path / "vqa").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    line = json.dumps({"image": str(bad), "question": "is there a 7 ?", "answer": "no"})
    for split in ("calib", "eval"):
        (tmp_path / "vqa" / f"{split}.jsonl").write_text(line + "\n")
    r = write_recipe(tmp_path, mini_setup / "model", tmp_path)
    assert cli(["calibrate", str(r), "--out", str(tmp_path / "a")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "not a readable image" in err[0]


def test_impossible_tolerance_exits_6_with_rejected_file(mini_recipe, tmp_path, monkeypatch, capsys):
    from vpexport.calibrate import runner as R

    real = R.Runner.run

    def pruned_always_wrong(self, schedule, min_accuracy=None, keep_logits=False, pl=None, stop=None):
        res = real(self, schedule, min_accuracy, keep_logits, pl)
        if schedule.points or (pl is not None and pl.points):
            res.scores = [0.0] * len(res.scores)
        else:
            res.scores = [1.0] * len(res.scores)
        return res

    monkeypatch.setattr(R.Runner, "run", pruned_always_wrong)
    out = tmp_path / "art"
    assert cli(["calibrate", str(mini_recipe), "--out", str(out)]) == 6
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "tolerance" in err[0]
    assert not (out / "schedule.json").exists()
    rej = json.loads((out / "schedule.rejected.json").read_text())
    assert rej["best_candidates"] and all(c["within_tolerance"] is False for c in rej["best_candidates"])


def test_dominated_candidates_are_skipped_and_paired_rejection():
    """A schedule at least as aggressive as a failed one (same method/sink) is not evaluated; the
    paired sequential test rejects a clearly worse candidate but never a matching one."""
    from vpexport.families import BUILTIN_ARCHS
    from vpexport.arch.layout import PromptLayout
    from vpexport.calibrate.search import REJECT_MIN_SAMPLES, Search

    arch = BUILTIN_ARCHS["llava-1.5-7b"].spec()

    class NoRunner:
        samples = list(range(64))

        def run(self, *a, **k):
            raise AssertionError("a dominated candidate must not be evaluated")

    s = Search(NoRunner(), arch, PromptLayout(35, 576, 40), ["himap"], tolerance=0.01, progress=False)
    failed = s.make("himap", [(3, 288), (9, 72)])
    failed.passed = False
    s.failed.append(failed)
    harsher = s.make("himap", [(2, 144), (9, 72)])
    assert s.evaluate(harsher).passed is False and "skipped" in harsher.stage
    milder = s.make("himap", [(3, 288), (10, 72)])  # later second point: not dominated
    assert s.dominated_by_failure(milder) is None
    other_method = s.make("fastv", [(2, 72)])
    assert s.dominated_by_failure(other_method) is None

    s.tol = 0.01
    s.dense_scores = [1.0] * 64
    assert s._reject([0.0] * REJECT_MIN_SAMPLES)  # every sample lost
    assert not s._reject([1.0] * REJECT_MIN_SAMPLES)  # identical to dense
    assert not s._reject([0.0] * (REJECT_MIN_SAMPLES - 1))  # too few samples to judge


class BatchedFakeRunner(FakeRunner):
    """FakeRunner with the real runner's stopping protocol (batches of 5, `min_accuracy`, `stop`) and
    first-token logits whose distance from the dense model's grows as tokens are dropped."""

    def _logits(self, t: int, n: int):
        import torch

        return torch.stack([torch.tensor([0.0, 1.0 + 0.01 * min(t, 144) + 0.001 * i]) for i in range(n)])

    def dense(self):
        r = super().dense()
        r.first_logits = [self._logits(10**6, len(self.samples))]
        return r

    def run(self, schedule, min_accuracy=None, keep_logits=False, pl=None, stop=None, share=False):
        self.runs.append(schedule)
        t = self._tokens(schedule)
        res = RunResult([], [])
        n = len(self.samples)
        for b in range(0, n, 5):
            chunk = self.thresholds[b : b + 5]
            res.scores += [1.0 if t > th else 0.0 for th in chunk]
            res.preds += ["x"] * len(chunk)
            res.first_logits.append(self._logits(t, len(chunk)))
            left = n - len(res.scores)
            if left and ((min_accuracy is not None and (sum(res.scores) + left) / n < min_accuracy - 1e-9)
                         or (stop is not None and stop(res))):
                res.complete = False
                break
        return res


def _brute_force(runner, pool, budget):
    """(accuracy, kl) of the best candidate by full evaluation: max accuracy, then min KL."""
    import torch

    from vpexport.calibrate.runner import first_token_kl

    dense = torch.cat(runner.dense().first_logits)
    best = None
    for c in pool:
        if c.flops > budget + 1e-12:
            continue
        r = BatchedFakeRunner.run(runner, c.schedule)
        acc = sum(r.scores) / len(r.scores)
        kl = sum(first_token_kl(dense, torch.cat(r.first_logits))) / len(r.scores)
        if best is None or acc > best[0] + 1e-9 or (acc > best[0] - 1e-9 and kl < best[1]):
            best = (acc, kl)
    return best


@pytest.mark.parametrize("budget", [0.25, 0.4, 0.6])
def test_budget_search_is_the_most_accurate_within_budget(arch_layout, budget):
    """flops_budget objective: the winner fits the budget and equals a brute-force full evaluation of
    the same candidate pool (max accuracy, ties to the smallest first-token KL), so stopping losers
    early never drops the winner."""
    arch, layout = arch_layout
    fr = BatchedFakeRunner()
    s = Search(fr, arch, layout, ["fastv", "himap", "visipruner"], None, progress=False)
    best = s.run_budget(budget)
    assert best is not None and best.complete and best.flops <= budget + 1e-12
    assert best.passed is None  # no tolerance: nothing to pass
    pool = s.coarse() + s.fine(best)
    assert (best.accuracy, best.kl) == pytest.approx(_brute_force(fr, pool, budget))
    stopped = [c for c in s.tried.values() if not c.complete]
    assert stopped, "losers should be stopped before the last batch"
    assert all(c.samples < len(fr.samples) for c in stopped)


def test_budget_search_ties_go_to_the_least_disturbed_model(arch_layout):
    """Every candidate is perfect on this runner: the one whose first token stays closest to dense wins,
    not the cheapest."""
    arch, layout = arch_layout

    class AllRight(BatchedFakeRunner):
        def __init__(self):
            super().__init__()
            self.thresholds = [-1] * len(self.samples)

    s = Search(AllRight(), arch, layout, ["fastv"], None, progress=False)
    best = s.run_budget(0.5)
    complete = [c for c in s.tried.values() if c.complete]
    assert best.kl == min(c.kl for c in complete)
    assert best.flops > min(c.flops for c in complete)


def test_budget_search_runs_a_shared_first_point_together(arch_layout):
    """Candidates with two or more points and the same first point are scored one after another
    with `share` (the runner keeps only the latest first segment); the others without it. The
    result is the one of the brute-force order (order changes the time, not the winner)."""
    from vpexport.calibrate.runner import first_segment

    arch, layout = arch_layout

    class Recording(BatchedFakeRunner):
        def __init__(self):
            super().__init__()
            self.shared = []

        def run(self, schedule, *a, share=False, **k):
            self.shared.append(share)
            return super().run(schedule, *a, **k)

    fr = Recording()
    s = Search(fr, arch, layout, ["himap", "visipruner"], None, progress=False)
    s.prepare()
    best = s.maximize(s.coarse(), 0.6, None, "test")
    firsts = [first_segment(x) for x in fr.runs]
    groups = [g for g in firsts if g is not None]
    assert len(set(groups)) < len(groups), "the grid should have shared first points"
    seen, prev = set(), None
    for g, shared in zip(firsts, fr.shared):
        if g is not None and g != prev:
            assert g not in seen, f"first point {g} scored in two runs apart"
            seen.add(g)
        assert shared == (g is not None and groups.count(g) > 1)
        prev = g
    assert (best.accuracy, best.kl) == pytest.approx(_brute_force(fr, s.coarse(), 0.6))


def test_budget_search_reuses_full_results_only(arch_layout):
    """A candidate stopped against one budget's best is run again for a smaller budget (where that best
    is out of reach); complete results are reused."""
    arch, layout = arch_layout
    fr = BatchedFakeRunner()
    s = Search(fr, arch, layout, ["fastv"], None, progress=False)
    hi = s.run_budget(0.6)
    n_hi = len(fr.runs)
    lo = s.run_budget(0.3)
    assert lo.flops <= 0.3 + 1e-12 and hi.flops <= 0.6 + 1e-12
    assert lo.accuracy <= hi.accuracy
    rerun = fr.runs[n_hi:]
    assert hi.schedule not in rerun
    assert (lo.accuracy, lo.kl) == pytest.approx(_brute_force(fr, s.coarse() + s.fine(lo), 0.3))


def test_flops_budget_through_the_cli(mini_recipe, tmp_path, capsys):
    """calibrate with flops_budget: the schedule fits it and the objective is recorded; a budget below
    every candidate is a one-line exit-6 error naming the field, with no schedule.json."""
    text = mini_recipe.read_text().replace("calibrate: {tolerance: 0.05,", "calibrate: {flops_budget: 0.4,")
    rb = tmp_path / "budget.yaml"
    rb.write_text(text)
    out = tmp_path / "art"
    assert cli(["calibrate", str(rb), "--out", str(out), "--json"]) == 0
    r = json.loads((out / "schedule.json").read_text())
    assert r["flops"]["ratio"] <= 0.4 + 1e-12
    assert r["calibration"]["objective"] == "max_accuracy" and r["calibration"]["flops_budget"] == 0.4
    assert r["calibration"]["tolerance"] is None
    assert "highest calibration" in (out / "calibration.md").read_text()
    # every searched method's own best within the budget, on the eval split; the chosen is its method's row
    from vpexport.methods import auto_candidates

    rows = r["per_method"]
    assert list(rows) == auto_candidates() and {"dart", "divprune"} <= set(rows)
    for m, row in rows.items():
        assert row["schedule"]["method"] == m and row["flops"]["ratio"] <= 0.4 + 1e-12
        assert row["eval"]["samples"] == r["eval"]["samples"]
        assert r["calibration"]["accuracy"] >= row["calib"]["accuracy"] - 1e-9  # the chosen is the most accurate
        f = row["eval"]["chosen_vs_this"]
        assert f["higher"] + f["lower"] <= row["eval"]["samples"]
    assert rows[r["schedule"]["method"]]["schedule"] == r["schedule"]
    assert "## Every method at flops_budget 0.4" in (out / "calibration.md").read_text()



def test_equal_flops_rows_on_the_trained_checkpoint(mini_setup, tmp_path):
    """Where the chosen schedule does not dominate a default, the report gets the budget search at that
    default's FLOPs: it fits the budget, it is measured on eval, and the per-sample differences add up."""
    ckpt = Path(__file__).resolve().parents[1] / "vpexport" / "testbed" / "checkpoints" / "mini-llava"
    # tolerance 1: the cheapest fastv schedule passes, and is far less accurate than FastV's default
    r = write_recipe(tmp_path, ckpt, mini_setup / "data", tolerance=1.0)
    r.write_text(r.read_text().replace("method: auto", "method: fastv"))
    out = tmp_path / "art"
    assert cli(["calibrate", str(r), "--out", str(out), "--json"]) == 0
    res = json.loads((out / "schedule.json").read_text())
    pub = {p["method"]: p for p in res["published"]}
    assert res["eval"]["accuracy"] < pub["fastv"]["eval"]["accuracy"]
    rows = {m["against"]: m for m in res["matched"]}
    assert "fastv" in rows
    for against, m in rows.items():
        assert m["schedule"]["method"] == "fastv" and m["flops"]["ratio"] <= pub[against]["flops"]["ratio"] + 1e-12
        d = m["eval"]["vs_default"]
        n = res["eval"]["samples"]
        assert d["higher"] + d["lower"] <= n and 0 < d["sign_test_p"] <= 1
        # the accuracy difference is made of those per-sample differences (exact match: one sample each)
        assert (m["eval"]["accuracy"] - pub[against]["eval"]["accuracy"]) * n == pytest.approx(d["higher"] - d["lower"])
    assert "at fastv's FLOPs: calibration with flops_budget" in (out / "calibration.md").read_text()


def test_compare_false_skips_the_equal_flops_searches(mini_recipe, tmp_path, monkeypatch):
    """`compare: false`: no budget search after the main one, `matched` empty, the report says so."""
    import vpexport.calibrate.search as S

    rb = tmp_path / "nocompare.yaml"
    rb.write_text(mini_recipe.read_text().replace("calibrate: {tolerance: 0.05,", "calibrate: {compare: false, tolerance: 0.05,"))
    monkeypatch.setattr(S.Search, "run_budget", lambda self, b: (_ for _ in ()).throw(AssertionError("budget search ran")))
    out = tmp_path / "art"
    assert cli(["calibrate", str(rb), "--out", str(out), "--json"]) == 0
    r = json.loads((out / "schedule.json").read_text())
    assert r["matched"] == [] and r["calibration"]["compare"] is False
    assert "equal-FLOPs searches skipped" in (out / "calibration.md").read_text()


def test_unreachable_flops_budget_fails_before_any_weights_load(mini_recipe, tmp_path, capsys, monkeypatch):
    """A budget below the cheapest schedule the search could try is a recipe error (exit 2), found by
    `plan` and `calibrate` from the FLOPs accounting alone: no weights, no data, nothing written."""
    import vpexport.model.pipeline as pipeline

    def no_weights(*a, **k):
        raise AssertionError("weights loaded for a recipe that cannot be calibrated")

    monkeypatch.setattr(pipeline.TorchPipeline, "from_recipe", no_weights)
    rb = tmp_path / "budget.yaml"
    rb.write_text(mini_recipe.read_text().replace("calibrate: {tolerance: 0.05,", "calibrate: {flops_budget: 0.01,"))
    out = tmp_path / "art"
    for argv in (["plan", str(rb)], ["calibrate", str(rb), "--out", str(out)]):
        capsys.readouterr()
        assert cli(argv) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and err[0].startswith("error: pruning.calibrate.flops_budget: no fastv/himap/visipruner")
        assert "the cheapest is 0." in err[0] and "set it to at least 0." in err[0]
    assert not out.exists()


def test_budget_with_tolerance_fails_when_the_best_drops_too_much(arch_layout):
    """flops_budget + tolerance: the most accurate schedule in the budget must also stay within the
    tolerance, else calibration fails naming the budget (not a silently loose schedule)."""
    from vpexport.calibrate.search import _failure
    from vpexport.recipe.schema import CalibrateSection

    arch, layout = arch_layout
    fr = BatchedFakeRunner()
    s = Search(fr, arch, layout, ["fastv"], 0.05, progress=False)
    best = s.run_budget(0.25)
    assert best.drop > 0.05
    cfg = CalibrateSection(flops_budget=0.25, tolerance=0.05)
    msg, field, fix = _failure(s, best, cfg, ["fastv"])
    assert field == "pruning.calibrate.flops_budget" and "tolerance 0.05" in msg and "raise" in fix
    assert _failure(s, best, CalibrateSection(flops_budget=0.25), ["fastv"]) is None


def test_paired_flips_and_sign_test():
    from vpexport.calibrate.search import paired, sign_test

    assert paired([1, 1, 0, 0.5], [0, 1, 1, 0.25]) == {"higher": 2, "lower": 1, "sign_test_p": 1.0}
    assert sign_test(0, 5) == pytest.approx(0.0625)  # 2 * 0.5**5
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)


# ---------------------------------------------------------------------------- the runner's resumed prefill
RESUME_CASES = [
    ("fastv", [(2, 36)], 0),
    ("himap", [(1, 72), (4, 18)], 0),
    ("himap", [(1, 72), (6, 10)], 0),  # the same first point: its recorded segment is reused
    ("himap", [(3, 36), (4, 30), (6, 4)], 0),
    ("visipruner", [(2, 20), (6, 0)], 1),
    ("visipruner", [(1, 11), (7, 0)], 0),
    ("random", [(1, 36)], 0),
    ("dart", [(2, 40)], 0),  # scored per keep from the recorded keys and hidden states
    ("dart", [(3, 12)], 0),
    ("divprune", [(0, 30)], 0),  # before the decoder: nothing recorded to resume from
    ("divprune_exit", [(0, 30), (5, 0)], 0),
    ("divprune_exit", [(0, 30), (6, 0)], 0),  # the same first point at layer 0: its segment is reused
]


@pytest.mark.parametrize("share", [False, True])
def test_resumed_prefill_equals_prefill(mini_recipe, share):
    """runner.py's contract: a candidate resumed from the dense cache (and, with sharing, from the
    cached first segment of another candidate with the same first point) gives exactly the logits
    and KV cache of `PrunedModel.prefill` on the same schedule."""
    import torch

    from vpexport.calibrate.runner import Runner
    from vpexport.calibrate.search import _pipeline
    from vpexport.data import load_samples
    from vpexport.model.pruned import PrunedModel
    from vpexport.methods import METHODS
    from vpexport.recipe import load_recipe

    recipe = load_recipe(mini_recipe)
    pipe = _pipeline(recipe)
    rc = Runner(pipe, load_samples(recipe.require_data("calib")), "vqa", batch_size=4)
    assert len(rc.batches) == 2
    for method, points, sink in RESUME_CASES:
        s = METHODS[method].schedule(points, sink_layers=sink, seed=3)
        pl = PrunedModel(pipe.model, s, rc.p)
        for b, eb in enumerate(rc.batches):
            with torch.inference_mode():
                ref = pl.prefill(eb.ids, eb.mask, eb.feats)
            logits, kv = rc.prefill(b, s, share=share)
            assert torch.equal(logits, ref.logits), (method, points, b)
            assert len(kv) == len(ref.kv) == rc.L
            for (k, v), (rk, rv) in zip(kv, ref.kv):
                assert torch.equal(k, rk) and torch.equal(v, rv), (method, points, b)
    if share:
        a, b2 = (METHODS["himap"].schedule(pts, seed=3) for pts in ([(1, 72), (4, 18)], [(1, 72), (6, 10)]))
        seg = rc.segment_state(0, a)
        assert rc.segment_state(0, b2) is seg  # recorded once per first point
        rc.segment_state(0, METHODS["himap"].schedule([(2, 72), (4, 18)], seed=3))
        assert rc.segment_state(0, a) is not seg  # only the latest first point is kept


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schedule": {"points": []}}', '{"other": 1}'])
def test_unreadable_schedule_json_is_an_artifact_error(tmp_path, content):
    from vpexport.errors import ArtifactError
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mini_vqa.yaml")
    assert recipe.schedule() is None  # calibrated: the schedule comes from the artifact folder
    (tmp_path / "schedule.json").write_text(content)
    with pytest.raises(ArtifactError) as e:
        resolve_schedule(recipe, None, tmp_path)
    assert e.value.field == "schedule.json" and "not a readable calibrated schedule" in str(e.value) and e.value.fix

"""`vpexport calibrate`: find static prune layers and keep budgets on the calibration split.

Objective (`pruning.calibrate`): with `tolerance` (the default), the lowest exact prefill FLOPs
ratio whose calibration accuracy drop against the unpruned model stays within it; with
`flops_budget`, the highest calibration accuracy at a FLOPs ratio <= the budget (`Search.run_budget`,
ties to the smallest first-token KL to the dense model), which must also stay within `tolerance`
when one is given. The budget search also makes the report's equal-FLOPs rows: the calibrator given
each published default's FLOPs.

Tolerance search:

Search (deterministic for a seed):
1. Dense pass over the calibration samples (cached per batch: every layer's hidden state, KV
   cache and rule scores; see runner.py), dense answers cached; `analyze` runs on the same cache
   and seeds the grids: the fusion / exit layers (VisiPruner's points), the concentration
   counts (tokens holding 90% of the attention) and the large-contribution counts (keeps).
2. Coarse stage: every method's points over all valid layers, keeps on a geometric grid
   (factor 2, plus the analysis seeds). FLOPs need no model run, so candidates are sorted by
   FLOPs and evaluated cheapest first; a candidate is dropped as soon as its remaining samples
   can no longer bring it within tolerance; the first one within tolerance ends the stage
   (everything after it costs more).
3. Fine stage: around the coarse winner (its layers +-1, keeps on a 2^(1/4) grid between half
   and all of its keeps), again cheapest first, stopping at the first within tolerance.
   A winner must be confirmed: the next more generous keep in its branch must pass too
   (guards against passing by luck among many near-threshold candidates).
4. Only then is the eval split loaded: dense, the chosen schedule and every method's published
   default are measured on it (and the defaults on calibration too).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import CalibrationFailed, RecipeError
from vpexport.methods import METHODS, auto_candidates, baseline_methods
from vpexport.model.device import pass_batch
from vpexport.pruning.schedule import Schedule
from vpexport.recipe.schema import DEFAULT_TOLERANCE

# The published defaults the report compares at equal FLOPs (the calibrator re-run at their FLOPs).
COMPARED = tuple(n for n, m in METHODS.items() if m.compared_at_equal_flops)
# Baselines with prune points, whose published defaults the report measures too.
BASELINES = tuple(n for n in baseline_methods() if METHODS[n].rules)
COARSE = 2.0
FINE = 2 ** 0.25
# Paired sequential rejection: after each batch, a candidate whose mean per-sample drop against the
# dense model exceeds the tolerance by REJECT_Z standard errors is dropped (it only ever makes the
# search more conservative; the chosen schedule is still fully evaluated and confirmed).
REJECT_Z = 3.0
REJECT_MIN_SAMPLES = 32


def set_threads() -> None:
    """Intra-op threads (VPEXPORT_THREADS, default 1). On a shared 2-core machine with another job
    running, 2 OpenMP threads were measured 30-60x slower than 1 (spin-waiting); raise it on an idle host."""
    import torch

    torch.set_num_threads(int(os.environ.get("VPEXPORT_THREADS", "1")))


def geometric(hi: int, factor: float) -> list[int]:
    """Keep budgets hi/factor, hi/factor^2, ... down to 1 (rounded, unique, descending, < hi)."""
    out, x = [], float(hi)
    while True:
        x /= factor
        k = max(1, round(x))
        if k < hi and (not out or k < out[-1]):
            out.append(k)
        if k <= 1:
            return out


@dataclass
class Candidate:
    schedule: Schedule
    flops: float
    stage: str
    accuracy: float | None = None
    drop: float | None = None
    samples: int = 0
    complete: bool = False
    passed: bool | None = None
    kl: float | None = None  # mean first-answer-token KL(dense || candidate), flops-budget objective only

    @property
    def key(self):
        s = self.schedule
        return (s.method, tuple((p.layer, p.keep) for p in s.points), s.sink_layers)

    def to_dict(self) -> dict:
        s = self.schedule
        return {
            "method": s.method,
            "points": [{"layer": p.layer, "keep": p.keep, "rule": p.rule} for p in s.points],
            "sink_layers": s.sink_layers,
            "flops_ratio": self.flops,
            "stage": self.stage,
            "calib_accuracy": self.accuracy,
            "accuracy_drop": self.drop,
            "samples_evaluated": self.samples,
            "complete": self.complete,
            "within_tolerance": self.passed,
            "first_token_kl": self.kl,
        }


class Search:
    def __init__(self, runner, arch, layout, methods, tolerance: float, seed: int = 0, seeds: dict | None = None,
                 progress: bool = True):
        from vpexport.accounting import prefill_flops

        self.runner, self.arch, self.layout = runner, arch, layout
        self.methods = list(methods)
        self.tol, self.seed = tolerance, seed
        self.seeds = seeds or {}
        self.L, self.N = arch.text.layers, arch.visual_tokens
        self._flops = lambda s: prefill_flops(arch, s, layout)["ratio"]
        self.tried: dict[tuple, Candidate] = {}
        self.failed: list[Candidate] = []  # evaluated (or dominated) and not within tolerance
        self.progress = progress
        self.dense_acc = None

    # ------------------------------------------------------------------ candidates
    def make(self, method: str, points, sink: int = 0, stage: str = "coarse") -> Candidate | None:
        s = METHODS[method].schedule(list(points), sink_layers=sink, seed=self.seed, meta={"calibrated": True})
        try:
            s.check(self.L, self.N)
        except Exception:
            return None
        return Candidate(s, self._flops(s), stage)

    def _keeps(self, hi: int, factor: float, extra=()) -> list[int]:
        ks = set(geometric(hi, factor)) | {int(k) for k in extra if k and 1 <= int(k) < hi}
        return sorted(ks, reverse=True)

    def keeps(self, hi: int, extra=()) -> list[int]:
        """The coarse keep grid below `hi` (factor COARSE), plus `extra` (analysis seeds) in range."""
        return self._keeps(hi, COARSE, extra)

    def coarse(self) -> list[Candidate]:
        """Every searched method's own grid (`Method.coarse`)."""
        out = [self.make(m, points, sink) for m in self.methods for points, sink in METHODS[m].coarse(self)]
        return [c for c in out if c is not None]

    def fine(self, best: Candidate) -> list[Candidate]:
        s = best.schedule
        out = []
        layer_opts = []
        for p in s.points:
            layer_opts.append(sorted({l for l in (p.layer - 1, p.layer, p.layer + 1) if 0 <= l < self.L}))
        keep_opts = []
        prev = self.N
        for p in s.points:
            if p.rule == "drop_all":
                keep_opts.append([0])
                continue
            hi = min(prev, max(p.keep * 2, p.keep + 1))
            keep_opts.append([k for k in self._keeps(hi, FINE) + [hi] if k >= max(1, p.keep // 2)])
            prev = p.keep

        def rec(i, acc):
            if i == len(s.points):
                yield list(acc)
                return
            for l in layer_opts[i]:
                for k in keep_opts[i]:
                    yield from rec(i + 1, acc + [(l, k)])

        for pts in rec(0, []):
            c = self.make(s.method, pts, s.sink_layers, stage="fine")
            if c is not None:
                out.append(c)
        return out

    # ------------------------------------------------------------------ evaluation
    def _aggression(self, s: Schedule):
        """(group, vector): within a group, a schedule whose every coordinate is <= another's prunes
        earlier and keeps fewer tokens, so (monotonicity) it is at least as harmful."""
        keep_pts = [p for p in s.points if p.rule != "drop_all"]
        exit_layer = next((p.layer for p in s.points if p.rule == "drop_all"), self.L)
        vec = tuple(x for p in keep_pts for x in (p.layer, p.keep)) + (exit_layer,)
        return (s.method, s.sink_layers, len(keep_pts)), vec

    def dominated_by_failure(self, c: Candidate) -> Candidate | None:
        g, v = self._aggression(c.schedule)
        for f in self.failed:
            fg, fv = self._aggression(f.schedule)
            if fg == g and all(a <= b for a, b in zip(v, fv)):
                return f
        return None

    def _reject(self, scores: list[float]) -> bool:
        """Paired test against the dense model's per-sample scores on the same samples."""
        n = len(scores)
        if n < REJECT_MIN_SAMPLES:
            return False
        d = [a - b for a, b in zip(self.dense_scores[:n], scores)]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
        return mean - REJECT_Z * (var / n) ** 0.5 > self.tol

    def evaluate(self, c: Candidate) -> Candidate:
        if c.key in self.tried:
            return self.tried[c.key]
        from vpexport.calibrate.runner import accuracy, best_case

        f = self.dominated_by_failure(c)
        if f is not None:
            c.passed, c.complete, c.samples = False, False, 0
            c.stage += f" (skipped: at least as aggressive as failed {f.key[1]})"
            self.tried[c.key] = c
            self.failed.append(c)
            return c
        res = self.runner.run(c.schedule, min_accuracy=self.dense_acc - self.tol, stop=lambda r: self._reject(r.scores))
        c.samples, c.complete = len(res.scores), res.complete
        c.accuracy = accuracy(res.scores) if res.complete else None
        if res.complete:
            c.drop = self.dense_acc - c.accuracy
            c.passed = c.drop <= self.tol + 1e-9
        else:  # a lower bound on the drop
            c.drop = self.dense_acc - best_case(res.scores, len(self.runner.samples))
            c.passed = False
        if not c.passed:
            self.failed.append(c)
        self.tried[c.key] = c
        return c

    def neighbour(self, c: Candidate) -> Candidate | None:
        """The next more generous keep (fine grid) at the last non-drop point: the confirmation run."""
        s = c.schedule
        pts = [(p.layer, p.keep) for p in s.points]
        idx = max((i for i, p in enumerate(s.points) if p.rule != "drop_all"), default=None)
        if idx is None:
            return None
        cap = self.N if idx == 0 else pts[idx - 1][1]
        k = pts[idx][1]
        up = min(cap, max(k + 1, round(k * FINE)))
        if up == k:
            return None
        pts[idx] = (pts[idx][0], up)
        return self.make(s.method, pts, s.sink_layers, stage="confirm")

    def first_pass(self, cands: list[Candidate], bound: float | None, desc: str) -> Candidate | None:
        from vpexport.progress import progress

        cands = sorted({c.key: c for c in cands}.values(), key=lambda c: (c.flops, c.schedule.method, c.key))
        if bound is not None:
            cands = [c for c in cands if c.flops < bound]
        bar = progress(cands, desc=desc, unit="candidate", enabled=self.progress)
        for i, c in enumerate(bar):
            c = self.evaluate(c)
            if c.passed:
                nb = self.neighbour(c)
                if nb is not None and not self.evaluate(nb).passed:
                    c.passed = False
                    c.stage += " (unconfirmed)"
                    continue
                # Candidates run in increasing FLOPs: the first that passes is the answer, and
                # the rest need not run. Said, so the stop does not read as an abort.
                bar.update(1)  # this candidate is done too
                bar.close(f"candidate {i + 1}, in increasing FLOPs, is the first within the tolerance; "
                          "the rest need not run")
                return c
        bar.close(None if cands else "no candidate below the bound")
        return None

    def prepare(self) -> None:
        from vpexport.calibrate.runner import accuracy

        if self.dense_acc is None:
            dense = self.runner.dense()
            self.dense_acc = accuracy(dense.scores)
            self.dense_scores = dense.scores

    def run(self) -> Candidate | None:
        """Lowest FLOPs within the tolerance."""
        self.prepare()
        best = self.first_pass(self.coarse(), None, "calibrate coarse")
        if best is None:
            return None
        better = self.first_pass(self.fine(best), best.flops, "calibrate fine")
        return better or best

    # ------------------------------------------------------------------ flops-budget objective
    def score(self, c: Candidate, best: Candidate | None, share: bool = False) -> Candidate:
        """Run `c` in full (calibration accuracy and mean first-token KL to the dense model) unless it
        provably cannot beat `best`: stopped (complete False) once even a perfect remainder could not
        reach best's accuracy, or could only tie it while its KL so far already exceeds best's.
        Complete results are cached; a stopped one is not (it only lost against that `best`).
        `share`: resume from the runner's shared first segment (`Runner.segment_state`)."""
        import torch

        from vpexport.calibrate.runner import accuracy, best_case, first_token_kl

        old = self.tried.get(c.key)
        if old is not None and old.kl is not None:
            return old
        dense_logits = torch.cat(self.runner.dense().first_logits)
        total = len(self.runner.samples)

        def cannot_win(r) -> bool:
            n = len(r.scores)
            if best_case(r.scores, total) > best.accuracy + 1e-9:
                return False
            # KL only grows with more samples: already above best's, it can at most tie in accuracy and lose on KL
            return sum(first_token_kl(dense_logits[:n], torch.cat(r.first_logits))) / total > best.kl

        res = self.runner.run(c.schedule, min_accuracy=None if best is None else best.accuracy, keep_logits=True,
                              stop=None if best is None else cannot_win, share=share)
        c.samples, c.complete = len(res.scores), res.complete
        if not res.complete:
            c.accuracy, c.passed = None, False
            c.drop = self.dense_acc - best_case(res.scores, total)  # a lower bound on the drop
            self.tried.setdefault(c.key, c)
            return c
        c.accuracy = accuracy(res.scores)
        c.drop = self.dense_acc - c.accuracy
        c.passed = None if self.tol is None else c.drop <= self.tol + 1e-9
        kl = first_token_kl(dense_logits, torch.cat(res.first_logits))
        c.kl = sum(kl) / len(kl)
        self.tried[c.key] = c
        return c

    def maximize(self, cands: list[Candidate], budget: float, best: Candidate | None, desc: str) -> Candidate | None:
        """The most accurate candidate with FLOPs <= budget. Ties (common: accuracy moves in steps of one
        sample) go to the one whose first answer token stays closest to the dense model's (mean KL):
        the budget is the user's constraint, and within it the least disturbed model is the safer pick
        (and, should the KL tie too, the fewer FLOPs). Every candidate is considered (no monotonicity
        shortcut; `score` stops only provable losers), so the order changes the time, not the result:
        from the most FLOPs down, so a good bound comes early, with candidates that share a first
        point (and so their first segment) one after another."""
        from vpexport.calibrate.runner import first_segment
        from vpexport.progress import progress

        cands = [c for c in {c.key: c for c in cands}.values() if c.flops <= budget + 1e-12]
        group = {c.key: first_segment(c.schedule) or c.key for c in cands}
        size, top = {}, {}
        for c in cands:
            g = group[c.key]
            size[g] = size.get(g, 0) + 1
            top[g] = max(top.get(g, 0.0), c.flops)
        cands.sort(key=lambda c: (-top[group[c.key]], repr(group[c.key]), -c.flops, c.schedule.method, c.key))
        bar = progress(cands, desc=desc, unit="candidate", enabled=self.progress)
        for c in bar:
            c = self.score(c, best, share=size[group[c.key]] > 1)
            if c.complete and (best is None or _better(c, best)):
                best = c
        bar.close()
        self.runner.drop_segments()
        return best

    def run_budget(self, budget: float) -> Candidate | None:
        """Highest calibration accuracy at an exact prefill FLOPs ratio <= budget (coarse grid, then the
        fine grid around its winner)."""
        self.prepare()
        best = self.maximize(self.coarse(), budget, None, f"calibrate <= {budget:.3f} coarse")
        if best is None:
            return None
        return self.maximize(self.fine(best), budget, best, f"calibrate <= {budget:.3f} fine")

    def candidates(self) -> list[dict]:
        return [c.to_dict() for c in sorted(self.tried.values(), key=lambda c: (c.flops, c.key))]


def _better(c: Candidate, best: Candidate) -> bool:
    """The budget objective's order: accuracy, then the smaller KL, then the fewer FLOPs."""
    if abs(c.accuracy - best.accuracy) > 1e-9:
        return c.accuracy > best.accuracy
    return (c.kl, c.flops, c.key) < (best.kl, best.flops, best.key)


# ---------------------------------------------------------------------------- top level
def check_images(samples, field: str) -> None:
    """Fail with a one-line UserInputError on the first unreadable image, before any model is loaded."""

    for smp in samples:
        smp.load_image(field)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pipeline(recipe, log=_stderr):
    from vpexport.model.pipeline import TorchPipeline

    return TorchPipeline.from_recipe(recipe, Schedule("none"), log=log)


def run_analysis(recipe, out, samples: int, batch_size: int | None = None):
    """`vpexport analyze`: returns (analysis dict, destination folder)."""
    from vpexport.calibrate.analyze import analyze_runner, write_analysis
    from vpexport.calibrate.runner import Runner
    from vpexport.data import load_samples
    from vpexport.paths import artifact_dir
    from vpexport.progress import progress

    set_threads()
    data = load_samples(recipe.require_data("calib"), samples, field="task.data.calib")
    check_images(data, "task.data.calib")
    pipe = _pipeline(recipe)
    batch_size = pass_batch(pipe, recipe, batch_size, _stderr)
    with progress(total=len(data), desc="encode", unit="sample") as bar:
        runner = Runner(pipe, data, recipe.task.type, batch_size, progress=bar)
    with progress(total=len(runner.batches) + runner.L, desc="analyze", unit="step") as bar:
        a = analyze_runner(runner, bar, tolerance=causal_tolerance(recipe))
    a["recipe"] = recipe.name
    a["device"] = pipe.device_record
    return a, write_analysis(a, artifact_dir(recipe, out) / "analysis", recipe.name)


def causal_tolerance(recipe) -> float:
    """The accuracy change the analysis's causal check allows: the recipe's tolerance, else the default."""
    cfg = recipe.pruning.calibrate
    return DEFAULT_TOLERANCE if cfg is None or cfg.tolerance is None else cfg.tolerance


def _eval_block(runner, schedule, dense_acc, scores: dict | None = None) -> dict:
    """Eval-split figures of `schedule`; its per-sample scores go into `scores[schedule]` when given."""
    from vpexport.calibrate.runner import accuracy

    r = runner.run(schedule)
    if scores is not None:
        scores[schedule] = r.scores
    acc = accuracy(r.scores)
    return {"accuracy": acc, "unpruned_accuracy": dense_acc, "accuracy_drop": dense_acc - acc, "samples": len(r.scores)}


def paired(a: list[float], b: list[float]) -> dict:
    """Samples on which `a` scores higher / lower than `b` (the same eval samples), and the two-sided
    exact sign test on them: how much of a difference in accuracy is a handful of flips."""
    hi = sum(x > y + 1e-12 for x, y in zip(a, b))
    lo = sum(x < y - 1e-12 for x, y in zip(a, b))
    return {"higher": hi, "lower": lo, "sign_test_p": sign_test(hi, lo)}


def sign_test(hi: int, lo: int) -> float:
    """Two-sided exact binomial (p = 1/2) test of hi vs lo; 1.0 when there are no differences."""
    from math import comb

    n, k = hi + lo, min(hi, lo)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def calibrate(recipe, out=None, batch_size: int | None = None, progress: bool = True,
              analysis_samples: int | None = None) -> dict:
    """Search on calib, measure on eval, write schedule.json (or schedule.rejected.json + CalibrationFailed)."""
    from vpexport.progress import progress as progress_bar

    from vpexport.accounting import paper_flops, prefill_flops
    from vpexport.calibrate.analyze import analyze_runner, write_analysis
    from vpexport.calibrate.runner import Runner, accuracy
    from vpexport.data import load_samples
    from vpexport.paths import SCHEDULE_FILE, artifact_dir

    if not recipe.calibrating:
        raise RecipeError(
            "the recipe has no pruning.calibrate section",
            field="pruning.calibrate",
            fix="add calibrate: {tolerance: 0.01} (and remove points), or set method: auto",
        )
    set_threads()
    t0 = time.perf_counter()
    cfg = recipe.pruning.calibrate
    method = recipe.pruning.method
    methods = search_methods(recipe)
    arch = recipe.resolve_arch()
    layout = recipe.layout(arch)
    check_budget(recipe, arch, layout)
    calib = load_samples(recipe.require_data("calib"), cfg.max_samples, field="task.data.calib")
    # fail early on a missing eval file, without reading it
    eval_path = recipe.require_data("eval")
    check_images(calib, "task.data.calib")
    pipe = _pipeline(recipe)
    batch_size = pass_batch(pipe, recipe, batch_size, _stderr)
    task = recipe.task.type
    dest = artifact_dir(recipe, out)
    dest.mkdir(parents=True, exist_ok=True)

    with progress_bar(total=len(calib), desc="encode calib", unit="sample", enabled=progress) as bar:
        rc = Runner(pipe, calib, task, batch_size, progress=bar)
    # analysis on the calibration cache seeds the search
    t_an = time.perf_counter()
    with progress_bar(total=len(rc.batches) + rc.L, desc="analyze", unit="step", enabled=progress) as bar:
        analysis = analyze_runner(rc, bar, tolerance=causal_tolerance(recipe))
    analysis["recipe"] = recipe.name
    write_analysis(analysis, dest / "analysis", recipe.name)
    t_an = time.perf_counter() - t_an

    t_s = time.perf_counter()
    search = Search(rc, arch, layout, methods, cfg.tolerance, cfg.seed, analysis["seeds"], progress)
    best = search.run() if cfg.objective == "min_flops" else search.run_budget(cfg.flops_budget)
    per_method_best = _per_method_search(recipe, search, best, methods, analysis["seeds"], progress)
    if per_method_best:
        # The joint search refines only around its coarse winner; a method's own search refines
        # around that method's, and can find a more accurate schedule within the budget.
        best = _most_accurate([c for c in per_method_best.values() if c is not None])
    t_s = time.perf_counter() - t_s
    calib_dense = search.dense_acc

    def flops_of(s):
        f = prefill_flops(arch, s, layout)
        return {"ratio": f["ratio"], "dense": f["dense"], "pruned": f["pruned"], "tokens": f["tokens"],
                "with_vision_ratio": f["with_vision"]["ratio"], "paper_ratio": paper_flops(arch, s, layout)["ratio"]}

    calibration = {"samples": len(calib), "unpruned_accuracy": calib_dense, "objective": cfg.objective,
                   "tolerance": cfg.tolerance, "flops_budget": cfg.flops_budget, "compare": cfg.compare,
                   "seed": cfg.seed, "methods": methods, "candidates_tried": len(search.tried),
                   "torch": {**pipe.device_record, "dtype": recipe.model.dtype, "batch_size": batch_size},
                   "seconds": {"analysis": round(t_an, 1), "search": round(t_s, 1)}, "seeds": analysis["seeds"]}
    failure = _failure(search, best, cfg, methods)
    if failure is not None:
        msg, field, fix = failure
        tried = sorted(search.tried.values(), key=lambda c: (c.drop if c.drop is not None else 1e9, c.flops))
        rej = {"error": msg, "calibration": calibration,
               "best_candidates": [c.to_dict() for c in tried[:10]], "candidates": search.candidates()}
        (dest / "schedule.rejected.json").write_text(json.dumps(rej, indent=2))
        raise CalibrationFailed(f"{msg}; candidates in {dest / 'schedule.rejected.json'}", field=field, fix=fix)
    calibration.update({"accuracy": best.accuracy, "accuracy_drop": best.drop})

    # ---- only now: the eval split (never seen by the search)
    rc.drop_caches()
    t_e = time.perf_counter()
    evals = load_samples(eval_path, None, field="task.data.eval")
    with progress_bar(total=len(evals), desc="encode eval", unit="sample", enabled=progress) as bar:
        re_ = Runner(pipe, evals, task, batch_size, progress=bar)
    eval_dense = accuracy(re_.dense().scores)
    chosen = best.schedule
    per_sample: dict = {}
    ev = _eval_block(re_, chosen, eval_dense, per_sample)
    published, defaults = [], {}
    for m in list(auto_candidates()) + list(BASELINES):
        s = recipe.default_schedule(arch, m)
        s = defaults[m] = Schedule(s.method, s.points, s.sink_layers, cfg.seed, s.meta)
        cal = rc.run(s)
        published.append({
            "method": m, "schedule": s.to_dict(), "flops": flops_of(s),
            "calib": {"accuracy": accuracy(cal.scores), "unpruned_accuracy": calib_dense,
                      "accuracy_drop": calib_dense - accuracy(cal.scores), "samples": len(cal.scores)},
            "eval": _eval_block(re_, s, eval_dense, per_sample),
        })
        published[-1]["eval"]["calibrated_vs_default"] = paired(per_sample[chosen], per_sample[s])
    # Equal-FLOPs comparison: where the chosen schedule does not dominate a FastV/HiMAP default, the
    # calibrator given that default's FLOPs as its budget (chosen on the calibration split, like the rest).
    tried_main = search.candidates()
    matched = []
    for p in published:
        if not cfg.compare or p["method"] not in COMPARED or dominates(flops_of(chosen)["ratio"], ev["accuracy"], p):
            continue
        t_m = time.perf_counter()
        if progress:
            print(f"[calibrate] equal-FLOPs comparison: the best schedule at {p['method']}'s published FLOPs ratio "
                  f"{p['flops']['ratio']:.3f}, for calibration.md (`pruning.calibrate.compare: false` skips it)",
                  file=sys.stderr, flush=True)
        c = search.run_budget(p["flops"]["ratio"])
        if c is not None:
            matched.append({"against": p["method"], "schedule": c.schedule.to_dict(), "flops": flops_of(c.schedule),
                            "calib": {"accuracy": c.accuracy, "unpruned_accuracy": calib_dense,
                                      "accuracy_drop": c.drop, "first_token_kl": c.kl},
                            "eval": _eval_block(re_, c.schedule, eval_dense, per_sample),
                            "seconds": round(time.perf_counter() - t_m, 1)})
            matched[-1]["eval"]["vs_default"] = paired(per_sample[c.schedule], per_sample[defaults[p["method"]]])
    per_method = _per_method_rows(per_method_best, re_, chosen, eval_dense, per_sample, flops_of)
    t_e = time.perf_counter() - t_e
    calibration["seconds"]["eval"] = round(t_e, 1)
    calibration["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    result = {
        "recipe": recipe.name,
        "schedule": chosen.to_dict(),
        "flops": flops_of(chosen),
        "eval": ev,
        "calibration": calibration,
        "candidates": tried_main,
        "published": published,
        "matched": matched,
    }
    if per_method:
        result["per_method"] = per_method
    tmp = dest / f".{SCHEDULE_FILE}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(dest / SCHEDULE_FILE)
    from vpexport.manifest import MANIFEST, update_manifest

    if (dest / MANIFEST).is_file():
        # The folder's manifest now vouches for this schedule.json (a later export checks it).
        update_manifest(dest, None, None, files=[SCHEDULE_FILE])
    (dest / "calibration.md").write_text(report_md(result, task))
    result["dir"] = str(dest)
    return result


def _per_method_search(recipe, search: Search, best: Candidate | None, methods, seeds, progress) -> dict:
    """With a flops_budget and several methods: each method's most accurate schedule within the
    budget, by the same budget search restricted to that method (calibration split only; the
    joint search's pick stands for its own method). Skipped with `compare: false` (one more budget
    search per method) and when the joint search found nothing."""
    cfg = recipe.pruning.calibrate
    if cfg.objective != "max_accuracy" or len(methods) < 2 or not cfg.compare or best is None:
        return {}
    out = {}
    for m in methods:
        if m == best.schedule.method:
            out[m] = best
            continue
        if progress:
            print(f"[calibrate] per-method comparison: {m}'s most accurate schedule at flops_budget "
                  f"{cfg.flops_budget:g} (`pruning.calibrate.compare: false` skips it)", file=sys.stderr, flush=True)
        sub = Search(search.runner, search.arch, search.layout, [m], cfg.tolerance, cfg.seed, seeds, progress)
        out[m] = sub.run_budget(cfg.flops_budget)
        search.tried.update({k: c for k, c in sub.tried.items() if k not in search.tried})
    return out


def _most_accurate(cands: list[Candidate]) -> Candidate:
    best = cands[0]
    for c in cands[1:]:
        if _better(c, best):
            best = c
    return best


def _per_method_rows(per_method_best: dict, re_, chosen, eval_dense, per_sample, flops_of) -> dict:
    """The per-method picks measured on the eval split, each with a per-sample sign test against
    the chosen schedule (its own method's row)."""
    out = {}
    for m, c in per_method_best.items():
        if c is None:
            out[m] = {"schedule": None, "reason": f"no {m} schedule within the budget"}
            continue
        row = {"schedule": c.schedule.to_dict(), "flops": {"ratio": flops_of(c.schedule)["ratio"]},
               "calib": {"accuracy": c.accuracy, "first_token_kl": c.kl},
               "eval": _eval_block(re_, c.schedule, eval_dense, per_sample)}
        row["eval"]["chosen_vs_this"] = paired(per_sample[chosen], per_sample[c.schedule])
        out[m] = row
    return out


def search_methods(recipe) -> list[str]:
    method = recipe.pruning.method
    return auto_candidates() if method == "auto" else [method]


def check_budget(recipe, arch, layout) -> None:
    """A flops_budget below every schedule the search could try is a recipe error, found from the
    FLOPs accounting alone (no weights, no data): the cheapest candidate of the searched methods'
    grids (e.g. 1 token kept before the decoder and an exit at layer 1, divprune_exit), whatever
    the analysis adds to the grid."""
    cfg = recipe.pruning.calibrate
    if cfg is None or cfg.flops_budget is None:
        return
    methods = search_methods(recipe)
    cheapest = min(Search(None, arch, layout, methods, cfg.tolerance, progress=False).coarse(),
                   key=lambda c: c.flops, default=None)
    if cheapest is None or cfg.flops_budget < cheapest.flops - 1e-12:
        low = f"; the cheapest is {cheapest.flops:.3f}" if cheapest else ""
        raise RecipeError(
            f"no {'/'.join(methods)} schedule fits flops_budget {cfg.flops_budget:g}{low} (exact prefill FLOPs ratio)",
            field="pruning.calibrate.flops_budget",
            fix=f"set it to at least {cheapest.flops:.3f}" if cheapest else "use a model with at least 3 decoder layers",
        )


def dominates(flops: float, accuracy: float, published: dict) -> bool:
    """No more FLOPs than the published default and at least as accurate on the eval split."""
    return flops <= published["flops"]["ratio"] + 1e-12 and accuracy >= published["eval"]["accuracy"] - 1e-12


def _failure(search: Search, best: Candidate | None, cfg, methods) -> tuple[str, str, str] | None:
    """(message, field, fix) when the search found nothing acceptable, else None."""
    names = "/".join(methods)
    if cfg.objective == "max_accuracy":
        if best is None:  # check_budget rules this out before any weights load; kept for direct callers
            return (f"no {names} schedule fits flops_budget {cfg.flops_budget:g}", "pruning.calibrate.flops_budget",
                    "raise the budget")
        if cfg.tolerance is not None and best.drop > cfg.tolerance + 1e-9:
            return (f"the most accurate {names} schedule within flops_budget {cfg.flops_budget:g} drops "
                    f"{best.drop:.3f} (> tolerance {cfg.tolerance:g}) at FLOPs ratio {best.flops:.3f}",
                    "pruning.calibrate.flops_budget", "raise the budget or the tolerance")
        return None
    if best is not None:
        return None
    tried = sorted(search.tried.values(), key=lambda c: (c.drop if c.drop is not None else 1e9, c.flops))
    if not tried:
        return "no candidate could be built", "pruning.method", "check the model's layer count"
    b = tried[0]
    return (f"no {names} schedule keeps the calibration accuracy drop within {cfg.tolerance:g} "
            f"(best: drop {b.drop:.3f} at FLOPs ratio {b.flops:.3f})", "pruning.calibrate.tolerance",
            "raise the tolerance or add calibration samples")


def _pts(s: dict) -> str:
    pts = ", ".join(f"L{p['layer']}:{p['keep']}" for p in s["points"]) or "-"
    return pts + (f"; sink<{s['sink_layers']}" if s.get("sink_layers") else "")


def report_md(r: dict, task: str) -> str:
    from vpexport.evaluation import MAIN_METRIC

    c, e = r["calibration"], r["eval"]
    metric = MAIN_METRIC[task]
    if c.get("objective") == "max_accuracy":
        goal = (f"highest calibration {metric} at an exact prefill FLOPs ratio <= {c['flops_budget']:g} (ties: the smallest "
                f"first-token KL to the unpruned model)"
                + (f", within a drop of {c['tolerance']:g}" if c.get("tolerance") is not None else ""))
    else:
        goal = f"lowest exact prefill FLOPs ratio with a calibration accuracy drop <= {c['tolerance']:g} ({metric})"
    lines = [
        f"# Calibration: {r['recipe']}", "",
        f"Objective: {goal}; methods searched: {', '.join(c['methods'])}; {c['candidates_tried']} candidates tried on "
        f"{c['samples']} calibration samples (seed {c['seed']}). The eval split was used only after the search.", "",
        f"**Chosen**: {r['schedule']['method']} [{_pts(r['schedule'])}], exact FLOPs ratio {r['flops']['ratio']:.3f} "
        f"(paper convention {r['flops']['paper_ratio']:.3f}).", "",
        f"Calibration: {c['accuracy']:.4f} vs unpruned {c['unpruned_accuracy']:.4f} (drop {c['accuracy_drop']:+.4f}).", "",
        f"## Eval split ({e['samples']} samples, {metric})", "",
        "| schedule | points | exact FLOPs ratio | eval accuracy | drop vs unpruned | calib accuracy |",
        "|---|---|---|---|---|---|",
        f"| unpruned | - | 1.000 | {e['unpruned_accuracy']:.4f} | 0 | {c['unpruned_accuracy']:.4f} |",
        f"| **calibrated ({r['schedule']['method']})** | {_pts(r['schedule'])} | {r['flops']['ratio']:.3f} | "
        f"{e['accuracy']:.4f} | {e['accuracy_drop']:+.4f} | {c['accuracy']:.4f} |",
    ]
    for p in r["published"]:
        lines.append(f"| {p['method']} published default | {_pts(p['schedule'])} | {p['flops']['ratio']:.3f} | "
                     f"{p['eval']['accuracy']:.4f} | {p['eval']['accuracy_drop']:+.4f} | {p['calib']['accuracy']:.4f} |")
    for m in r.get("matched", []):
        lines.append(f"| calibrated at {m['against']}'s FLOPs ({m['schedule']['method']}) | {_pts(m['schedule'])} | "
                     f"{m['flops']['ratio']:.3f} | {m['eval']['accuracy']:.4f} | {m['eval']['accuracy_drop']:+.4f} | "
                     f"{m['calib']['accuracy']:.4f} |")
    lines += ["", "## Against FastV's and HiMAP's published defaults", "",
              "Per-sample differences on the same eval samples are given as (higher / lower) with a two-sided exact "
              "sign test, to show how many samples a difference in accuracy is.", ""]
    for p in r["published"]:
        if p["method"] not in COMPARED:
            continue
        cheaper = r["flops"]["ratio"] <= p["flops"]["ratio"] + 1e-12
        better = e["accuracy"] >= p["eval"]["accuracy"] - 1e-12
        verdict = "dominates it (no more FLOPs, at least as accurate)" if cheaper and better else (
            "uses fewer FLOPs but is less accurate" if cheaper else "is more accurate but uses more FLOPs" if better else "is worse")
        f = p["eval"].get("calibrated_vs_default")
        flips = f" ({f['higher']} / {f['lower']}, sign test p = {f['sign_test_p']:.2g})" if f else ""
        lines.append(f"- {p['method']} default [{_pts(p['schedule'])}]: FLOPs {p['flops']['ratio']:.3f}, eval accuracy "
                     f"{p['eval']['accuracy']:.4f}; the calibrated schedule ({r['flops']['ratio']:.3f}, {e['accuracy']:.4f}) "
                     f"{verdict}{flips}.")
    if c.get("compare") is False:
        lines.append("- equal-FLOPs searches skipped (`pruning.calibrate.compare: false`).")
    for m in r.get("matched", []):
        p = next(x for x in r["published"] if x["method"] == m["against"])
        verdict = ("is at least as accurate as" if dominates(m["flops"]["ratio"], m["eval"]["accuracy"], p)
                   else "is less accurate than")
        f = m["eval"]["vs_default"]
        lines.append(f"- at {m['against']}'s FLOPs: calibration with flops_budget {p['flops']['ratio']:.3f} (the same search "
                     f"and calibration split, the most accurate there) picks {m['schedule']['method']} [{_pts(m['schedule'])}], "
                     f"FLOPs {m['flops']['ratio']:.3f}, eval accuracy {m['eval']['accuracy']:.4f}: it {verdict} the "
                     f"{m['against']} default ({p['eval']['accuracy']:.4f} at {p['flops']['ratio']:.3f}; {f['higher']} / {f['lower']}, "
                     f"sign test p = {f['sign_test_p']:.2g}).")
    if r.get("per_method"):
        lines += ["", f"## Every method at flops_budget {c['flops_budget']:g}", "",
                  "Each method's most accurate schedule within the budget (the same search restricted to it, on the "
                  "calibration split; the chosen schedule is the most accurate of them there), on the eval split; (higher / lower) counts the samples where the chosen "
                  "schedule scores higher / lower than that method's, with a two-sided exact sign test.", "",
                  "| method | points | exact FLOPs ratio | calib accuracy | eval accuracy | chosen vs it (higher / lower, p) |",
                  "|---|---|---|---|---|---|"]
        for m, row in r["per_method"].items():
            if row["schedule"] is None:
                lines.append(f"| {m} | - | - | - | - | {row['reason']} |")
                continue
            f = row["eval"]["chosen_vs_this"]
            name = f"**{m}** (chosen)" if m == r["schedule"]["method"] else m
            lines.append(f"| {name} | {_pts(row['schedule'])} | {row['flops']['ratio']:.3f} | {row['calib']['accuracy']:.4f} | "
                         f"{row['eval']['accuracy']:.4f} | {f['higher']} / {f['lower']}, p = {f['sign_test_p']:.2g} |")
    lines += ["", f"Time: analysis {c['seconds']['analysis']} s, search {c['seconds']['search']} s, "
              f"eval and equal-FLOPs searches {c['seconds']['eval']} s (total {c['seconds']['total']} s).", ""]
    return "\n".join(lines)

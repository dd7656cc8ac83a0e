"""`vpexport plan RECIPE|ARTIFACT_DIR`: segments, static shapes, FLOPs and KV-cache bytes, without
weights or torch. The schedule shown is the one `eval`, `export` and `run` use: the recipe's points,
or the calibrated schedule.json in the artifact folder once calibration wrote it (else the
published default calibration starts from)."""

from __future__ import annotations

import json
import shlex

import click

from vpexport.accounting import decode_step_flops, kv_cache_bytes, paper_flops, prefill_flops, weight_params
from vpexport.accounting.flops import published_macs
from vpexport.accounting.flops import tokens_label
from vpexport.accounting.memory import dtype_bytes
from vpexport.methods import METHODS
from vpexport.recipe import load_recipe


def _flops(x: float) -> str:
    for unit, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= s:
            return f"{x / s:.3f} {unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= s:
            return f"{x / s:.2f} {unit}"
    return f"{x:.0f} B"


def _count(x: int) -> str:
    for unit, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= s:
            return f"{x / s:.2f} {unit}"
    return str(x)


def _segments(recipe, arch, layout, sched) -> list[dict]:
    L, d = arch.text.layers, arch.text.hidden
    tl = recipe.export.text_length
    out = []
    segs = sched.segments(L, layout.visual)
    for i, s in enumerate(segs):
        fixed = layout.prefix + s.visual_tokens
        seq = fixed + layout.text
        static = [layout.batch, fixed + tl.max, d] if tl.mode == "padded" else [layout.batch, f"{fixed}+T", d]
        nxt = next((q for q in sched.points if q.layer == s.end), None)
        out.append(
            {
                "index": i,
                "layers": [s.start, s.end],  # [start, end)
                "visual_tokens": s.visual_tokens,
                "seq_len": seq,
                "hidden_shape": static,
                "kv_len_per_layer": seq,
                "prune_after": None if nxt is None else {"layer": nxt.layer, "keep": nxt.keep, "rule": nxt.rule},
            }
        )
    return out


def _summary(arch, sched, layout) -> dict:
    f = prefill_flops(arch, sched, layout)
    return {"method": sched.method, "schedule": sched.to_dict(), "flops_ratio": f["ratio"], "paper_ratio": paper_flops(arch, sched)["ratio"]}


def _load(source: str):
    """(recipe, artifact folder or None) for a recipe file or an artifact folder."""
    from pathlib import Path

    from vpexport.errors import UserInputError

    path = Path(source)
    if path.is_dir():
        resolved = path / "recipe.resolved.yaml"
        if not resolved.is_file():
            raise UserInputError(f"{path} is a folder without recipe.resolved.yaml", field="RECIPE",
                                 fix="give a recipe file or an artifact folder written by `vpexport build` / `export` / `calibrate`")
        return load_recipe(resolved), path
    return load_recipe(path), None


def build_plan(recipe_path: str, batch: int = 1) -> dict:
    from vpexport.paths import SCHEDULE_FILE, artifact_dir, resolve_schedule

    r, folder = _load(recipe_path)
    arch = r.resolve_arch()
    layout = r.layout(arch, batch=batch)
    method = r.pruning.method
    calib = None
    if r.calibrating:
        from vpexport.calibrate.search import check_budget, search_methods

        check_budget(r, arch, layout)
        cands = search_methods(r)
        shown = r.default_schedule(arch, cands[0])
        cfg = r.pruning.calibrate
        keep = ("the cheapest within tolerance" if cfg.objective == "min_flops"
                else f"the most accurate at a FLOPs ratio <= {cfg.flops_budget:g}")
        calib = {
            "method": method,
            "objective": cfg.objective,
            "tolerance": cfg.tolerance,
            "flops_budget": cfg.flops_budget,
            "max_samples": cfg.max_samples,
            "candidates": [_summary(arch, r.default_schedule(arch, m), layout) for m in cands],
            "note": (
                f"method auto: calibration will try {', '.join(cands)} and keep {keep}; "
                f"the tables show {cands[0]}'s published default"
                if method == "auto"
                else f"the published {method} default is shown; calibration will replace it"
            ),
        }
        origin = "published default (calibration will replace it)"
        calibrated = artifact_dir(r, folder) / SCHEDULE_FILE
        if calibrated.is_file():  # what eval / export / run use from now on
            shown = resolve_schedule(r, arch, folder)
            origin = f"calibrated: {calibrated}"
            calib["note"] = (f"the calibrated schedule in {calibrated} is shown (`vpexport calibrate` searches again); "
                             f"calibration tries {', '.join(cands)}")
    else:
        shown = r.schedule(arch)
        origin = "recipe"
    kv_dtype = {"fp32": "float32", "fp16": "float16"}[r.export.precision]
    params = weight_params(arch)
    return {
        "recipe": {"name": r.name, "path": str(r.source)},
        "arch": arch.to_dict() | {"source": "builtin" if r.model.arch else "config.json"},
        "layout": layout.to_dict()
        | {
            "total": layout.total,
            "text_source": "task.text_tokens (estimate)" if r.model.arch else "tokenizer",
            "text_mode": r.export.text_length.mode,
            "text_max": r.export.text_length.max,
            "text_buckets": r.export.text_length.widths(),
        },
        "schedule": shown.to_dict() | {"origin": origin},
        "calibration": calib,
        "segments": _segments(r, arch, layout, shown),
        "flops": prefill_flops(arch, shown, layout),
        "paper_flops": paper_flops(arch, shown, layout),
        "published_macs": published_macs(arch, shown),
        "decode_step": {
            "first": decode_step_flops(arch, shown, layout, 0),
            "last": decode_step_flops(arch, shown, layout, r.task.max_new_tokens - 1),
        },
        "kv_cache": kv_cache_bytes(arch, shown, layout, kv_dtype)
        | {"final": kv_cache_bytes(arch, shown, layout, kv_dtype, generated=r.task.max_new_tokens)},
        "weights": {"params": params, "dtype": r.export.precision, "bytes": params["total"] * dtype_bytes(kv_dtype)},
        "next": _next(recipe_path, r),
    }


def _published_rows(pm: dict) -> list[str]:
    """The MACs-over-visual-tokens row (the convention of published dense figures) and, where a
    paper gives this architecture's figure, that figure beside it."""
    rows = [f"{'MACs, visual tokens only':<34}{_flops(pm['dense']):>14}{_flops(pm['pruned']):>14}{pm['ratio']:>8.3f}"]
    if "published" in pm:
        pub = pm["published"]
        rows.append(f"{'  published dense: ' + pub['source']:<48}{_flops(pub['dense']):>14}  (this convention: "
                    f"{pm['dense'] / pub['dense']:.3f} x)")
    return rows


def _next(recipe_path: str, r) -> str:
    q = shlex.quote(recipe_path)
    if r.model.arch is not None:
        return f"vpexport plan {q} --json > plan.json   # weight-free recipe: build needs model.path instead of model.arch"
    return f"vpexport build {q}"


def render(p: dict) -> str:
    a, lay, sch, fl, pf, kv = p["arch"], p["layout"], p["schedule"], p["flops"], p["paper_flops"], p["kv_cache"]
    t, v = a["text"], a["vision"]
    lines = [
        f"recipe   {p['recipe']['name']}  ({p['recipe']['path']})",
        f"model    {a['name']} ({a['source']}): decoder {t['layers']} layers, d={t['hidden']}, ffn={t['intermediate']}, "
        f"heads {t['heads']}/{t['kv_heads']} kv, vocab {t['vocab']}; vision {v['summary']}, "
        f"{a['visual_tokens']} visual tokens",
        f"layout   prefix {lay['prefix']} + visual {lay['visual']} + text {lay['text']} = {lay['total']} tokens, "
        f"batch {lay['batch']} (text from {lay['text_source']}; export {lay['text_mode']}, max {lay['text_max']}"
        + (f", buckets {lay['text_buckets']})" if lay.get("text_buckets") else ")"),
    ]
    pts = ", ".join(f"layer {q['layer']} keep {q['keep']} ({q['rule']})" for q in sch["points"]) or "no prune points"
    sink = f", sink_layers {sch['sink_layers']}" if sch["sink_layers"] else ""
    lines.append(f"schedule {sch['method']}: {pts}{sink}  [{sch['origin']}]")
    if p["calibration"]:
        c = p["calibration"]
        goal = (f"tolerance {c['tolerance']}" if c["objective"] == "min_flops"
                else f"flops_budget {c['flops_budget']}" + (f", tolerance {c['tolerance']}" if c["tolerance"] is not None else ""))
        lines.append(f"calibrate {goal}, up to {c['max_samples']} samples: {c['note']}")
        for cand in c["candidates"]:
            cp = ", ".join(f"{q['layer']}/{q['keep']}" for q in cand["schedule"]["points"]) or "-"
            lines.append(f"  candidate {cand['method']:<11} default {cp:<16} flops ratio {cand['flops_ratio']:.3f}  paper {cand['paper_ratio']:.3f}")
    lines += ["", f"{'segment':<8}{'layers':<10}{'visual':>7}{'seq len':>9}  {'hidden states (static)':<24}{'KV len/layer':>13}  then"]
    for s in p["segments"]:
        shape = "[" + ", ".join(str(x) for x in s["hidden_shape"]) + "]"
        then = "-" if s["prune_after"] is None else f"prune @{s['prune_after']['layer']} -> {s['prune_after']['keep']} ({s['prune_after']['rule']})"
        lay_s = f"{s['layers'][0]}-{s['layers'][1] - 1}"
        lines.append(f"{s['index']:<8}{lay_s:<10}{s['visual_tokens']:>7}{s['seq_len']:>9}  {shape:<24}{s['kv_len_per_layer']:>13}  {then}")
    c = fl["components"]
    dec, first = p["decode_step"]["first"], p["decode_step"]
    lines += [
        "",
        f"{'FLOPs (prefill, batch ' + str(fl['batch']) + ')':<34}{'dense':>14}{'pruned':>14}{'ratio':>8}"
        f"  at the {tokens_label(fl['tokens'])} (the ratio eval and calibrate report)",
        f"{'decoder+lm_head (exact)':<34}{_flops(fl['dense']):>14}{_flops(fl['pruned']):>14}{fl['ratio']:>8.3f}",
        f"{'  of which scoring':<34}{_flops(c['dense']['scoring']):>14}{_flops(c['pruned']['scoring']):>14}",
        f"{'  of which attention (QK^T+AV)':<34}{_flops(c['dense']['attn_qk'] + c['dense']['attn_av']):>14}"
        f"{_flops(c['pruned']['attn_qk'] + c['pruned']['attn_av']):>14}",
        f"{'with vision tower + projector':<34}{_flops(fl['with_vision']['dense']):>14}{_flops(fl['with_vision']['pruned']):>14}"
        f"{fl['with_vision']['ratio']:>8.3f}",
        f"{'paper convention (visual tokens)':<34}{_flops(pf['dense']):>14}{_flops(pf['pruned']):>14}{pf['ratio']:>8.3f}",
        f"{'  same formula, all tokens':<34}{'':>14}{'':>14}{pf.get('ratio_all_tokens', float('nan')):>8.3f}",
        *_published_rows(p["published_macs"]),
        f"{'decode step (first token)':<34}{_flops(dec['dense']):>14}{_flops(dec['pruned']):>14}{dec['ratio']:>8.3f}",
        f"{'decode step (token ' + str(first['last']['generated'] + 1) + ')':<34}{_flops(first['last']['dense']):>14}"
        f"{_flops(first['last']['pruned']):>14}{first['last']['ratio']:>8.3f}",
        "",
        f"{'KV cache (' + kv['dtype'] + ')':<34}{'dense':>14}{'pruned':>14}{'ratio':>8}",
        f"{'after prefill':<34}{_bytes(kv['dense_bytes']):>14}{_bytes(kv['pruned_bytes']):>14}{kv['ratio']:>8.3f}",
        f"{'after ' + str(kv['final']['generated']) + ' new tokens':<34}{_bytes(kv['final']['dense_bytes']):>14}"
        f"{_bytes(kv['final']['pruned_bytes']):>14}{kv['final']['ratio']:>8.3f}",
        f"weights  {_count(p['weights']['params']['total'])} params, {_bytes(p['weights']['bytes'])} in {p['weights']['dtype']}"
        + ("  (ONNX over 2 GB: external data)" if p["weights"]["bytes"] > 2 * 10**9 else ""),
        "",
        f"next: {p['next']}",
    ]
    return "\n".join(lines)


@click.command("plan")
@click.argument("recipe", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size for FLOPs and KV bytes.")
def plan(recipe: str, as_json: bool, batch: int):
    """Show RECIPE's segments, static shapes, FLOPs (exact and paper) and KV-cache bytes. No weights, no torch.

    RECIPE is a recipe file or an artifact folder (its recipe.resolved.yaml). A recipe that calibrates
    shows its calibrated schedule once `calibrate` / `build` wrote one, else its published default."""
    p = build_plan(recipe, batch=batch)
    if as_json:
        click.echo(json.dumps(p, indent=2))
    else:
        click.echo(render(p))

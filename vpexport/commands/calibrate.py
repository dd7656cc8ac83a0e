"""`vpexport calibrate RECIPE`: search prune layers and keep budgets on the calibration split."""

from __future__ import annotations

import json

import click

from vpexport.commands.options import apply_device, batch_size_option, device_option


@click.command("calibrate")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default artifacts/<recipe name>).")
@batch_size_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def calibrate(recipe_path, out, batch_size, device, as_json):
    """Lowest-FLOPs schedule within the recipe's accuracy tolerance, or with pruning.calibrate.flops_budget
    the most accurate schedule within that FLOPs ratio (method auto: {methods}).

    Writes <artifact dir>/schedule.json and calibration.md (exit 6 and schedule.rejected.json when
    no candidate meets the objective)."""
    from vpexport.calibrate.search import COMPARED
    from vpexport.calibrate.search import calibrate as run
    from vpexport.recipe import load_recipe

    from vpexport.artifact_lock import artifact_lock
    from vpexport.paths import artifact_dir

    recipe = apply_device(load_recipe(recipe_path), device)
    with artifact_lock(artifact_dir(recipe, out), "calibrate"):
        r = run(recipe, out, batch_size, progress=True)
    if as_json:
        keys = ("recipe", "schedule", "flops", "eval", "calibration", "published", "matched", "dir")
        click.echo(json.dumps({k: r[k] for k in keys}, indent=2))
        return
    s, e = r["schedule"], r["eval"]
    pts = ", ".join(f"layer {p['layer']} keep {p['keep']} ({p['rule']})" for p in s["points"])
    click.echo(f"{r['recipe']}: {s['method']} [{pts}]" + (f" sink_layers {s['sink_layers']}" if s["sink_layers"] else ""))
    click.echo(f"  prefill FLOPs ratio {r['flops']['ratio']:.3f}; eval accuracy {e['accuracy']:.4f} vs unpruned "
               f"{e['unpruned_accuracy']:.4f} (drop {e['accuracy_drop']:+.4f}, {e['samples']} samples)")
    for p in r["published"]:
        if p["method"] in COMPARED:
            click.echo(f"  {p['method']} default: FLOPs {p['flops']['ratio']:.3f}, eval accuracy {p['eval']['accuracy']:.4f}")
    for m in r["matched"]:
        pts = ", ".join(f"L{p['layer']}:{p['keep']}" for p in m["schedule"]["points"])
        click.echo(f"  calibrated at {m['against']}'s FLOPs: {m['schedule']['method']} [{pts}] FLOPs {m['flops']['ratio']:.3f}, "
                   f"eval accuracy {m['eval']['accuracy']:.4f}")
    click.echo(f"  -> {r['dir']}/schedule.json ({r['calibration']['seconds']['total']} s)")


# The methods `auto` searches, from the method table (light: no torch).
def _auto_methods() -> str:
    from vpexport.methods import auto_candidates

    return ", ".join(auto_candidates())


calibrate.help = calibrate.help.replace("{methods}", _auto_methods())

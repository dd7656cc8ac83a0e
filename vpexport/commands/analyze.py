"""`vpexport analyze RECIPE`: per-layer visual-token statistics of the dense model on calibration data."""

from __future__ import annotations

import json
import time

import click

from vpexport.commands.options import apply_device, batch_size_option, device_option


@click.command("analyze")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default artifacts/<recipe name>).")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Calibration samples to analyse (the first N of task.data.calib).")
@batch_size_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def analyze(recipe_path, out, samples, batch_size, device, as_json):
    """Attention flows, value contributions, concentration and a causal check, per decoder layer.

    Writes <artifact dir>/analysis/{analysis.json, analysis.md, *.png}."""
    from vpexport.calibrate.search import run_analysis
    from vpexport.recipe import load_recipe

    from vpexport.paths import artifact_dir

    t0 = time.perf_counter()
    recipe = apply_device(load_recipe(recipe_path), device)
    previous = artifact_dir(recipe, out) / "analysis" / "analysis.json"
    if previous.is_file():  # say what is replaced (calibrate writes its own analysis here too)
        try:
            n = json.loads(previous.read_text()).get("samples")
        except (OSError, ValueError, AttributeError):
            n = None
        click.echo(f"[analyze] replacing {previous.parent} ({n if n is not None else 'unreadable'} samples) with an "
                   f"analysis of {samples}; `vpexport calibrate` writes its own again", err=True)
    a, dest = run_analysis(recipe, out, samples, batch_size)
    secs = round(time.perf_counter() - t0, 1)
    if as_json:
        click.echo(json.dumps({"dir": str(dest), "seconds": secs, "device": a["device"], "samples": a["samples"], "stages": a["stages"],
                               "seeds": a["seeds"], "causal": a["causal"]}, indent=2))
        return
    click.echo(f"{recipe.name}: analysed {a['samples']} samples in {secs} s -> {dest}")
    for s in a["stages"]:
        click.echo(f"  {s['stage']}: layers {s['layers'][0]}-{s['layers'][1]}")
    click.echo(f"  fusion layer (median) {a['fusion_layer']['median']}, exit layer (median) {a['exit_layer']['median']}, "
               f"causal deep start {a['causal_deep_start']}")

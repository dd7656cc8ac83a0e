"""`vpexport build RECIPE`: calibrate (if asked), export, engines (if a GPU is here), validate, package."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vpexport.commands.options import apply_device, device_option


def _size(n: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default: artifacts/<recipe name>).")
@click.option("--force", is_flag=True, help="Re-run every stage even when its inputs are unchanged.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the build record as JSON.")
def build(recipe_path, out, force, device, as_json):
    """Run the whole pipeline for RECIPE into artifacts/<name>/ (resumable, written atomically)."""
    from vpexport.build import build as run_build
    from vpexport.recipe import load_recipe

    recipe = apply_device(load_recipe(recipe_path), device)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    res = run_build(recipe, out, force=force, log=log)
    if as_json:
        click.echo(json.dumps({k: v for k, v in res.items() if k != "summaries"}, indent=2, default=str))
        return
    d = Path(res["artifact_dir"])
    click.echo(f"\nbuilt {recipe.name} -> {d}")
    for name, rec in res["stages"].items():
        extra = " (reused)" if rec.get("reused") else (f" ({rec['seconds']} s)" if "seconds" in rec else "")
        # The full reason was logged when the stage was skipped; here its first clause.
        why = f": {rec['reason'].split(':')[0]}" if rec.get("reason") else ""
        click.echo(f"  {name:10} {rec['status']}{extra}{why}")
    chosen = _chosen(d)
    if chosen:
        click.echo(f"schedule: {chosen}")
    click.echo("artifacts:")
    for rel, info in res["manifest"]["files"].items():
        if rel.endswith((".onnx", ".bin", ".plan", ".json", ".pbtxt")) and "/" in rel and not rel.startswith("triton/"):
            click.echo(f"  {d / rel}  {_size(info['size'])}")
    for rel, what in (("schedule.json", "the calibrated schedule"), ("calibration.md", "the calibration report"),
                      ("analysis", "the attention analysis and its plots"), ("triton", "Triton model repository")):
        if (d / rel).is_file():
            click.echo(f"  {d / rel}  {_size((d / rel).stat().st_size)}  ({what})")
        elif (d / rel).is_dir():
            click.echo(f"  {d / rel}/  ({what})")
    click.echo("next:")
    click.echo(f"  vpexport run {d} --image IMAGE.png --prompt 'QUESTION'")
    click.echo(f"  vpexport bench {d}")
    if res["stages"].get("engine", {}).get("status") != "done":
        click.echo(f"  vpexport engine {d}   # on the target NVIDIA GPU / Jetson")


def _chosen(d: Path) -> str | None:
    """One line on the schedule the artifact was built with: from schedule.json when calibrated
    (method, points, exact prefill FLOPs ratio, eval accuracy against unpruned), else the recipe's."""
    from vpexport.manifest import read_manifest

    try:
        cal = json.loads((d / "schedule.json").read_text())
    except (OSError, ValueError):
        cal = None
    sched = cal["schedule"] if cal else (read_manifest(d, verify=False).get("schedule") or {})
    if not sched:
        return None
    pts = ", ".join(f"{p['layer']}:{p['keep']}" for p in sched.get("points", [])) or "no prune points"
    line = f"{sched.get('method')} ({pts})"
    if cal:
        ev, fl = cal.get("eval", {}), cal.get("flops", {})
        from vpexport.accounting.flops import tokens_label

        basis = f" ({tokens_label(fl['tokens'])})" if "tokens" in fl else ""
        line += (f", calibrated: exact prefill FLOPs ratio {fl.get('ratio', float('nan')):.3f}{basis}, "
                 f"eval accuracy {ev.get('accuracy', float('nan')):.4f} against "
                 f"{ev.get('unpruned_accuracy', float('nan')):.4f} unpruned ({ev.get('samples')} samples)")
    else:
        line += ", from the recipe"
    return line

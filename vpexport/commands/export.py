"""`vpexport export RECIPE [--out DIR]`: ONNX graphs (vision, prefill, decode) + runtime assets + manifest."""

from __future__ import annotations

import json

import click


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("export")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="Artifact folder (default artifacts/<recipe name>).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export(recipe_path, out, as_json):
    """Export RECIPE's pruned model as ONNX (vision, prefill, decode) with its runtime assets."""
    from vpexport.export.onnx_export import export_artifacts
    from vpexport.paths import artifact_dir, resolve_schedule
    from vpexport.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if recipe.model.path is None:
        from vpexport.errors import RecipeError

        raise RecipeError(
            f"built-in architecture {recipe.model.arch!r} has no weights to export",
            field="model.path",
            fix="give a local save_pretrained checkpoint directory",
        )
    arch = recipe.resolve_arch()
    sched = resolve_schedule(recipe, arch, out)
    dest = artifact_dir(recipe, out)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    from vpexport.artifact_lock import artifact_lock

    with artifact_lock(dest, "export"):
        summary = export_artifacts(recipe, dest, sched, log=log)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"exported {recipe.name} ({summary['precision']}, method {sched.method}) in {summary['seconds']} s -> {dest}")
    for f, n in summary["files"].items():
        click.echo(f"  {dest / f}  {_size(n)}")
    for g, io in summary["graphs"].items():
        ins = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in io["inputs"][:3])
        more = f" (+{len(io['inputs']) - 3} more)" if len(io["inputs"]) > 3 else ""
        click.echo(f"  {g}: {ins}{more} -> {len(io['outputs'])} outputs")
    click.echo(f"next: vpexport validate {dest}")

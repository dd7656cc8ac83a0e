"""`vpexport eval RECIPE`: accuracy of the recipe's schedule on its eval split (PyTorch path)."""

from __future__ import annotations

import json
import time

import click

from vpexport.commands.options import apply_device, batch_size_option, device_option


@click.command("eval")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@click.option("--split", type=click.Choice(["eval", "calib"]), default="eval", show_default=True,
              help="Which of the recipe's task.data files to evaluate on.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N samples.")
@batch_size_option
@device_option
@click.option("--out", type=click.Path(), default=None, help="Artifact folder holding a calibrated schedule.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(recipe_path, split, limit, batch_size, device, out, as_json):
    """Accuracy of RECIPE's pruning schedule (exact match for vqa, token F1 for caption)."""
    from vpexport.accounting import prefill_flops
    from vpexport.data import load_samples
    from vpexport.evaluation import MAIN_METRIC, evaluate
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe

    recipe = apply_device(load_recipe(recipe_path), device)
    samples = load_samples(recipe.require_data(split), limit, field=f"task.data.{split}")
    arch = recipe.resolve_arch()
    sched = resolve_schedule(recipe, arch, out)
    t0 = time.perf_counter()
    from vpexport.model.device import pass_batch

    pipe = TorchPipeline.from_recipe(recipe, sched, log=lambda m: click.echo(m, err=True))
    batch_size = pass_batch(pipe, recipe, batch_size, log=lambda m: click.echo(m, err=True))
    res = evaluate(lambda im, q: [a.text for a in pipe.answer(im, q)], samples, recipe.task.type, batch_size, "eval")
    flops = prefill_flops(arch, sched, recipe.layout(arch))
    result = {
        "recipe": recipe.name,
        "split": split,
        "metric": MAIN_METRIC[recipe.task.type],
        "accuracy": res["accuracy"],
        "exact_match": res["exact_match"],
        **({"token_f1": res["token_f1"]} if "token_f1" in res else {}),
        "samples": res["samples"],
        "schedule": sched.to_dict(),
        "torch": {**pipe.device_record, "dtype": recipe.model.dtype, "batch_size": batch_size},
        "flops": {"dense": flops["dense"], "pruned": flops["pruned"], "ratio": flops["ratio"], "tokens": flops["tokens"]},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{recipe.name} [{split}] method={sched.method} points={[(p.layer, p.keep) for p in sched.points]}")
    em = f"  exact_match: {result['exact_match']:.4f}" if result["metric"] != "exact_match" else ""
    click.echo(f"  {result['metric']}: {result['accuracy']:.4f}{em}  samples: {result['samples']}")
    from vpexport.accounting.flops import tokens_label

    click.echo(f"  exact prefill FLOPs ratio: {result['flops']['ratio']:.3f} ({tokens_label(flops['tokens'])})  "
               f"time: {result['seconds']} s")

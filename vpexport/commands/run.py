"""`vpexport run TARGET --image PATH --prompt TEXT`: answer with the PyTorch path (TARGET = recipe)
or with ONNX Runtime (TARGET = an artifact folder holding manifest.json; that path never imports torch)."""

from __future__ import annotations

import json

import click

from vpexport.commands.options import apply_device, device_option

from vpexport.errors import UserInputError
from vpexport.runtime.providers import NAMES as PROVIDER_NAMES, PRECISION_CHOICES


@click.command()
@click.argument("target", metavar="RECIPE|ARTIFACT_DIR", type=click.Path())
@click.option("--image", "images", multiple=True, required=True, help="Image file; repeat for a batch.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Question; one, or one per --image.")
@click.option("--max-new-tokens", type=int, default=None, help="Override the recipe's task.max_new_tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print answers, tokens and kept indices as JSON.")
@click.option(
    "--provider",
    type=click.Choice(PROVIDER_NAMES),
    default="cpu",
    show_default=True,
    help="Runtime of the artifact's graphs (artifact folders only; vpexport/runtime/providers.py).",
)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="Inference precision for --provider openvino (auto: the fastest this CPU runs natively).")
@device_option
def run(target, images, prompts, max_new_tokens, as_json, provider, precision, device):
    """Answer each --prompt about its --image.

    TARGET is a recipe (the pruned PyTorch model, with the recipe's calibrated schedule when one is
    on disk) or an artifact folder from `vpexport export` / `build` (its ONNX graphs on --provider,
    without torch). `--json` gives per answer its text, tokens and `kept`: per prune point that keeps
    tokens, the original indices of the visual tokens kept there."""
    if len(prompts) not in (1, len(images)):
        raise UserInputError(
            f"{len(prompts)} prompts for {len(images)} images", field="--prompt", fix="give one prompt, or one per --image"
        )
    prompts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens {max_new_tokens} must be at least 1", field="--max-new-tokens",
                             fix="give a positive count")
    from pathlib import Path

    if Path(target).is_dir() and (Path(target) / "manifest.json").is_file():
        if device is not None:
            raise UserInputError("--device places the PyTorch model; an artifact folder runs on --provider",
                                 field="--device", fix="drop --device, or pass the recipe instead of the artifact folder")
        answers = _run_artifacts(target, list(images), prompts, max_new_tokens, provider, precision)
    else:
        answers = _run_recipe(target, list(images), prompts, max_new_tokens, device)
    if as_json:
        click.echo(json.dumps({"answers": answers}, indent=2))
    else:
        for a in answers:
            click.echo(a["text"])


def _run_recipe(path, images, prompts, max_new_tokens, device=None):
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe
    from vpexport.runtime.preprocess import load_image
    from vpexport.runtime.text_length import check_text_fits

    recipe = apply_device(load_recipe(path), device)
    if len(images) > recipe.export.batch.max:
        raise UserInputError(f"{len(images)} images in one call, more than export.batch.max ({recipe.export.batch.max})",
                             field="--image", fix=f"give at most {recipe.export.batch.max} images per call, or raise "
                             f"export.batch.max in {path}")
    pics = [load_image(p) for p in images]  # fail on a bad image before loading weights
    arch = recipe.resolve_arch()
    pipe = TorchPipeline.from_recipe(recipe, resolve_schedule(recipe, arch), log=lambda m: click.echo(m, err=True))
    if max_new_tokens:
        pipe.max_new_tokens = max_new_tokens
    # The PyTorch path answers what the exported graphs would answer, so it takes only what they
    # take: a prompt longer than export.text_length.max is refused here as by the artifact path.
    check_text_fits(pipe.longest_text(pics, prompts), recipe.export.text_length.max,
                    f"shorten the question, or raise export.text_length.max to >= {{longest}} in {path}")
    # `kept` as the artifact path gives it: one list per prune point that keeps tokens (a drop_all
    # point keeps none, and the exported graph has no kept output for it).
    keeps = [pt.rule != "drop_all" for pt in pipe.pruned.schedule.points]
    return [{"text": a.text, "tokens": a.tokens, "kept": [k for k, on in zip(a.kept, keeps) if on]}
            for a in pipe.answer(pics, prompts)]


def _run_artifacts(path, images, prompts, max_new_tokens, provider, precision):
    """Artifact path (ONNX Runtime, OpenVINO or TensorRT): no torch / transformers import."""
    from vpexport.runtime import ArtifactRuntime
    from vpexport.runtime.preprocess import load_image

    pics = [load_image(p) for p in images]  # a bad image fails before sessions load
    rt = ArtifactRuntime.open(path, provider=provider, precision=precision)
    return rt.answer(pics, prompts, max_new_tokens)

"""`vpexport package ARTIFACT_DIR --triton OUT`: a Triton model repository from exported artifacts.
`vpexport package --check REPO`: check an existing repository offline (exit 3 with the first problem)."""

from __future__ import annotations

import json

import click

from vpexport.runtime.providers import PROVIDERS

CPU_PROVIDERS = [n for n, p in PROVIDERS.items() if p.device == "CPU"]


@click.command("package")
@click.argument("artifact_dir", required=False, type=click.Path())
@click.option("--triton", "out", type=click.Path(), default=None, help="Write the Triton model repository here.")
@click.option("--check", "check_repo", type=click.Path(), default=None, help="Only check this existing repository.")
@click.option("--mode", type=click.Choice(["inprocess", "bls"]), default=None,
              help="Python model: run the graphs in-process or through BLS requests (default: the recipe's deploy.triton.mode).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None, help="Instance kind (default: the recipe's).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None, help="Override deploy.triton.max_batch_size.")
@click.option("--instances", type=click.IntRange(min=1), default=None, help="Override deploy.triton.instances.")
@click.option("--recipe", "recipe_path", type=click.Path(), default=None,
              help="Take deploy.triton from this recipe instead of the one recorded in the artifacts.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True, help="ONNX Runtime threads per python-model instance (0: ORT default).")
@click.option("--provider", type=click.Choice(CPU_PROVIDERS), default=None,
              help="Runtime inside the python model on CPU instances, inprocess mode (default: cpu = ONNX Runtime).")
@click.option("--precision", type=click.Choice(["auto", "f32", "bf16"]), default="auto", show_default=True,
              help="Inference precision for --provider openvino.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or the problems) as JSON.")
def package(artifact_dir, out, check_repo, mode, device, max_batch_size, instances, recipe_path, threads, provider,
            precision, force, as_json):
    """Write (--triton OUT) or check (--check REPO) a Triton model repository."""
    from vpexport.errors import ArtifactError, UserInputError

    if check_repo is not None:
        if artifact_dir or out:
            raise UserInputError("--check takes only the repository", field="--check",
                                 fix="vpexport package --check REPO")
        from vpexport.package.triton import check_repository

        problems = check_repository(check_repo)
        if as_json:
            click.echo(json.dumps({"repository": check_repo, "problems": problems}, indent=2))
        if problems:
            for p in problems[1:]:
                click.echo(f"  also: {p}", err=True)
            raise ArtifactError(problems[0] + (f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                                field=f"triton repository {check_repo}",
                                fix="re-run `vpexport package ARTIFACT_DIR --triton OUT --force`")
        if not as_json:
            click.echo(f"{check_repo}: ok")
        return
    if not artifact_dir or not out:
        raise UserInputError("give ARTIFACT_DIR and --triton OUT (or --check REPO)", field="package",
                             fix="vpexport package artifacts/mini_vqa --triton triton_repo")
    from vpexport.package.triton import package_triton

    deploy = None
    if recipe_path:
        from vpexport.recipe import load_recipe

        deploy = load_recipe(recipe_path).deploy.triton.model_dump()
    overrides = {"mode": mode, "device": device, "max_batch_size": max_batch_size, "instances": instances}
    if any(v is not None for v in overrides.values()):
        if deploy is None:
            from vpexport.manifest import read_manifest

            deploy = (((read_manifest(artifact_dir, verify=False).get("recipe") or {}).get("deploy") or {})
                      .get("triton") or {})
        deploy = {**deploy, **{k: v for k, v in overrides.items() if v is not None}}
        if max_batch_size is not None and deploy.get("preferred_batch_sizes"):
            deploy["preferred_batch_sizes"] = [b for b in deploy["preferred_batch_sizes"] if b <= max_batch_size]
    from vpexport.artifact_lock import artifact_lock

    with artifact_lock(artifact_dir, "package", create=False):
        summary = package_triton(artifact_dir, out, deploy, force=force, threads=threads,
                                 log=lambda m: click.echo(m, err=True), provider=provider, precision=precision)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    d = summary["deploy"]
    click.echo(f"packaged {artifact_dir} -> {out} in {summary['seconds']} s "
               f"(mode {d['mode']}, {d['device']}, max_batch_size {d['max_batch_size']}, instances {d['instances']})")
    for name, m in summary["models"].items():
        kind = m.get("platform") or f"backend {m.get('backend')}"
        click.echo(f"  {name}: {kind}")
    click.echo(f"serve: tritonserver --model-repository {out}   (CPU here: see docs/triton.md)")

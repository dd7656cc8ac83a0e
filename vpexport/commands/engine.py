"""`vpexport engine ARTIFACT_DIR`: TensorRT plans from the exported ONNX (needs an NVIDIA GPU)."""

from __future__ import annotations

import json

import click


@click.command("engine")
@click.argument("artifact_dir", type=click.Path(file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Builder precision (default: the exported recipe's engine.precision, else fp16).")
@click.option("--workspace", "workspace_gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Workspace memory pool limit in GB (default: the recipe's engine.workspace_gb, else 4).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: loaded if present, saved after the build.")
@click.option("--version-compatible", is_flag=True, default=None,
              help="Build version-compatible plans (run on this or later TensorRT versions; can be slower).")
@click.option("--json", "as_json", is_flag=True, help="Print engines.json instead of the summary.")
def engine(artifact_dir, precision, workspace_gb, timing_cache, version_compatible, as_json):
    """Build one TensorRT plan per ONNX graph of ARTIFACT_DIR into ARTIFACT_DIR/engines/.

    Plans are tied to the GPU architecture and TensorRT version: build them on the machine that
    runs them (on Jetson, on the device). No torch is imported.
    """
    from vpexport.engine.build import build_engines
    from vpexport.engine.report import format_engines

    from vpexport.artifact_lock import artifact_lock

    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    with artifact_lock(artifact_dir, "engine", create=False):
        doc = build_engines(
            artifact_dir,
            precision=precision,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            version_compatible=version_compatible or None,
            echo=log,
        )
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(format_engines(doc))
        click.echo(f"next: vpexport run {artifact_dir} --provider tensorrt --image IMG --prompt TEXT")

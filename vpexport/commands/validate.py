"""`vpexport validate ARTIFACT_DIR [--json] [--samples N]`: artifacts vs the PyTorch model; exit 4 on any mismatch."""

from __future__ import annotations

import json

import click

from vpexport.commands.options import device_option

from vpexport.runtime.providers import NAMES as PROVIDER_NAMES, PRECISION_CHOICES


@click.command("validate")
@click.argument("artifact_dir", type=click.Path())
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Eval samples to compare (default validation.samples).")
@click.option("--provider", type=click.Choice(PROVIDER_NAMES), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="Inference precision for --provider openvino; below the export's precision the recipe's "
                   "validate.reduced_precision thresholds apply.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def validate(artifact_dir, samples, provider, precision, device, as_json):
    """Compare every ONNX output, kept index and greedy generation with the PyTorch model."""
    from vpexport.errors import UserInputError, ValidationFailed
    from vpexport.validate import format_report, validate_artifacts

    if samples is not None and samples < 1:
        raise UserInputError(f"--samples {samples} must be at least 1", field="--samples", fix="give a positive count")
    log = None if as_json else (lambda m: click.echo(m, err=True))
    from vpexport.artifact_lock import artifact_lock

    with artifact_lock(artifact_dir, "validate", create=False):
        report = validate_artifacts(artifact_dir, samples=samples, provider=provider, log=log, precision=precision,
                                    device=device)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["passed"]:
        first = report["failures"][0]
        more = len(report["failures"]) - 1
        raise ValidationFailed(
            f"{len(report['failures'])} mismatch(es) between artifacts and PyTorch: {first}"
            + (f" (and {more} more, listed above)" if more else ""),
            field="validate",
            fix="see the table above; re-export, or loosen validate.atol/rtol only if the precision warrants it",
        )

"""Options several commands share, spelled once."""

from __future__ import annotations

import click

from vpexport.model.device import DEVICE_HELP


def device_option(f):
    """`--device`: where the PyTorch model runs (overrides the recipe's model.device)."""
    return click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N", help=DEVICE_HELP)(f)


def batch_size_option(f):
    """`--batch-size` of the PyTorch passes; unset: 32 on the CPU, sized to a GPU's free memory."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=None,
                        help="Samples per PyTorch pass (default: 32 on the CPU, sized to the free memory on a GPU).")(f)


def apply_device(recipe, device: str | None):
    """The recipe with model.device set from --device (None: the recipe's own)."""
    if device is not None:
        from vpexport.model.device import check_spelling

        recipe.model.device = check_spelling(device, "--device")
    return recipe

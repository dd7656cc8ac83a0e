"""`vpexport testbed ...`: regenerate the mini data, train the mini LLaVA, make synthetic stand-ins."""

from __future__ import annotations

import json

import click

from vpexport.errors import UserInputError


@click.group("testbed")
def testbed():
    """Build, train and synthesise the testbed models and data."""


@testbed.command("data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (e.g. data/mini).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--n-train", default=0, show_default=True, type=int, help="Training images to write (0: none).")
@click.option("--n-calib", default=600, show_default=True, type=int)
@click.option("--n-eval", default=300, show_default=True, type=int)
def data_cmd(out, seed, n_train, n_calib, n_eval):
    """Write vqa/ and caption/ JSONL splits with PNG images, deterministically from --seed."""
    for name, v in (("--n-train", n_train), ("--n-calib", n_calib), ("--n-eval", n_eval)):
        if v < 0:
            raise UserInputError(f"must be >= 0 (got {v})", field=name)
    from vpexport.testbed.data import generate

    summary = generate(out, seed=seed, n_train=n_train, n_calib=n_calib, n_eval=n_eval)
    click.echo(json.dumps(summary))


@testbed.command("train")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=2500, show_default=True, type=int, help="Steps of the full-model stage.")
@click.option("--vision-steps", default=250, show_default=True, type=int, help="Steps of the vision stage.")
@click.option("--batch", default=32, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--save-every", default=250, show_default=True, type=int)
@click.option("--max-minutes", default=115.0, show_default=True, type=float, help="Stop (and save) after this.")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False))
@click.option("--caption-frac", default=0.5, show_default=True, type=float, help="Share of caption examples.")
@click.option("--init-from", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this checkpoint's weights (a second, continued phase).")
@click.option("--vqa-mix", default=None, metavar="KIND=W,...",
              help="Relative weights of the vqa question kinds (cell, where, exists, count); default "
                   "cell=0.4,where=0.2,exists=0.2,count=0.2.")
@click.option("--salience-layer", default=None, type=int,
              help="Also train one head of this decoder layer (--salience-head) to put the text tokens' "
                   "attention on the patches that hold digits (off by default).")
@click.option("--salience-head", default=1, show_default=True, type=int)
@click.option("--drop-background", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of examples in which most visual tokens without a digit are hidden.")
def train_cmd(out, seed, steps, vision_steps, batch, lr, threads, save_every, max_minutes, log_file, caption_frac,
              init_from, vqa_mix, salience_layer, salience_head, drop_background):
    """Train the mini LLaVA on both tasks (deterministic for a seed and thread count)."""
    if steps < 1 or batch < 1 or vision_steps < 0:
        raise UserInputError("--steps and --batch must be >= 1, --vision-steps >= 0", field="--steps")
    weights = _parse_vqa_mix(vqa_mix)
    from vpexport.testbed.train import train

    train(out, seed=seed, steps=steps, vision_steps=vision_steps, batch=batch, lr=lr, threads=threads,
          save_every=save_every, max_minutes=max_minutes, log_file=log_file, caption_frac=caption_frac,
          init_from=init_from, vqa_weights=weights, salience_layer=salience_layer, salience_head=salience_head,
          drop_background=drop_background)
    click.echo(f"saved {out}")


def _parse_vqa_mix(text: str | None) -> tuple[float, ...]:
    from vpexport.testbed.data import VQA_KINDS, VQA_WEIGHTS

    if not text:
        return VQA_WEIGHTS
    mix = dict.fromkeys(VQA_KINDS, 0.0)
    for part in text.split(","):
        kind, _, w = part.partition("=")
        kind = kind.strip()
        if kind not in mix:
            raise UserInputError(f"unknown question kind {kind!r}; use {', '.join(VQA_KINDS)}", field="--vqa-mix")
        try:
            mix[kind] = float(w)
        except ValueError:
            raise UserInputError(f"weight of {kind!r} is not a number: {w!r}", field="--vqa-mix") from None
    total = sum(mix.values())
    if total <= 0 or min(mix.values()) < 0:
        raise UserInputError("weights must be >= 0 with a positive sum, e.g. cell=0.3,where=0.3,exists=0.3,count=0.1",
                             field="--vqa-mix")
    return tuple(mix[k] / total for k in VQA_KINDS)


@testbed.command("eval")
@click.option("--model", "ckpt", default="vpexport/testbed/checkpoints/mini-llava", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--data", "jsonl", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--limit", default=None, type=int)
@click.option("--drop-keep", default=None, type=float, help="Keep this random fraction of visual tokens.")
@click.option("--drop-layer", default=2, show_default=True, type=int)
def eval_cmd(ckpt, jsonl, limit, drop_keep, drop_layer):
    """Greedy HF generation on a JSONL split: exact match and token F1 (testbed helper)."""
    if drop_keep is not None and not 0 < drop_keep <= 1:
        raise UserInputError(f"must be in (0, 1] (got {drop_keep})", field="--drop-keep")
    from vpexport.testbed.evaluate import evaluate

    click.echo(json.dumps(evaluate(ckpt, jsonl, limit=limit, drop_keep=drop_keep, drop_layer=drop_layer), indent=2))


@testbed.command("synth")
@click.option("--arch", required=True, help="A built-in architecture: llava-1.5-7b, llava-1.5-13b, qwen2-vl-2b, "
              "qwen2.5-vl-3b, qwen2.5-vl-7b.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--layers", default=None, type=int, help="Fewer decoder layers (speed work).")
@click.option("--hidden", default=None, type=int, help="Smaller text width (speed work).")
@click.option("--vision-layers", default=None, type=int, help="Fewer vision-tower layers (default: the exact count).")
@click.option("--image-size", default=None, help="HxW pixels the Qwen stand-in's recipes use (default 448x448).")
@click.option("--dtype", default="fp16", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda|cuda:N",
              help="Where the random weights are drawn (a GPU draws a 7B model in seconds; its random "
                   "stream differs from the CPU's, so the weights differ for the same seed).")
def synth_cmd(arch, out, layers, hidden, vision_layers, image_size, dtype, seed, device):
    """Random-weight stand-in of a built-in architecture (exact unless reduced). No quality figure
    comes from it."""
    from vpexport.testbed.synth import synth_config

    synth_config(arch, layers, hidden, vision_layers)  # validate before importing torch
    from vpexport.model.device import check_spelling

    device = check_spelling(device, "--device")
    size = None
    if image_size is not None:
        parts = image_size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UserInputError(f"--image-size {image_size!r} is not HxW", field="--image-size",
                                 fix="give e.g. 896x896")
        size = (int(parts[0]), int(parts[1]))
    from vpexport.testbed.synth import synth

    meta = synth(arch, out, layers=layers, hidden=hidden, vision_layers=vision_layers, dtype=dtype, seed=seed,
                 image_size=size, device=device)
    click.echo(f"saved {out} ({meta['parameters']:,} parameters, random weights: no quality figure comes from it)")

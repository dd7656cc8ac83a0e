"""`vpexport bench ARTIFACT_DIR`: pruned vs unpruned on each provider, and the peers, in one run.
`vpexport bench RECIPE`: the pruned PyTorch model vs the unpruned one on --device."""

from __future__ import annotations

import json

import click

from vpexport.bench.runner import PEERS
from vpexport.commands.options import device_option
from vpexport.runtime.providers import NAMES as PROVIDER_NAMES, PRECISION_CHOICES


@click.command()
@click.argument("artifact_dir", metavar="ARTIFACT_DIR|RECIPE", type=click.Path())
@click.option("--provider", "providers", multiple=True, type=click.Choice(PROVIDER_NAMES),
              help="Runtime of the artifacts; repeat to compare several (default: cpu).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="Inference precision for providers and peers that choose one (openvino, openvino-genai).")
@click.option("--peer", "peers", multiple=True, type=click.Choice(list(PEERS)),
              help="What a user would run instead, timed in the same loop; repeat (default: hf-pytorch).")
@click.option("--cdpruner-keep", "cdpruner_keep", multiple=True, type=click.IntRange(min=1),
              help="Visual tokens OpenVINO GenAI's CDPruner keeps (openvino-genai-cdpruner); repeat "
                   "(default: each keep budget of the schedule).")
@click.option("--reps", type=click.IntRange(min=1), default=10, show_default=True, help="Interleaved repetitions per variant.")
@click.option("--decode-steps", type=click.IntRange(min=0), default=16, show_default=True, help="Greedy decode steps timed per repetition.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for every runtime (default: all cores).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--no-hf", is_flag=True, help="Leave out the Hugging Face PyTorch peer.")
@click.option("--no-memory", is_flag=True, help="Skip the per-variant peak-memory subprocesses.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--save", type=click.Path(), default=None, help="Also write the JSON result to this file.")
@device_option
def bench(artifact_dir, providers, precision, peers, cdpruner_keep, reps, decode_steps, threads, batch, no_hf, no_memory,
          as_json, save, device):
    """Time ARTIFACT_DIR against the same model exported without pruning (same runtime, same
    threads), and against the peers, interleaved in one run.

    Given a RECIPE file instead, time the pruned PyTorch model (vision + prefill) against the
    unpruned one on --device (default: the recipe's model.device), e.g. on a GPU where the
    artifacts' runtimes are not installed."""
    from pathlib import Path

    if Path(artifact_dir).is_file():
        return _bench_recipe(artifact_dir, providers, peers, reps, threads, batch, as_json, save, device)
    if device is not None:
        from vpexport.errors import UserInputError

        raise UserInputError("--device places the PyTorch model of `bench RECIPE`; an artifact folder runs on "
                             "--provider", field="--device", fix="drop --device, or pass the recipe file")
    from vpexport.bench.runner import run_bench

    peers = list(peers) if peers else ["hf-pytorch"]
    if no_hf:
        peers = [p for p in peers if p != "hf-pytorch"]
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    from vpexport.artifact_lock import artifact_lock

    with artifact_lock(artifact_dir, "bench", create=False):
        res = run_bench(artifact_dir, reps, decode_steps, threads, batch, tuple(providers or ("cpu",)), tuple(peers),
                        precision, not no_memory, log=log, cdpruner_keep=tuple(cdpruner_keep))
    if save:
        from pathlib import Path

        Path(save).write_text(json.dumps(res, indent=2))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(format_result(res))
    click.echo(f"next: vpexport bench {artifact_dir} --json --save bench.json")


def _bench_recipe(path, providers, peers, reps, threads, batch, as_json, save, device):
    from vpexport.bench.torch_bench import format_torch_result, run_torch_bench
    from vpexport.commands.options import apply_device
    from vpexport.errors import UserInputError
    from vpexport.recipe import load_recipe

    if providers or peers:
        raise UserInputError("--provider and --peer time artifact folders; a recipe times its PyTorch model",
                             field="--provider" if providers else "--peer",
                             fix="drop them, or pass the artifact folder from `vpexport build`")
    recipe = apply_device(load_recipe(path), device)
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    if recipe.model.synth is not None:
        from vpexport.build import ensure_model

        ensure_model(recipe, log)  # a stand-in recipe creates its random-weight model when missing
        recipe = apply_device(load_recipe(path), recipe.model.device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    res = run_torch_bench(recipe, reps=reps, batch=batch, log=log)
    if save:
        from pathlib import Path

        Path(save).write_text(json.dumps(res, indent=2))
    click.echo(json.dumps(res, indent=2) if as_json else format_torch_result(res))


def format_result(res: dict) -> str:
    f = res["flops"]
    lines = [f"\n{res['recipe']}: {res['threads']} threads, batch {res['batch']}, {res['reps']} reps, "
             f"{res['decode_steps']} decode steps; {res['device']}",
             f"{'variant':34}{'precision':>10}{'TTFT ms':>10}{'prefill ms':>12}{'decode ms/tok':>15}{'peak MiB':>10}"]

    def row(name, prec, ttft, prefill, dec, mem):
        fmt = lambda x, w: f"{x:>{w}.1f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{name:34}{prec:>10}{fmt(ttft, 10)}{fmt(prefill, 12)}{fmt(dec, 15)}{fmt(mem, 10)}")

    for p, r in res["providers"].items():
        d, m = r.get("decode", {}), r.get("memory", {})
        row(f"{p} pruned", r["precision"], r["ttft"]["pruned_ms"], r["prefill"]["pruned_ms"],
            d.get("pruned_ms_per_token"), m.get("pruned_peak_mb"))
        row(f"{p} unpruned", r["precision"], r["ttft"]["dense_ms"], r["prefill"]["dense_ms"],
            d.get("dense_ms_per_token"), m.get("dense_peak_mb"))
    for k, r in res["peers"].items():
        label = (f"peer openvino_genai CDPruner {r['visual_tokens']}" if "pruning_ratio" in r
                 else f"peer {k} (unpruned)")
        row(label, r["precision"], r["ttft_ms"], r.get("prefill_ms"), r.get("decode_ms_per_token"),
            r.get("peak_mb"))
    for k, why in res.get("peers_skipped", {}).items():
        lines.append(f"peer {k} skipped: {why}")
    from vpexport.accounting.flops import tokens_label

    basis = (f", at the timed length ({tokens_label(f['tokens'])}: the text at the graphs' width; `plan` and "
             "`eval` give the ratio at the recipe's prompt)" if "tokens" in f else "")
    lines.append(f"exact prefill FLOPs ratio {f['ratio']:.3f}: pruned {f['pruned']:.3g}, unpruned {f['dense']:.3g}{basis}")
    for p, r in res["providers"].items():
        lines.append(f"{p}: prefill latency ratio {r['prefill']['latency_ratio']:.3f} = "
                     f"{r['prefill']['latency_over_flops']:.3f} x the FLOPs ratio")
    b = res["best"]
    vs = ", ".join(f"{k[8:]} {v:.3f}x" for k, v in b.items() if k.startswith("ttft_vs_"))
    lines.append(f"best: {b['provider']} ({b['precision']}), TTFT {b['ttft_ms']:.1f} ms"
                 + (f" ({vs} of the peers' TTFT)" if vs else ""))
    return "\n".join(lines)

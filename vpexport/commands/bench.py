"""`vpexport bench ARTIFACT_DIR`: pruned vs unpruned latency, memory, FLOPs and KV ratios."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("artifact_dir", type=click.Path())
@click.option("--reps", type=int, default=10, show_default=True, help="Interleaved repetitions per variant.")
@click.option("--decode-steps", type=int, default=16, show_default=True, help="Greedy decode steps timed per repetition.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every runtime (default: all cores).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--no-hf", is_flag=True, help="Skip timing the Hugging Face PyTorch model.")
@click.option("--no-memory", is_flag=True, help="Skip the per-variant peak-memory subprocesses.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--save", type=click.Path(), default=None, help="Also write the JSON result to this file.")
def bench(artifact_dir, reps, decode_steps, threads, batch, no_hf, no_memory, as_json, save):
    """Benchmark ARTIFACT_DIR against the same model exported without pruning (same runtime, same threads)."""
    from vpexport.bench.runner import run_bench

    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    res = run_bench(artifact_dir, reps, decode_steps, threads, batch, not no_hf, not no_memory, log=log)
    if save:
        from pathlib import Path

        Path(save).write_text(json.dumps(res, indent=2))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    p, d, f = res["prefill"], res["decode"], res["flops"]
    click.echo(f"\n{res['recipe']}  {res['runtime']}, {res['threads']} threads, batch {res['batch']}, device: {res['device']}")
    click.echo(f"{'':28}{'pruned':>12}{'unpruned':>12}{'ratio':>9}")
    click.echo(f"{'prefill (ms)':28}{p['pruned_ms']:>12.2f}{p['dense_ms']:>12.2f}{p['latency_ratio']:>9.3f}")
    t = res["ttft"]
    click.echo(f"{'vision + prefill (ms)':28}{t['pruned_ms']:>12.2f}{t['dense_ms']:>12.2f}{t['latency_ratio']:>9.3f}")
    click.echo(f"{'decode (ms / token)':28}{d['pruned_ms_per_token']:>12.2f}{d['dense_ms_per_token']:>12.2f}{d['latency_ratio']:>9.3f}")
    click.echo(f"{'prefill FLOPs (exact)':28}{f['pruned']:>12.3g}{f['dense']:>12.3g}{f['ratio']:>9.3f}")
    k = res["kv_cache"]
    click.echo(f"{'KV cache (bytes)':28}{k['pruned_bytes']:>12.3g}{k['dense_bytes']:>12.3g}{k['ratio']:>9.3f}")
    if "memory" in res:
        m = res["memory"]
        click.echo(f"{'peak RSS (MiB)':28}{m['pruned_peak_mb']:>12.1f}{m['dense_peak_mb']:>12.1f}{m['ratio']:>9.3f}")
    click.echo(f"prefill latency ratio / FLOPs ratio = {p['latency_over_flops']:.3f}")
    if "hf_pytorch" in res:
        h = res["hf_pytorch"]
        click.echo(
            f"HF PyTorch unpruned: prefill {h['prefill_ms']:.2f} ms ({h['prefill_speedup']:.2f}x slower than pruned ONNX), "
            f"vision+prefill {h['ttft_ms']:.2f} ms ({h['ttft_speedup']:.2f}x)"
        )
    click.echo(f"next: vpexport bench {artifact_dir} --json --save bench.json")

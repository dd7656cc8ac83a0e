"""`vpexport bench RECIPE`: the pruned PyTorch model against the same model unpruned, on the
recipe's model.device (or --device), interleaved in one run. What the artifacts cannot show where
no runtime of them exists (a GPU without TensorRT or onnxruntime-gpu): the prefill time pruning saves
in the PyTorch rewrite itself, against the exact FLOPs ratio at the timed layout.

Both variants are `PrunedModel`s over one loaded checkpoint (the unpruned one with no prune point):
same kernels, same attention blocks, the text padded to export.text_length.max as in the exported
graphs. Times are wall-clock around each call after a device synchronize (CUDA calls return before
their kernels finish); medians of the repetitions after the warm-up rounds.
"""

from __future__ import annotations

import time
from dataclasses import replace

from vpexport.bench.runner import _median_ms

VARIANTS = ("pruned", "unpruned")


def run_torch_bench(recipe, reps: int = 10, batch: int = 1, warmup: int = 2, log=print) -> dict:
    """Vision + prefill of the recipe's schedule and of the unpruned model, alternating per
    repetition (the order rotated), each repetition on other eval samples."""
    import torch

    from vpexport.accounting import prefill_flops
    from vpexport.bench.runner import bench_requests
    from vpexport.model.device import synchronize
    from vpexport.model.loading import encode
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.model.pruned import PrunedModel
    from vpexport.paths import resolve_schedule
    from vpexport.pruning.schedule import Schedule

    arch = recipe.resolve_arch()
    sched = resolve_schedule(recipe, arch)
    pipe = TorchPipeline.from_recipe(recipe, sched, log=log)
    dev = pipe.device_info
    models = {"pruned": pipe.pruned,
              "unpruned": PrunedModel(pipe.model, Schedule("none"), pipe.prefix, image_size=pipe.image_size)}
    text = recipe.export.text_length.max
    seq = pipe.prefix + pipe.pruned.visual_tokens + text
    layout = replace(recipe.layout(arch, batch=batch), text=text)
    flops = prefill_flops(arch, sched, layout)
    requests = bench_requests(recipe, reps + warmup, batch)
    encoded = []
    for r in requests:
        ids, mask, px = encode(pipe.processor, pipe.template, r.questions, r.images, pad_to=seq, check_words=False)
        encoded.append(tuple(t.to(pipe.device) for t in (ids, mask, px)))
    times = {v: {"vision": [], "prefill": [], "ttft": []} for v in VARIANTS}
    log(f"[bench] PyTorch on {dev.describe()}, {recipe.model.dtype}, batch {batch}, {seq} tokens, "
        f"{reps} reps after {warmup} warm-up")
    with torch.inference_mode():
        for i, (ids, mask, px) in enumerate(encoded):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for v in order:
                pm = models[v]
                synchronize(dev)
                t0 = time.perf_counter()
                feats = pm.encode_image(px)
                synchronize(dev)
                t1 = time.perf_counter()
                pm.prefill(ids, mask, feats)
                synchronize(dev)
                t2 = time.perf_counter()
                if i >= warmup:
                    times[v]["vision"].append(t1 - t0)
                    times[v]["prefill"].append(t2 - t1)
                    times[v]["ttft"].append(t2 - t0)
    med = {v: {k: _median_ms(xs) for k, xs in t.items()} for v, t in times.items()}
    ratio = med["pruned"]["prefill"] / med["unpruned"]["prefill"]
    result = {
        "recipe": recipe.name,
        "runtime": "pytorch",
        "torch": {**dev.record(), "dtype": recipe.model.dtype, "version": torch.__version__,
                  "cuda": torch.version.cuda if dev.is_cuda else None},
        "batch": batch,
        "reps": reps,
        "warmup": warmup,
        "layout": layout.to_dict(),
        "schedule": sched.to_dict(),
        "flops": {"dense": flops["dense"], "pruned": flops["pruned"], "ratio": round(flops["ratio"], 4),
                  "tokens": flops["tokens"]},
        "pruned": med["pruned"],
        "unpruned": med["unpruned"],
        "prefill": {"latency_ratio": round(ratio, 4), "latency_over_flops": round(ratio / flops["ratio"], 4),
                    "speedup": round(1 / ratio, 3)},
        "ttft": {"speedup": round(med["unpruned"]["ttft"] / med["pruned"]["ttft"], 3)},
        "raw_ms": {v: {k: [round(x * 1e3, 3) for x in xs] for k, xs in t.items()} for v, t in times.items()},
    }
    if dev.is_cuda:
        result["torch"]["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev.torch) / 2**20, 1)
    return result


def format_torch_result(r: dict) -> str:
    t, f = r["torch"], r["flops"]
    lines = [f"\n{r['recipe']}: PyTorch {t['version']} on {t['device']} ({t['name']}), {t['dtype']}, batch "
             f"{r['batch']}, {r['layout']['prefix'] + r['layout']['visual'] + r['layout']['text']} tokens, "
             f"{r['reps']} reps",
             f"{'variant':12}{'vision ms':>12}{'prefill ms':>12}{'TTFT ms':>12}"]
    for v in VARIANTS:
        m = r[v]
        lines.append(f"{v:12}{m['vision']:>12.2f}{m['prefill']:>12.2f}{m['ttft']:>12.2f}")
    lines.append(f"exact prefill FLOPs ratio {f['ratio']:.3f}; prefill latency ratio {r['prefill']['latency_ratio']:.3f} "
                 f"= {r['prefill']['latency_over_flops']:.3f} x the FLOPs ratio (prefill {r['prefill']['speedup']:.2f}x "
                 f"faster, TTFT {r['ttft']['speedup']:.2f}x)")
    return "\n".join(lines)

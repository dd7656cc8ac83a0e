"""`vpexport bench`: pruned artifacts against the same model exported without pruning.

Both variants run in one process on the same runtime, provider and thread count, with
interleaved repetitions (A B B A ...), so machine noise hits both alike; medians are reported.
The Hugging Face PyTorch model (unpruned, SDPA) is timed on the same inputs. Peak memory is
measured per variant in a fresh subprocess (VmHWM of a process that only loads and runs it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError

DENSE_SUBDIR = Path("bench") / "dense"


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def _inputs(rt, recipe, batch: int):
    """The recipe's first eval samples (or a blank image) in the exported layout."""
    from PIL import Image

    from vpexport.data import load_samples
    from vpexport.runtime.preprocess import load_image

    if recipe.task.data.eval:
        samples = load_samples(recipe.task.data.eval, limit=batch, field="task.data.eval")
        images = [load_image(s.image, field="task.data.eval") for s in samples]
        questions = [s.question for s in samples]
    else:
        images, questions = [], []
    size = 336
    while len(images) < batch:
        images.append(Image.new("RGB", (size, size), (127, 127, 127)))
        questions.append("What is in the image?")
    return rt.encode(images, questions)


def ensure_dense_export(artifact_dir: Path, recipe, log=print) -> Path:
    """The unpruned export of the same recipe (cached under bench/dense/, keyed by the recipe)."""
    from vpexport.export.onnx_export import export_artifacts
    from vpexport.pruning.schedule import Schedule

    dense = artifact_dir / DENSE_SUBDIR
    key = json.dumps(recipe.resolved(), sort_keys=True, default=str)
    stamp = dense / "bench_key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and (dense / "manifest.json").is_file():
        return dense
    log(f"[bench] exporting the unpruned reference into {dense}")
    tmp = dense.with_name(dense.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    export_artifacts(recipe, tmp, Schedule("none"), log=log)
    (tmp / "bench_key.json").write_text(json.dumps({"key": key}))
    if dense.exists():
        import shutil

        shutil.rmtree(dense)
    tmp.rename(dense)
    return dense


def _time_prefill(rt, ids, mask, feats):
    t0 = time.perf_counter()
    out = rt.prefill(ids, mask, feats)
    return time.perf_counter() - t0, out


def _time_decode(rt, out, mask, steps: int):
    """Mean seconds per greedy decode step over `steps` steps from a prefill result."""
    head = rt.prefix + rt.visual
    b = mask.shape[0]
    text_mask = mask[:, head:].astype(np.int64)
    pos = (head + out.text_len).astype(np.int64)[:, None]
    logits, kv = out.logits, out.kv
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits.argmax(-1).astype(np.int64)[:, None]
        text_mask = np.concatenate([text_mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        logits, kv = rt.decode(nxt, pos, text_mask, kv)
        pos = pos + 1
    return (time.perf_counter() - t0) / steps


def peak_memory_mb(artifact_dir: Path, threads: int, batch: int, steps: int) -> float:
    """Peak RSS (MiB) of a fresh process that opens the artifacts and runs prefill + decode."""
    code = (
        "import sys,json; from vpexport.bench.runner import _child_run; "
        f"_child_run({str(artifact_dir)!r}, {threads}, {batch}, {steps})"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise ArtifactError(f"memory probe failed: {res.stderr.strip().splitlines()[-1:]}", field="bench")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"])


def _child_run(artifact_dir: str, threads: int, batch: int, steps: int) -> None:
    from vpexport.recipe import load_recipe
    from vpexport.runtime.generate import ArtifactRuntime

    rt = ArtifactRuntime.open(artifact_dir, threads=threads, verify=False)
    recipe = load_recipe(Path(artifact_dir) / "recipe.resolved.yaml", check=False)
    ids, mask, px = _inputs(rt, recipe, batch)
    out = rt.prefill(ids, mask, rt.encode_image(px))
    _time_decode(rt, out, mask, steps)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"peak_mb": hwm / 1024}))


class _HfReference:
    """Hugging Face LlavaForConditionalGeneration (unpruned, SDPA): decoder prefill and full TTFT."""

    def __init__(self, recipe, ids, mask, px, threads: int):
        import torch

        from vpexport.model.loading import image_embeds, load_llava

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = load_llava(recipe.model_dir, recipe.model.dtype)
        self.ids, self.mask, self.px = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(px)
        with torch.inference_mode():
            self.emb = image_embeds(self.model, self.ids, self.px)

    def prefill(self):
        with self.torch.inference_mode():
            self.model(inputs_embeds=self.emb, attention_mask=self.mask, logits_to_keep=1)

    def ttft(self):
        with self.torch.inference_mode():
            self.model(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.px, logits_to_keep=1)


def run_bench(
    artifact_dir: str | Path,
    reps: int = 10,
    decode_steps: int = 16,
    threads: int | None = None,
    batch: int = 1,
    with_hf: bool = True,
    with_memory: bool = True,
    log=print,
) -> dict:
    from vpexport.accounting import kv_cache_bytes, prefill_flops
    from vpexport.manifest import read_manifest
    from vpexport.recipe import load_recipe
    from vpexport.runtime.generate import ArtifactRuntime

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    recipe = load_recipe(artifact_dir / "recipe.resolved.yaml")
    threads = threads or (os.cpu_count() or 1)
    dense_dir = ensure_dense_export(artifact_dir, recipe, log=log)

    pruned_rt = ArtifactRuntime.open(artifact_dir, threads=threads)
    dense_rt = ArtifactRuntime.open(dense_dir, threads=threads)
    ids, mask, px = _inputs(pruned_rt, recipe, batch)
    feats = pruned_rt.encode_image(px)

    # The HF reference runs inside the same interleaved loop, its prefill and its vision + prefill in
    # separate slots between the ONNX variants (pruned, hf prefill, dense, hf ttft, pruned, ...):
    # every timed call follows another model's run, so none finds its own weights still warm in the
    # cache (the ONNX prefill run right after itself was measured ~12% faster, HF's vision + prefill
    # right after its prefill ~9%). Without HF, the two variants alternate A B, B A.
    hf = _HfReference(recipe, ids, mask, px, threads) if with_hf else None
    # Warm-up (first runs allocate and pick kernels), then interleaved repetitions.
    for rt in (pruned_rt, dense_rt):
        for _ in range(2):
            rt.prefill(ids, mask, feats)
    if hf is not None:
        hf.prefill(), hf.ttft()
    times = {"pruned": {"vision": [], "prefill": [], "decode": []}, "dense": {"vision": [], "prefill": [], "decode": []}}
    hf_times = {"prefill": [], "ttft": []}
    variants = {"pruned": pruned_rt, "dense": dense_rt}
    cycle = ("pruned", "hf_prefill", "dense", "hf_ttft") if hf is not None else None
    log(f"[bench] {reps} interleaved repetitions ({', '.join(cycle or variants)}), {threads} threads, "
        f"batch {batch}, {decode_steps} decode steps")
    for r in range(reps):
        order = cycle or (("pruned", "dense") if r % 2 == 0 else ("dense", "pruned"))
        for name in order:
            if name.startswith("hf_"):
                key = name[3:]
                t0 = time.perf_counter()
                getattr(hf, key)()
                hf_times[key].append(time.perf_counter() - t0)
                continue
            rt = variants[name]
            t0 = time.perf_counter()
            f = rt.encode_image(px)
            times[name]["vision"].append(time.perf_counter() - t0)
            dt, out = _time_prefill(rt, ids, mask, f)
            times[name]["prefill"].append(dt)
            times[name]["decode"].append(_time_decode(rt, out, mask, decode_steps))
    med = {v: {k: _median_ms(xs) for k, xs in t.items()} for v, t in times.items()}

    arch = recipe.resolve_arch()
    from vpexport.paths import resolve_schedule

    sched = resolve_schedule(recipe, arch, artifact_dir)
    # FLOPs of what the graphs execute: in padded mode the text part is always export.text_length.max.
    from dataclasses import replace

    layout = recipe.layout(arch, batch=batch)
    if pruned_rt.padded:
        layout = replace(layout, text=pruned_rt.text_max)
    flops = prefill_flops(arch, sched, layout)
    kv = kv_cache_bytes(arch, sched, layout, dtype="float32" if recipe.export.precision == "fp32" else "float16")
    result = {
        "artifact": str(artifact_dir),
        "recipe": recipe.name,
        "device": _cpu_name(),
        "runtime": f"onnxruntime {_ort_version()} CPUExecutionProvider",
        "threads": threads,
        "batch": batch,
        "reps": reps,
        "decode_steps": decode_steps,
        "schedule": sched.to_dict(),
        "layout": layout.to_dict(),
        "prefill": {
            "pruned_ms": med["pruned"]["prefill"],
            "dense_ms": med["dense"]["prefill"],
            "latency_ratio": round(med["pruned"]["prefill"] / med["dense"]["prefill"], 4),
        },
        "ttft": {
            "pruned_ms": round(med["pruned"]["vision"] + med["pruned"]["prefill"], 3),
            "dense_ms": round(med["dense"]["vision"] + med["dense"]["prefill"], 3),
        },
        "decode": {
            "pruned_ms_per_token": med["pruned"]["decode"],
            "dense_ms_per_token": med["dense"]["decode"],
            "latency_ratio": round(med["pruned"]["decode"] / med["dense"]["decode"], 4),
        },
        "flops": {"dense": flops["dense"], "pruned": flops["pruned"], "ratio": round(flops["ratio"], 4)},
        "kv_cache": {"dense_bytes": kv["dense_bytes"], "pruned_bytes": kv["pruned_bytes"], "ratio": round(kv["ratio"], 4)},
        "raw_ms": {v: {k: [round(x * 1e3, 3) for x in xs] for k, xs in t.items()} for v, t in times.items()},
    }
    result["ttft"]["latency_ratio"] = round(result["ttft"]["pruned_ms"] / result["ttft"]["dense_ms"], 4)
    result["prefill"]["latency_over_flops"] = round(result["prefill"]["latency_ratio"] / result["flops"]["ratio"], 4)
    if with_memory:
        log("[bench] peak memory (fresh process per variant)")
        pm = peak_memory_mb(artifact_dir, threads, batch, decode_steps)
        dm = peak_memory_mb(dense_dir, threads, batch, decode_steps)
        result["memory"] = {"pruned_peak_mb": round(pm, 1), "dense_peak_mb": round(dm, 1), "ratio": round(pm / dm, 4)}
    if hf is not None:
        hf_ms = {"prefill_ms": _median_ms(hf_times["prefill"]), "ttft_ms": _median_ms(hf_times["ttft"])}
        log(f"[bench] hf pytorch: prefill {hf_ms['prefill_ms']} ms, vision+prefill {hf_ms['ttft_ms']} ms")
        result["hf_pytorch"] = {
            **hf_ms,
            "prefill_speedup": round(hf_ms["prefill_ms"] / result["prefill"]["pruned_ms"], 3),
            "ttft_speedup": round(hf_ms["ttft_ms"] / result["ttft"]["pruned_ms"], 3),
            "dense_onnx_prefill_speedup": round(hf_ms["prefill_ms"] / result["prefill"]["dense_ms"], 3),
        }
        result["raw_ms"]["hf"] = {k: [round(x * 1e3, 3) for x in xs] for k, xs in hf_times.items()}
    result["manifest_schedule"] = manifest.get("schedule")
    return result


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"

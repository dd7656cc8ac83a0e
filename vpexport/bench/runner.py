"""`vpexport bench`: pruned artifacts against the same model unpruned, on every runtime asked for,
and against the peers a user would run instead, side by side in one interleaved run.

Variants, all in one process with the same thread count:
  providers   for each --provider (vpexport/runtime/providers.py): the pruned artifacts and the
              same recipe exported without pruning (bench/dense/), on that provider
  peers       PEERS below: openvino-genai (the same checkpoint exported by optimum-intel, run by
              `openvino_genai.VLMPipeline`, unpruned), openvino-genai-cdpruner (the same pipeline
              with OpenVINO GenAI's own CDPruner, which prunes before the LLM, at each kept count
              of --cdpruner-keep; default: every keep budget of the schedule), hf-pytorch (the
              family's Hugging Face model, unpruned, SDPA)

Repetition r times every variant once, on eval sample r (a distinct image and question per
repetition: OpenVINO GenAI reuses the KV state of a repeated image), in an order rotated by r, so
each variant follows a different one each time and none finds only its own weights warm in the
cache; an untimed pause between calls keeps one runtime's spinning threads out of the next one's
time. Medians are reported. TTFT is the time from image + question to the first token's logits:
tokenizer and preprocessing, vision, prefill (OpenVINO GenAI's TTFT spans the same steps). Peak
RSS is measured per variant in a fresh process (VmHWM of a process that only loads and runs it).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError, UserInputError

DENSE_SUBDIR = Path("bench") / "dense"
WARMUP = 2
# Untimed pause between two variants' calls. ONNX Runtime's pool threads keep spinning for a while
# after a run; without the pause they ran into the next variant's time (OpenVINO's vision graph took
# ~88 ms right after an ONNX Runtime run, ~56 ms 50 ms later, on the 2-core development machine).
PAUSE_S = 0.1


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


# --------------------------------------------------------------------------- inputs
@dataclass
class Request:
    images: list
    questions: list


def bench_requests(recipe, count: int, batch: int) -> list[Request]:
    """`count` requests of `batch` distinct eval samples each (cycling when the split is short; a
    blank image only when the recipe has no eval split)."""
    from PIL import Image

    from vpexport.data import load_samples

    need = count * batch
    if recipe.task.data.eval:
        samples = load_samples(recipe.task.data.eval, limit=need, field="task.data.eval")
        pairs = [(s.load_image("task.data.eval"), s.question) for s in samples]
    else:
        pairs = []
    if not pairs:
        pairs = [(Image.new("RGB", (336, 336), (127, 127, 127)), "What is in the image?")]
    pairs = [pairs[i % len(pairs)] for i in range(need)]
    return [Request([p[0] for p in pairs[i : i + batch]], [p[1] for p in pairs[i : i + batch]])
            for i in range(0, need, batch)]


def exporter_fingerprint() -> str:
    """sha256 of the code that shapes the exported graphs (vpexport/model, vpexport/export): an
    unpruned reference exported by other code would time other graphs than the pruned ones."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ("model", "export"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_dense_export(artifact_dir: Path, recipe, log=print) -> Path:
    """The unpruned export of the same recipe (cached under bench/dense/, keyed by the recipe and
    `exporter_fingerprint`)."""
    import shutil

    from vpexport.export.onnx_export import export_artifacts
    from vpexport.pruning.schedule import Schedule

    dense = artifact_dir / DENSE_SUBDIR
    key = json.dumps({"recipe": recipe.resolved(), "exporter": exporter_fingerprint()}, sort_keys=True, default=str)
    stamp = dense / "bench_key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and (dense / "manifest.json").is_file():
        graphs = json.loads((dense / "manifest.json").read_text()).get("export", {}).get("graphs", {})
        outs = [o["name"] for o in graphs.get("decode", {}).get("outputs", [])]
        if "new.0.key" in outs:  # an older export's decode returns whole caches: export again
            return dense
    log(f"[bench] exporting the unpruned reference into {dense}")
    tmp = dense.with_name(dense.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    export_artifacts(recipe, tmp, Schedule("none"), log=log)
    (tmp / "bench_key.json").write_text(json.dumps({"key": key}))
    if dense.exists():
        shutil.rmtree(dense)
    tmp.rename(dense)
    return dense


# --------------------------------------------------------------------------- variants
@dataclass
class _Times:
    ttft: list = field(default_factory=list)
    encode: list = field(default_factory=list)
    vision: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)  # seconds per token

    def medians(self) -> dict:
        return {k: _median_ms(v) for k, v in self.__dict__.items() if v and not any(map(math.isnan, v))}

    def raw(self) -> dict:
        return {k: [round(x * 1e3, 3) for x in v] for k, v in self.__dict__.items() if v}


class _Artifacts:
    """One artifact folder on one provider: encode -> vision -> prefill, then decode steps."""

    def __init__(self, directory: Path, provider: str, precision: str, threads: int):
        from vpexport.runtime.generate import ArtifactRuntime

        self.rt = ArtifactRuntime.open(directory, provider=provider, threads=threads, precision=precision)
        self.precision = self.rt.precision

    def run(self, req: Request, steps: int, t: _Times | None) -> None:
        rt = self.rt
        t0 = time.perf_counter()
        ids, mask, px = rt.encode(req.images, req.questions)
        t1 = time.perf_counter()
        feats = rt.encode_image(px)
        t2 = time.perf_counter()
        out = rt.prefill(ids, mask, feats)
        t3 = time.perf_counter()
        cache = rt.start_cache(out, mask, steps)
        pos = (rt.text_pos0 + out.text_len).astype(np.int64)[:, None]
        logits = out.logits
        t4 = time.perf_counter()
        for _ in range(steps):
            logits = rt.decode(logits.argmax(-1).astype(np.int64)[:, None], pos, cache)
            pos = pos + 1
        t5 = time.perf_counter()
        if t is not None:
            t.encode.append(t1 - t0), t.vision.append(t2 - t1), t.prefill.append(t3 - t2)
            t.ttft.append(t3 - t0)
            t.decode.append((t5 - t4) / steps if steps else float("nan"))


class _HfPeer:
    """Hugging Face LlavaForConditionalGeneration (unpruned, SDPA): processor + vision + prefill."""

    name = "hf_pytorch"

    def __init__(self, recipe, threads: int, batch: int):
        import torch

        from vpexport.model.loading import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, self.processor = load_model(recipe.model_dir, recipe.model.dtype, recipe.model.image_size)
        self.template = recipe.task.prompt
        self.precision = str(recipe.model.dtype)
        self.version = f"transformers {__import__('transformers').__version__}, torch {torch.__version__}"

    def run(self, req: Request, steps: int, t: _Times | None) -> None:
        from vpexport.model.loading import image_embeds

        torch = self.torch
        t0 = time.perf_counter()
        enc = self.processor(images=req.images, text=[self.template.replace("{question}", q) for q in req.questions],
                             return_tensors="pt", padding=True)
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb = image_embeds(self.model, enc["input_ids"], enc["pixel_values"])
            t2 = time.perf_counter()
            self.model(inputs_embeds=emb, attention_mask=enc["attention_mask"], logits_to_keep=1)
        t3 = time.perf_counter()
        if t is not None:
            t.encode.append(t1 - t0), t.vision.append(t2 - t1), t.prefill.append(t3 - t2), t.ttft.append(t3 - t0)


class _OvGenAIPeer:
    """OpenVINO GenAI's VLMPipeline on the checkpoint; with pruning_ratio > 0 its CDPruner prunes the
    visual tokens before the LLM. Variants with different ratios share one pipeline (`shared`): the
    ratio is a per-request generation setting."""

    name = "openvino_genai"

    def __init__(self, artifact_dir: Path, recipe, threads: int, precision: str, log, pruning_ratio: int = 0,
                 shared: _OvGenAIPeer | None = None):
        from vpexport.bench.peers import OpenVinoGenAIPeer
        from vpexport.families import family

        fam = family(recipe.resolve_arch().family)
        self.peer = shared.peer if shared else OpenVinoGenAIPeer(
            artifact_dir, recipe.model_dir, threads, precision=None if precision == "auto" else precision, log=log,
            image_tag=fam.image_text)
        # The recipe's <image> placeholder becomes the model's own tag, which VLMPipeline expands.
        self.template = recipe.task.prompt.replace("<image>", fam.image_text)
        # A dynamic-resolution model sees as many visual tokens as the image has pixels: the peer gets
        # the image at the recipe's fixed size (which its own resize keeps), so both sides see the
        # same visual-token count; a fixed-size model's processor resizes every image itself.
        self.image_size = recipe.resolve_arch().vision.image_hw if fam.dynamic_resolution else None
        self.pruning_ratio = int(pruning_ratio)
        self.precision = self.peer.precision
        self.version = f"openvino-genai {self.peer.version}"
        self.input_tokens: list[int] = []

    def prompt(self, question: str) -> str:
        return self.template.replace("{question}", question)

    def image(self, image):
        if self.image_size is None:
            return image
        from PIL import Image

        h, w = self.image_size
        return image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)

    def visual_tokens(self, req: Request) -> int:
        """The visual tokens the LLM sees for this request (after CDPruner at this ratio), measured
        from the pipeline's own input length; one untimed call."""
        return self.peer.run_once(self.image(req.images[0]), self.prompt(req.questions[0]), 0,
                                  self.pruning_ratio)["visual_tokens"]

    def run(self, req: Request, steps: int, t: _Times | None) -> None:
        if len(req.images) != 1:
            raise UserInputError("the openvino-genai peer runs one request at a time", field="--batch",
                                 fix="use --batch 1 with --peer openvino-genai")
        r = self.peer.run_once(self.image(req.images[0]), self.prompt(req.questions[0]), steps, self.pruning_ratio)
        self.input_tokens.append(r["input_tokens"])
        if t is not None:
            t.ttft.append(r["ttft_ms"] / 1e3)
            t.decode.append(r["decode_ms_per_token"] / 1e3)
            if math.isfinite(r.get("prepare_embeddings_ms", float("nan"))):
                t.vision.append(r["prepare_embeddings_ms"] / 1e3)  # image preprocessing + vision + embeddings
                t.prefill.append((r["ttft_ms"] - r["prepare_embeddings_ms"]) / 1e3)


# The peers `--peer` offers: CLI name -> result key (peers.<key> in the JSON).
PEERS = {"openvino-genai": "openvino_genai", "openvino-genai-cdpruner": "openvino_genai_cdpruner",
         "hf-pytorch": "hf_pytorch"}


def cdpruner_key(keep: int) -> str:
    return f"openvino_genai_cdpruner_keep{keep}"


# --------------------------------------------------------------------------- peak memory
def peak_memory_mb(kind: str, args: dict) -> float:
    """Peak RSS (MiB) of a fresh process that loads one variant and runs one request."""
    code = f"from vpexport.bench.runner import _child_run; _child_run({kind!r}, {json.dumps(args)!r})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"memory probe of {kind} failed: {tail[:300]}", field="bench")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"])


def _child_run(kind: str, args_json: str) -> None:
    from vpexport.recipe import load_recipe

    a = json.loads(args_json)
    recipe = load_recipe(Path(a["artifact_dir"]) / "recipe.resolved.yaml", check=False)
    req = bench_requests(recipe, 1, a["batch"])[0]
    if kind == "artifacts":
        v = _Artifacts(Path(a["dir"]), a["provider"], a["precision"], a["threads"])
    elif kind == "openvino_genai":
        v = _OvGenAIPeer(Path(a["artifact_dir"]), recipe, a["threads"], a["precision"], log=lambda m: None,
                         pruning_ratio=a.get("pruning_ratio", 0))
    else:
        v = _HfPeer(recipe, a["threads"], a["batch"])
    v.run(req, a["steps"], None)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"peak_mb": hwm / 1024}))


# --------------------------------------------------------------------------- the run
def run_bench(
    artifact_dir: str | Path,
    reps: int = 10,
    decode_steps: int = 16,
    threads: int | None = None,
    batch: int = 1,
    providers: tuple[str, ...] = ("cpu",),
    peers: tuple[str, ...] = ("hf-pytorch",),
    precision: str = "auto",
    with_memory: bool = True,
    log=print,
    cdpruner_keep: tuple[int, ...] = (),
) -> dict:
    from vpexport.accounting import kv_cache_bytes, prefill_flops
    from vpexport.bench.peers import PeerUnavailable
    from vpexport.manifest import artifact_digest, read_manifest
    from vpexport.paths import resolve_schedule
    from vpexport.recipe import load_recipe
    from vpexport.runtime.providers import get as get_provider

    for name, value, low in (("--reps", reps, 1), ("--decode-steps", decode_steps, 0), ("--batch", batch, 1)):
        if value < low:
            raise UserInputError(f"{name} {value} must be at least {low}", field=name, fix=f"give {low} or more")
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads {threads} must be at least 1", field="--threads", fix="give 1 or more")
    if not providers:
        raise UserInputError("no --provider given", field="--provider", fix="name at least one, e.g. --provider cpu")
    for p in providers:
        get_provider(p)
    for p in peers:
        if p not in PEERS:
            raise UserInputError(f"unknown peer {p!r}", field="--peer", fix=f"use one of {', '.join(PEERS)}")
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    recipe = load_recipe(artifact_dir / "recipe.resolved.yaml")
    if batch > recipe.export.batch.max:
        raise UserInputError(f"--batch {batch} exceeds the export's batch.max {recipe.export.batch.max}",
                             field="--batch", fix=f"use at most {recipe.export.batch.max}")
    threads = threads or (os.cpu_count() or 1)
    dense_dir = ensure_dense_export(artifact_dir, recipe, log=log)

    # ONNX Runtime and OpenVINO switch the process to flush-denormals-to-zero; numpy computing its
    # float limits after that warns "smallest subnormal ... is zero" (once per type, on stderr).
    # Computed now they are cached, and the bench output stays clean.
    np.finfo(np.float32), np.finfo(np.float64)
    variants: dict[str, object] = {}
    for p in providers:
        log(f"[bench] opening the artifacts on {p}")
        # --precision is for the providers that choose one; the others run at the export's.
        prec = precision if get_provider(p).precisions else "auto"
        variants[f"{p}/pruned"] = _Artifacts(artifact_dir, p, prec, threads)
        variants[f"{p}/dense"] = _Artifacts(dense_dir, p, prec, threads)
    skipped = {}
    arch = recipe.resolve_arch()
    sched = resolve_schedule(recipe, arch, artifact_dir)
    cdpruner: dict[str, dict] = {}  # result key -> {pruning_ratio, keep asked}
    if "openvino-genai-cdpruner" in peers:
        from vpexport.bench.peers import cdpruner_ratio

        keeps = sorted(set(cdpruner_keep or (p.keep for p in sched.points if p.keep > 0)), reverse=True)
        if not keeps:
            raise UserInputError("the schedule keeps no visual tokens to match", field="--cdpruner-keep",
                                 fix="give the kept counts to time CDPruner at, e.g. --cdpruner-keep 64")
        for k in keeps:
            cdpruner[cdpruner_key(k)] = {"keep": k, "pruning_ratio": cdpruner_ratio(arch.visual_tokens, k)}
    genai: _OvGenAIPeer | None = None
    probe = bench_requests(recipe, 1, 1)[0]

    def open_genai() -> _OvGenAIPeer:
        peer = _OvGenAIPeer(artifact_dir, recipe, threads, precision, log)
        seen = peer.visual_tokens(probe)
        if seen != arch.visual_tokens:  # e.g. another resize: the figures would not be like for like
            raise ArtifactError(f"OpenVINO GenAI's pipeline sees {seen} visual tokens per image, the artifacts "
                                f"{arch.visual_tokens}: the peer does not run the same model input", field="--peer",
                                fix="check the checkpoint's preprocessor_config.json against the recipe's image size")
        return peer

    for p in peers:
        key = PEERS[p]
        try:
            if key == "openvino_genai":
                genai = genai or open_genai()
                variants[f"peer/{key}"] = genai
            elif key == "openvino_genai_cdpruner":
                genai = genai or open_genai()
                for ckey, c in cdpruner.items():
                    v = _OvGenAIPeer(artifact_dir, recipe, threads, precision, log, c["pruning_ratio"], shared=genai)
                    c["kept_visual_tokens"] = v.visual_tokens(probe)
                    log(f"[bench] CDPruner at pruning_ratio {c['pruning_ratio']} keeps "
                        f"{c['kept_visual_tokens']} of {arch.visual_tokens} visual tokens (asked: {c['keep']})")
                    variants[f"peer/{ckey}"] = v
            else:
                variants[f"peer/{key}"] = _HfPeer(recipe, threads, batch)
        except PeerUnavailable as e:
            skipped[key] = e.one_line()
            log(f"[bench] peer {p} skipped: {e.one_line()}")
        except RuntimeError as e:  # VLMPipeline refuses CDPruner for a model it does not support
            if key != "openvino_genai_cdpruner":
                raise
            from vpexport.bench.peers import last_meaningful_line

            skipped[key] = f"OpenVINO GenAI's CDPruner failed on this model: {last_meaningful_line(str(e))}"
            log(f"[bench] peer {p} skipped: {skipped[key]}")

    names = list(variants)
    requests = bench_requests(recipe, reps + WARMUP, batch)
    log(f"[bench] {WARMUP} warm-up + {reps} interleaved repetitions of {', '.join(names)}; {threads} threads, "
        f"batch {batch}, {decode_steps} decode steps, a distinct eval sample per repetition")
    for w in range(WARMUP):  # first runs allocate and pick kernels
        for n in names:
            variants[n].run(requests[reps + w], decode_steps, None)
    times = {n: _Times() for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            time.sleep(PAUSE_S)
            variants[n].run(requests[r], decode_steps, times[n])
    med = {n: t.medians() for n, t in times.items()}

    # FLOPs of what the graphs execute: the text part at the width the runtime pads it to
    # (export.text_length.max in padded mode, the bucket that holds it with buckets).
    from dataclasses import replace

    layout = recipe.layout(arch, batch=batch)
    any_rt = variants[f"{providers[0]}/pruned"].rt
    layout = replace(layout, text=any_rt.text_length.width(min(layout.text, any_rt.text_max)))
    flops = prefill_flops(arch, sched, layout)
    kv = kv_cache_bytes(arch, sched, layout, dtype="float32" if recipe.export.precision == "fp32" else "float16")
    flops_ratio = round(flops["ratio"], 4)

    result: dict = {
        "artifact": str(artifact_dir),
        "recipe": recipe.name,
        "device": _cpu_name(),
        "threads": threads,
        "batch": batch,
        "reps": reps,
        "decode_steps": decode_steps,
        "versions": _versions(),
        "schedule": sched.to_dict(),
        "layout": layout.to_dict(),
        "flops": {"dense": flops["dense"], "pruned": flops["pruned"], "ratio": flops_ratio, "tokens": flops["tokens"]},
        "kv_cache": {"dense_bytes": kv["dense_bytes"], "pruned_bytes": kv["pruned_bytes"], "ratio": round(kv["ratio"], 4)},
        "providers": {},
        "peers": {},
        "peers_skipped": skipped,
        "raw_ms": {n: t.raw() for n, t in times.items()},
    }
    for p in providers:
        a, b = med[f"{p}/pruned"], med[f"{p}/dense"]
        row = {
            "runtime": get_provider(p).summary,
            "precision": variants[f"{p}/pruned"].precision,
            "ttft": {"pruned_ms": a["ttft"], "dense_ms": b["ttft"], "latency_ratio": round(a["ttft"] / b["ttft"], 4)},
            "encode": {"pruned_ms": a["encode"], "dense_ms": b["encode"]},
            "vision": {"pruned_ms": a["vision"], "dense_ms": b["vision"]},
            "prefill": {"pruned_ms": a["prefill"], "dense_ms": b["prefill"],
                        "latency_ratio": round(a["prefill"] / b["prefill"], 4)},
        }
        row["prefill"]["latency_over_flops"] = round(row["prefill"]["latency_ratio"] / flops_ratio, 4)
        if decode_steps:
            row["decode"] = {"pruned_ms_per_token": a["decode"], "dense_ms_per_token": b["decode"],
                             "latency_ratio": round(a["decode"] / b["decode"], 4)}
        result["providers"][p] = row
    for n in names:
        if n.startswith("peer/"):
            key, m, v = n[5:], med[n], variants[n]
            row = {"precision": v.precision, "version": v.version, "ttft_ms": m["ttft"]}
            if "prefill" in m:
                row["prefill_ms"] = m["prefill"]
            if "decode" in m and decode_steps:
                row["decode_ms_per_token"] = m["decode"]
            if isinstance(v, _OvGenAIPeer) and v.input_tokens:
                row["input_tokens"] = int(statistics.median(v.input_tokens))
                # What the LLM sees per image, measured: all of them unpruned, CDPruner's kept ones.
                row["visual_tokens"] = cdpruner[key]["kept_visual_tokens"] if key in cdpruner else arch.visual_tokens
            if key in cdpruner:
                row.update(pruning_ratio=cdpruner[key]["pruning_ratio"],
                           relevance_weight=round(float(v.peer.pipe.get_generation_config().relevance_weight), 4))
            result["peers"][key] = row
    if with_memory:
        log("[bench] peak memory (a fresh process per variant)")
        base = {"artifact_dir": str(artifact_dir), "threads": threads, "batch": batch, "steps": decode_steps,
                "precision": precision}
        for p in providers:
            prec = precision if get_provider(p).precisions else "auto"
            for which, d in (("pruned", artifact_dir), ("dense", dense_dir)):
                mb = peak_memory_mb("artifacts", {**base, "dir": str(d), "provider": p, "precision": prec})
                result["providers"][p].setdefault("memory", {})[f"{which}_peak_mb"] = round(mb, 1)
        for key in result["peers"]:
            if key in cdpruner:
                kind, extra = "openvino_genai", {"pruning_ratio": cdpruner[key]["pruning_ratio"]}
            else:
                kind, extra = key, {}
            result["peers"][key]["peak_mb"] = round(peak_memory_mb(kind, {**base, **extra}), 1)
    best = min(providers, key=lambda p: result["providers"][p]["ttft"]["pruned_ms"])
    b = result["providers"][best]
    result["best"] = {
        "provider": best,
        "precision": b["precision"],
        "ttft_ms": b["ttft"]["pruned_ms"],
        "prefill_ms": b["prefill"]["pruned_ms"],
        "decode_ms_per_token": b.get("decode", {}).get("pruned_ms_per_token"),
        "prefill_latency_over_flops": b["prefill"]["latency_over_flops"],
    }
    for key, row in result["peers"].items():
        result["best"][f"ttft_vs_{key}"] = round(b["ttft"]["pruned_ms"] / row["ttft_ms"], 4)
        if row.get("decode_ms_per_token") and result["best"]["decode_ms_per_token"]:
            result["best"][f"decode_vs_{key}"] = round(result["best"]["decode_ms_per_token"] / row["decode_ms_per_token"], 4)
    result["manifest_schedule"] = manifest.get("schedule")
    result["artifact_digest"] = artifact_digest(manifest)  # what was timed: a later re-export changes it
    return result


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("onnxruntime", "openvino", "openvino-genai", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _cpu_name() -> str:
    from vpexport.model.device import cpu_model_name

    name = cpu_model_name()
    return f"{name} ({os.cpu_count()} cores visible)" if name else f"cpu ({os.cpu_count()} cores)"

"""`export_artifacts(recipe, out_dir, schedule)`: three ONNX graphs + runtime assets + manifest.

Graphs (legacy TorchScript exporter, `dynamo=False`: it traces the in-graph TopK + sort + Gather
with static k and matches PyTorch in ONNX Runtime; SDPA attention only):

  vision.onnx   pixel_values (B,3,H,W) f32                   -> image_features (B,N,d)
  prefill.onnx  input_ids (B,L) i64, attention_mask (B,L) i64, image_features (B,N,d)
                -> logits (B,V), present.{i}.key / present.{i}.value (B,KV,prefix+n_i+T,hd),
                   kept.{j} (B,keep_j) i64 per prune point that keeps tokens
  decode.onnx   input_ids (B,1) i64, position_ids (B,1) i64, text_mask (B,C) i64,
                past.{i}.key / past.{i}.value (B,KV,prefix+n_i+C,hd)
                -> logits (B,V), new.{i}.key / new.{i}.value (B,KV,1,hd)

decode reads fixed-capacity caches and returns only the step's own key/value per layer
(PrunedModel.decode_step): C text slots per cache (the prompt's text, then one per generated
token), `text_mask` marks the filled ones; the runtime writes `new.*` into the next slot
(vpexport/runtime/kv_cache.py), so no step copies or returns a whole cache.

L = prefix + N + T. T is `export.text_length.max` (mode padded: a static axis) or the dynamic
axis `text` (mode dynamic). Batch is the dynamic axis `batch`. Tracing uses a synthetic input
(random token ids around the static image span, random pixels): no eval sample is used.
Everything is written into a temp folder inside the artifact folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from vpexport.errors import ArtifactError, UserInputError
from vpexport.runtime.text_length import text_length_meta

TWO_GB = 2**31 - 1
STALE_SECTIONS = ("validation", "engine", "package", "build", "bench")
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16"}


def _log(log, msg):
    if log is not None:
        log(msg)


# --------------------------------------------------------------------------- wrappers
def _wrappers(pm):
    import torch
    from torch import nn

    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.pm = pm

        def forward(self, pixel_values):
            return self.pm.encode_image(pixel_values)

    class Prefill(nn.Module):
        def __init__(self):
            super().__init__()
            self.pm = pm

        def forward(self, input_ids, attention_mask, image_features):
            out = self.pm.prefill(input_ids, attention_mask, image_features)
            flat = [t for kv in out.kv for t in kv]
            return (out.logits, *flat, *kept_tensors(self.pm.schedule, out.kept))

    class Decode(nn.Module):
        def __init__(self):
            super().__init__()
            self.pm = pm

        def forward(self, input_ids, position_ids, text_mask, *past):
            kv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, new = self.pm.decode_step(input_ids, position_ids, text_mask, kv)
            return (logits, *[t for kv_ in new for t in kv_])

    del torch
    return Vision().eval(), Prefill().eval(), Decode().eval()


def kept_points(schedule) -> list:
    return [p for p in schedule.points if p.rule != "drop_all"]


def kept_tensors(schedule, kept: list) -> list:
    """PrunedModel's kept list (one entry per point, empty for drop_all) -> the graph's kept.{j} outputs."""
    return [k for k, p in zip(kept, schedule.points) if p.rule != "drop_all"]


def io_names(num_layers: int, schedule) -> dict:
    kv = lambda pre: [f"{pre}.{i}.{w}" for i in range(num_layers) for w in ("key", "value")]  # noqa: E731
    return {
        "vision": {"inputs": ["pixel_values"], "outputs": ["image_features"]},
        "prefill": {
            "inputs": ["input_ids", "attention_mask", "image_features"],
            "outputs": ["logits", *kv("present"), *[f"kept.{j}" for j in range(len(kept_points(schedule)))]],
        },
        "decode": {"inputs": ["input_ids", "position_ids", "text_mask", *kv("past")], "outputs": ["logits", *kv("new")]},
    }


def synthetic_inputs(pm, text_len: int, vocab: int, pad_id: int, batch: int = 2, seed: int = 0):
    """Trace inputs: random ids (never the image token) around the static image span, right padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p, n = pm.prefix, pm.visual_tokens
    ids = torch.randint(0, vocab, (batch, p + n + text_len), generator=g)
    ids[ids == pm.image_token_id] = pad_id
    ids[:, p : p + n] = pm.image_token_id
    mask = torch.ones_like(ids)
    for b in range(1, batch):  # later rows shorter: padding is part of what is traced
        cut = max(1, text_len - b)
        mask[b, p + n + cut :] = 0
        ids[b, p + n + cut :] = pad_id
    return ids, mask


# --------------------------------------------------------------------------- ONNX helpers
def io_spec(names: list[str], tensors, dynamic_axes: dict) -> dict:
    """{name: dims} from the traced example tensors; the dynamic axes get their symbolic names."""
    spec = {}
    for name, t in zip(names, tensors):
        dims = list(t.shape)
        for ax, sym in dynamic_axes.get(name, {}).items():
            dims[ax] = sym
        spec[name] = dims
    return spec


def _set_io_shapes(model, spec: dict) -> None:
    """Declare every graph input/output with its static sizes and named dynamic axes (the exporter
    leaves some static sizes, e.g. the visual count after a slice, as anonymous symbols)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in spec:
            continue
        shape = vi.type.tensor_type.shape
        while len(shape.dim):
            shape.dim.pop()
        for d in spec[vi.name]:
            nd = shape.dim.add()
            if isinstance(d, str):
                nd.dim_param = d
            else:
                nd.dim_value = int(d)


def _constant_topk_k(model, light) -> int:
    """The exporter writes `sort()` as TopK(X, k=Gather(Shape(X), axis)); TensorRT wants a constant k.
    Where X's size along that axis is static (always, for a prune point's keep), make k an initializer.
    `light` is the same graph without external weights, for shape inference. Returns the count folded."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(light)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    prod = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    folded = 0
    for node in model.graph.node:
        if node.op_type != "TopK" or node.input[1] in consts:
            continue
        g = prod.get(node.input[1])
        if g is None or g.op_type != "Gather" or g.input[1] not in consts:
            continue
        sh = prod.get(g.input[0])
        if sh is None or sh.op_type != "Shape" or sh.input[0] != node.input[0] or len(sh.attribute):
            continue
        axis = consts[g.input[1]].reshape(-1)
        if axis.size != 1:
            continue
        d = None
        src = prod.get(node.input[0])
        topk_axis = {a.name: a.i for a in node.attribute}.get("axis", -1)
        if src is not None and src.op_type == "TopK" and src.input[1] in consts:
            # sort of TopK indices: X's size along the (last) axis is the first TopK's constant k
            src_axis = {a.name: a.i for a in src.attribute}.get("axis", -1)
            if src_axis == topk_axis == int(axis[0]) == -1:
                d = int(consts[src.input[1]].reshape(-1)[0])
        if d is None:
            dims = shapes.get(node.input[0])
            d = dims[int(axis[0])] if dims else None
        if not d:
            continue
        name = f"{node.name or 'topk'}_k_const"
        model.graph.initializer.append(numpy_helper.from_array(np.array([d], dtype=np.int64).reshape(consts[g.input[1]].shape or (1,)), name))
        node.input[1] = name
        folded += 1
    return folded


def _finalize_onnx(raw: Path, dest: Path, spec: dict | None = None) -> None:
    """Re-save `raw` as `dest` (external data when over 2 GB) with declared I/O shapes and constant
    TopK k, then check it fully (checker + strict shape inference)."""
    import onnx

    light = onnx.load(str(raw), load_external_data=False)
    model = onnx.load(str(raw), load_external_data=True)
    if spec:
        _set_io_shapes(model, spec)
    _constant_topk_k(model, light)
    del light
    big = model.ByteSize() > TWO_GB if _fits_proto(raw) else True
    dest.parent.mkdir(parents=True, exist_ok=True)
    if big:
        onnx.save_model(
            model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
            location=dest.name + ".data", size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dest))
    del model
    try:
        onnx.checker.check_model(str(dest), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(dest), str(dest) + ".inferred", strict_mode=True)
    except Exception as e:  # noqa: BLE001 - any checker failure is an export bug to report in one line
        raise ArtifactError(
            f"{dest.name} fails the ONNX checker/shape inference: {str(e).splitlines()[0]}",
            field="export",
            fix="report this; try export.opset 17",
        ) from None
    finally:
        Path(str(dest) + ".inferred").unlink(missing_ok=True)


def _fits_proto(path: Path) -> bool:
    total = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    return total < TWO_GB


def graph_io(path: Path) -> dict:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]} with symbolic dims as strings."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def one(vi):
        t = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {"inputs": [one(v) for v in m.graph.input], "outputs": [one(v) for v in m.graph.output]}


def _export_one(module, args, path: Path, names: dict, dynamic_axes: dict, opset: int) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=names["inputs"], output_names=names["outputs"],
                dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
            )


# --------------------------------------------------------------------------- runtime assets
def special_tokens(tokenizer, image_token_id: int) -> dict:
    out = {"image_token_id": int(image_token_id)}
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        out[f"{name}_token_id"] = None if tid is None else int(tid)
        out[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
    out["all_special_ids"] = sorted(int(i) for i in tokenizer.all_special_ids)
    out["clean_up_tokenization_spaces"] = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return out


def write_runtime_assets(dst: Path, processor, gen: dict, preprocess: dict) -> list[str]:
    import json

    dst.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
    (dst / "special_tokens.json").write_text(json.dumps(special_tokens(tok, gen["image_token_id"]), indent=2))
    (dst / "preprocess.json").write_text(json.dumps(preprocess, indent=2))
    (dst / "generation.json").write_text(json.dumps(gen, indent=2))
    return ["tokenizer.json", "special_tokens.json", "preprocess.json", "generation.json"]


# --------------------------------------------------------------------------- main entry
def export_artifacts(recipe, out_dir: str | Path, schedule, log=print) -> dict:
    """Export into `out_dir` (the artifact folder). Returns a summary dict (paths, sizes, shapes)."""
    import torch

    from vpexport.manifest import FORMAT, MANIFEST, _load_raw, _write_json_atomic, update_manifest
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.recipe import save_resolved

    t_start = time.perf_counter()
    ex = recipe.export
    precision = ex.precision
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _log(log, f"[export] loading {recipe.model.path} ({precision})")
    from vpexport.model.loading import load_model

    model, processor = load_model(recipe.model_dir, PRECISION_DTYPE[precision], recipe.model.image_size)
    pipe = TorchPipeline(model, processor, recipe.task.prompt, schedule, recipe.task.max_new_tokens,
                         recipe.model.image_size)
    pm = pipe.pruned
    tc = model.config.text_config
    L, p, n = pm.num_layers, pm.prefix, pm.visual_tokens
    T = ex.text_length.max
    dynamic_text = ex.text_length.mode == "dynamic"
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = int(model.config.text_config.vocab_size)
    if pm.sliding_window is not None and p + n + T > pm.sliding_window:
        raise UserInputError(
            f"prefix+visual+text = {p + n + T} exceeds the sliding window {pm.sliding_window}",
            field="export.text_length.max",
            fix=f"use at most {pm.sliding_window - p - n}",
        )
    names = io_names(L, schedule)
    vision, prefill, decode = _wrappers(pm)
    img_h, img_w = pipe.image_size
    dtype = torch.float32 if precision == "fp32" else torch.float16

    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        onnx_dir, raw_dir, rt_dir = stage / "onnx", stage / "raw", stage / "runtime"
        onnx_dir.mkdir()
        torch.manual_seed(0)
        # ---- vision
        t0 = time.perf_counter()
        _log(log, f"[export] vision.onnx: pixel_values (B,3,{img_h},{img_w}) -> image_features (B,{n},{tc.hidden_size})")
        px = torch.randn(2, 3, img_h, img_w)
        raw = raw_dir / "vision" / "model.onnx"
        raw.parent.mkdir(parents=True)
        dyn = {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}
        _export_one(vision, (px,), raw, names["vision"], dyn, ex.opset)
        with torch.no_grad():
            feats = pm.encode_image(px)
        spec = io_spec(names["vision"]["inputs"] + names["vision"]["outputs"], [px, feats], dyn)
        _finalize_onnx(raw, onnx_dir / "vision.onnx", spec)
        _log(log, f"[export]   done in {time.perf_counter() - t0:.1f} s")

        # ---- prefill
        t0 = time.perf_counter()
        trace_T = T if not dynamic_text else min(T, 8)
        ids, mask = synthetic_inputs(pm, trace_T, vocab, pad_id)
        text_ax = {0: "batch", 1: "sequence"} if dynamic_text else {0: "batch"}
        dyn = {"input_ids": text_ax, "attention_mask": text_ax, "image_features": {0: "batch"}, "logits": {0: "batch"}}
        for i in range(L):
            for w in ("key", "value"):
                dyn[f"present.{i}.{w}"] = {0: "batch", 2: f"prefill_kv_len.{i}"} if dynamic_text else {0: "batch"}
        for j in range(len(kept_points(schedule))):
            dyn[f"kept.{j}"] = {0: "batch"}
        _log(log, f"[export] prefill.onnx: {L} layers, L = {p}+{n}+{'T' if dynamic_text else T}, segments "
             + ", ".join(f"[{s.start},{s.end}):{s.visual_tokens}" for s in schedule.segments(L, n)))
        raw = raw_dir / "prefill" / "model.onnx"
        raw.parent.mkdir(parents=True)
        # Every prefill position is below the first text position + T (M-RoPE's visual rows and
        # columns too): its RoPE table needs no more rows than that.
        with pm.positions_below(pm.text_pos0 + T):
            _export_one(prefill, (ids, mask, feats), raw, names["prefill"], dyn, ex.opset)
            with torch.no_grad():
                pouts = prefill(ids, mask, feats)
        spec = io_spec(names["prefill"]["inputs"] + names["prefill"]["outputs"], [ids, mask, feats, *pouts], dyn)
        _finalize_onnx(raw, onnx_dir / "prefill.onnx", spec)
        _log(log, f"[export]   done in {time.perf_counter() - t0:.1f} s")

        # ---- decode (one step after the traced prefill, caches with two free slots)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pm.prefill(ids, mask, feats)
        b = ids.shape[0]
        free = 2
        text_mask = torch.cat([mask[:, p + n :], torch.zeros(b, free, dtype=mask.dtype)], dim=1)
        step_ids = out.logits.argmax(-1)[:, None]
        pos = (pm.text_pos0 + out.text_len)[:, None]
        pad = lambda t: torch.cat([t, torch.zeros(*t.shape[:2], free, t.shape[3], dtype=t.dtype)], dim=2)  # noqa: E731
        past = [pad(t) for kv in out.kv for t in kv]
        dyn = {"input_ids": {0: "batch"}, "position_ids": {0: "batch"}, "text_mask": {0: "batch", 1: "text_total"},
               "logits": {0: "batch"}}
        for i in range(L):
            for w in ("key", "value"):
                dyn[f"past.{i}.{w}"] = {0: "batch", 2: f"past_len.{i}"}
                dyn[f"new.{i}.{w}"] = {0: "batch"}
        _log(log, "[export] decode.onnx: one token against fixed-capacity per-layer KV caches")
        raw = raw_dir / "decode" / "model.onnx"
        raw.parent.mkdir(parents=True)
        _export_one(decode, (step_ids, pos, text_mask, *past), raw, names["decode"], dyn, ex.opset)
        with torch.no_grad():
            douts = decode(step_ids, pos, text_mask, *past)
        spec = io_spec(names["decode"]["inputs"] + names["decode"]["outputs"], [step_ids, pos, text_mask, *past, *douts], dyn)
        _finalize_onnx(raw, onnx_dir / "decode.onnx", spec)
        _log(log, f"[export]   done in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(raw_dir)
        from vpexport.export.shared_weights import share_weights

        shared = share_weights(onnx_dir, log=(lambda m: _log(log, m)))

        # ---- runtime assets
        gen = {
            "template": recipe.task.prompt,
            "task": recipe.task.type,
            "prefix": p,
            "visual_tokens": n,
            "family": pm.family.name,
            "image_size": [int(img_h), int(img_w)],
            "image_text": pm.family.image_text,
            "image_token": tok.convert_ids_to_tokens(int(pm.image_token_id)),
            "text_position_start": int(pm.text_pos0),
            "hidden_size": int(tc.hidden_size),
            "vocab_size": vocab,
            "image_token_id": int(pm.image_token_id),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": pad_id,
            "bos_token_id": tok.bos_token_id,
            "max_new_tokens": recipe.task.max_new_tokens,
            "text_length": text_length_meta(ex.text_length),
            "batch_max": ex.batch.max,
            "num_layers": L,
            "num_heads": pm.num_heads,
            "num_kv_heads": pm.num_kv_heads,
            "head_dim": pm.head_dim,
            "visual_per_layer": list(pm.visual_per_layer),
            "kv_static_len": [p + v for v in pm.visual_per_layer],  # + T (+ generated) per layer
            "dtype": PRECISION_DTYPE[precision],
            "precision": precision,
            "schedule": schedule.to_dict(),
            "kept_points": [{"layer": q.layer, "keep": q.keep, "rule": q.rule} for q in kept_points(schedule)],
        }
        rt_files = write_runtime_assets(rt_dir, processor, gen, pm.family.preprocess_config(processor))
        save_resolved(recipe, stage)

        # ---- move into place
        for sub in ("onnx", "runtime"):
            dst = out_dir / sub
            old = None
            if dst.exists():
                old = stage / f"old-{sub}"
                os.replace(dst, old)
            os.replace(stage / sub, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        os.replace(stage / "recipe.resolved.yaml", out_dir / "recipe.resolved.yaml")
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    # ---- manifest: fresh file table for what export owns; later stages' sections are stale now
    onnx_files = sorted(f.relative_to(out_dir).as_posix() for f in (out_dir / "onnx").iterdir() if f.is_file())
    files = onnx_files + [f"runtime/{f}" for f in rt_files] + ["recipe.resolved.yaml"]
    if (out_dir / "schedule.json").is_file():
        files.append("schedule.json")
    # A Triton repository packaged from the previous graphs would keep serving them: it goes with
    # the manifest sections this export makes stale (only one package_triton wrote, by its marker).
    from vpexport.package.triton import MARKER_FILE

    if (out_dir / "triton" / MARKER_FILE).is_file():
        shutil.rmtree(out_dir / "triton")
    if (out_dir / MANIFEST).is_file():
        try:
            old = _load_raw(out_dir)
        except ArtifactError:
            old = {}
        keep = {k: v for k, v in old.items() if k not in STALE_SECTIONS and k not in ("files", "packages", "export")}
        keep["format"], keep["files"] = FORMAT, {}
        _write_json_atomic(out_dir / MANIFEST, keep)
    graphs = {g: graph_io(out_dir / "onnx" / f"{g}.onnx") for g in ("vision", "prefill", "decode")}
    section = {
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": ex.opset,
        "precision": precision,
        "text_length": text_length_meta(ex.text_length),
        "batch": {"max": ex.batch.max, "axis": "dynamic"},
        "trace_input": "synthetic (random token ids and pixels; eval samples are not used to trace)",
        "prefix": p,
        "visual_tokens": n,
        "visual_per_layer": list(pm.visual_per_layer),
        "schedule": schedule.to_dict(),
        "graphs": graphs,
        # prefill and decode reference one copy of their weights (vpexport/export/shared_weights.py)
        "shared_weights": {"file": f"onnx/{shared['file']}", "graphs": ["prefill", "decode"],
                           "bytes": shared["bytes"], "tensors": shared["tensors"], "saved_bytes": shared["saved_bytes"]},
    }
    update_manifest(out_dir, None, None, files=files)
    update_manifest(out_dir, "schedule", schedule.to_dict())
    m = update_manifest(out_dir, "recipe", recipe.resolved())
    m = update_manifest(out_dir, "export", section)
    summary = {
        "artifact_dir": str(out_dir),
        "files": {f: m["files"][f]["size"] for f in files},
        "graphs": graphs,
        "precision": precision,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return summary

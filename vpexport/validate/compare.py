"""`validate_artifacts(artifact_dir, samples=None) -> report`: every output of every ONNX graph
against the PyTorch rewritten model, on the recipe's eval samples.

Per graph, ONNX Runtime and PyTorch get the SAME inputs (PyTorch's), so each graph's error is
measured on its own (like Polygraphy's comparator): vision (pixel_values), prefill (input_ids,
attention_mask, PyTorch's image features), decode (one step from PyTorch's prefill KV). An output
passes when |onnx - torch| <= atol + rtol * |torch| everywhere (numpy.allclose); max_abs and
max_rel (= max |onnx - torch| / max(|torch|, 1e-12)) are reported. Then: kept indices equal at
every prune point, greedy generations (runtime tokenizer + preprocessing + ORT loop vs the HF
processor + PrunedModel.generate) identical, and accuracy equal. All failures are collected;
the caller raises ValidationFailed (exit 4) when `report["passed"]` is false.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vpexport.errors import ArtifactError


class _Stat:
    def __init__(self, atol, rtol, rel_l2=None):
        self.atol, self.rtol, self.rel_l2 = atol, rtol, rel_l2
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.max_rel_l2 = 0.0
        self.bad = 0
        self.total = 0
        self.skipped = 0
        self.shape_error = None

    def add(self, onnx_out, torch_out, rows=None):
        """`rows`: bool (B,) of the samples to compare (others are counted as skipped)."""
        a = np.asarray(onnx_out).astype(np.float64)
        b = np.asarray(torch_out).astype(np.float64)
        if a.shape != b.shape:
            self.shape_error = f"shape {a.shape} != torch {b.shape}"
            return
        if rows is not None:
            self.skipped += int((~rows).sum())
            a, b = a[rows], b[rows]
        if a.size == 0:
            return
        d = np.abs(a - b)
        if not np.all(np.isfinite(a)):
            self.bad += int((~np.isfinite(a)).sum())
            d = np.where(np.isfinite(d), d, np.inf)
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float((d / np.maximum(np.abs(b), 1e-12)).max()))
        flat_d, flat_b = d.reshape(len(d), -1), b.reshape(len(b), -1)
        rl2 = np.linalg.norm(flat_d, axis=1) / np.maximum(np.linalg.norm(flat_b, axis=1), 1e-12)
        self.max_rel_l2 = max(self.max_rel_l2, float(rl2.max()))
        if self.rel_l2 is None:
            self.bad += int((d > self.atol + self.rtol * np.abs(b)).sum())
            self.total += a.size
        else:
            self.bad += int((~(rl2 <= self.rel_l2)).sum())
            self.total += len(rl2)

    def row(self):
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "max_rel_l2": self.max_rel_l2,
            "atol": self.atol,
            "rtol": self.rtol,
            "rel_l2": self.rel_l2,
            "rule": "elementwise" if self.rel_l2 is None else "per-sample relative L2",
            "mismatched_elements": self.bad,  # samples, for the per-sample rule
            "elements": self.total,
            "skipped_samples": self.skipped,
            "passed": self.bad == 0 and self.shape_error is None,
            **({"error": self.shape_error} if self.shape_error else {}),
        }


def _load_recipe(directory: Path):
    import yaml

    from vpexport.recipe import recipe_from_dict

    f = directory / "recipe.resolved.yaml"
    if not f.is_file():
        raise ArtifactError(f"{f} does not exist", field="artifacts", fix="re-run `vpexport export`")
    return recipe_from_dict(yaml.safe_load(f.read_text()), source=None, base=directory, check=False)


RUNTIME_TO_TOLERANCE = {"f32": "fp32", "fp32": "fp32", "fp16": "fp16", "f16": "fp16", "bf16": "bf16"}


def _agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the share of b's kept indices that a also kept (1.0 = the same set)."""
    return np.array([len(set(x.tolist()) & set(y.tolist())) / max(1, len(y)) for x, y in zip(a, b)])


def validate_artifacts(
    artifact_dir, samples: int | None = None, provider: str = "cpu", batch_size: int | None = None, log=None,
    precision: str = "auto", device: str | None = None,
) -> dict:
    """Every output, kept index and generation of the artifacts on `provider` against the PyTorch
    model (in the export's precision, on `device` or the recipe's model.device)."""
    import torch

    from vpexport.runtime.providers import check_precision

    precision_req = precision
    check_precision(provider, precision)  # a wrong combination fails before the model loads

    from vpexport.data import load_samples
    from vpexport.export.onnx_export import kept_tensors
    from vpexport.evaluation import MAIN_METRIC, score
    from vpexport.manifest import artifact_digest, read_manifest, update_manifest
    from vpexport.model.loading import load_model
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.pruning.schedule import Schedule
    from vpexport.runtime import ArtifactRuntime

    say = log or (lambda m: None)
    t_start = time.perf_counter()
    d = Path(artifact_dir)
    manifest = read_manifest(d)  # ArtifactError (exit 3) on missing/corrupt files
    if "export" not in manifest:
        raise ArtifactError(f"{d} has no export section", field="artifacts", fix="run `vpexport export RECIPE`")
    recipe = _load_recipe(d)
    exp = manifest["export"]
    precision = exp["precision"]  # the export's (and the PyTorch reference's) precision
    schedule = Schedule.from_dict(manifest.get("schedule") or exp["schedule"])
    n_req = samples or recipe.validation.samples
    data = load_samples(recipe.require_data("eval"), n_req, field="task.data.eval")

    from vpexport.model.device import resolve

    torch_device = resolve(device or recipe.model.device, "--device" if device else "model.device")
    say(f"[validate] loading PyTorch model ({precision}, {torch_device.describe()}) and the artifacts ({provider})")
    model, processor = load_model(recipe.model_dir, {"fp32": "float32", "fp16": "float16"}[precision],
                                  recipe.model.image_size, torch_device)
    pipe = TorchPipeline(model, processor, recipe.task.prompt, schedule, recipe.task.max_new_tokens,
                         recipe.model.image_size)
    pm = pipe.pruned
    rt = ArtifactRuntime.open(d, provider=provider, verify=False, precision=precision_req)
    # A runtime may compute below the export's precision (OpenVINO bf16 on fp32 graphs): then its own
    # tolerances apply, and kept indices / generations / accuracy are held to the recipe's
    # reduced-precision thresholds against the full-precision PyTorch model instead of equality.
    run_precision = RUNTIME_TO_TOLERANCE.get(str(rt.precision), precision)
    reduced = run_precision != precision
    tol = pm.family.tolerances[run_precision]
    # The recipe's atol / rtol are for the export's precision; a reduced-precision run uses its own.
    atol = recipe.validation.atol if recipe.validation.atol is not None and not reduced else tol.atol
    rtol = recipe.validation.rtol if recipe.validation.rtol is not None and not reduced else tol.rtol
    stats: dict[str, _Stat] = {}

    def stat(name):
        if name not in stats:
            stats[name] = _Stat(atol, rtol, tol.rel_l2 if reduced else None)
        return stats[name]

    L = pm.num_layers
    p, n = pm.prefix, pm.visual_tokens
    kept_bad, kept_agree = {}, {}
    input_ids_equal = True
    pixel_err = 0.0
    torch_tokens, onnx_tokens, torch_text, onnx_text = [], [], [], []
    bs = batch_size or min(8, recipe.export.batch.max)
    for start in range(0, len(data), bs):
        chunk = data[start : start + bs]
        images = [s.load_image("task.data.eval") for s in chunk]
        questions = [s.question for s in chunk]
        say(f"[validate] samples {start + 1}-{start + len(chunk)} of {len(data)}")
        # ---- runtime inputs vs the HF processor
        ids, mask, px = rt.encode(images, questions)
        tids, tmask, tpx = pipe.encode(images, questions)
        w = tids.shape[1]
        same = ids.shape[1] >= w and np.array_equal(ids[:, :w], tids.cpu().numpy()) and np.array_equal(mask[:, :w], tmask.cpu().numpy())
        same = same and not mask[:, w:].any()
        input_ids_equal = input_ids_equal and bool(same)
        pixel_err = max(pixel_err, float(np.abs(px - tpx.cpu().numpy()).max()))
        stat("preprocess.pixel_values").add(px, tpx.cpu().numpy())
        # ---- per graph, same inputs
        dev = pipe.device
        tid, tm, tp = (torch.from_numpy(x).to(dev) for x in (ids, mask, px))
        with torch.inference_mode():
            feats = pm.encode_image(tp)
            ref = pm.prefill(tid, tm, feats)
        stat("vision.image_features").add(rt.encode_image(px), feats.cpu().numpy())
        po = rt.prefill(ids, mask, feats.cpu().numpy())
        ref_kept = kept_tensors(schedule, ref.kept)
        # At reduced precision a sample whose kept indices differ has other tokens in its caches from
        # there on: its caches and logits are not comparable element by element (they count as
        # skipped; the agreement rate, generations and accuracy hold it to the recipe's thresholds).
        # At full precision every sample is compared: there the kept indices must be identical.
        same_rows = np.ones(len(chunk), dtype=bool)
        for a, b_ in zip(po.kept, ref_kept):
            if a.shape == tuple(b_.shape):
                same_rows &= ~(a != b_.cpu().numpy()).any(-1)
        rows = same_rows if reduced and not same_rows.all() else None
        stat("prefill.logits").add(po.logits, ref.logits.cpu().numpy(), rows=rows)
        for i in range(L):
            for j, w_ in enumerate(("key", "value")):
                stat(f"prefill.present.{i}.{w_}").add(po.kv[i][j], ref.kv[i][j].cpu().numpy(), rows=rows)
        for j, (a, b) in enumerate(zip(po.kept, ref_kept)):
            same_shape = a.shape == tuple(b.shape)
            rows = int((a != b.cpu().numpy()).any(-1).sum()) if same_shape else len(chunk)
            kept_bad[f"kept.{j}"] = kept_bad.get(f"kept.{j}", 0) + rows
            agree = _agreement(a, b.cpu().numpy()) if same_shape else np.zeros(len(chunk))
            kept_agree.setdefault(f"kept.{j}", []).extend(agree.tolist())
        if len(po.kept) != len(ref_kept):
            kept_bad["count"] = abs(len(po.kept) - len(ref_kept))
        # decode: one step from PyTorch's prefill state (the runtime's fixed-capacity caches hold
        # PyTorch's prefill keys/values; the reference is PrunedModel.decode, which concatenates)
        b = ids.shape[0]
        nxt = ref.logits.argmax(-1)[:, None]
        pos = (pm.text_pos0 + ref.text_len)[:, None]
        text_mask = torch.cat([tm[:, p + n :], torch.ones(b, 1, dtype=tm.dtype, device=dev)], dim=1)
        with torch.inference_mode():
            dl, dkv = pm.decode(nxt, pos, text_mask, ref.kv)
        from vpexport.runtime.kv_cache import KVCache

        cache = KVCache([[k.cpu().numpy(), v.cpu().numpy()] for k, v in ref.kv], mask[:, p + n :], steps=1, dtype=rt.kv_dtype)
        ol = rt.decode(nxt.cpu().numpy(), pos.cpu().numpy().astype(np.int64), cache)
        stat("decode.logits").add(ol, dl.cpu().numpy())
        for i, kv_i in enumerate(cache.views()):
            for j, w_ in enumerate(("key", "value")):
                stat(f"decode.new.{i}.{w_}").add(kv_i[j][:, :, -1:], dkv[i][j][:, :, -1:].cpu().numpy())
        # ---- end to end greedy generation
        ta = pipe.answer(images, questions)
        oa = rt.answer(images, questions)
        torch_tokens += [a.tokens for a in ta]
        torch_text += [a.text for a in ta]
        onnx_tokens += [a["tokens"] for a in oa]
        onnx_text += [a["text"] for a in oa]

    refs = [s.answer for s in data]
    task = recipe.task.type
    acc_t, acc_o = score(task, torch_text, refs)["accuracy"], score(task, onnx_text, refs)["accuracy"]
    matches = [a == b for a, b in zip(onnx_tokens, torch_tokens)]
    rate = sum(matches) / len(matches)
    vr = recipe.validation
    need = vr.reduced_precision.min_generation_match if reduced else vr.min_generation_match
    outputs = {k: s.row() for k, s in stats.items()}
    failures = []
    for k, r in outputs.items():
        if not r["passed"]:
            what = r.get("error") or (
                f"max_abs {r['max_abs']:.3g} max_rel {r['max_rel']:.3g}, {r['mismatched_elements']}/{r['elements']} "
                f"elements outside atol {atol:g} + rtol {rtol:g}" if r["rel_l2"] is None else
                f"relative L2 error up to {r['max_rel_l2']:.3g}, {r['mismatched_elements']}/{r['elements']} samples "
                f"above {r['rel_l2']:g}"
            )
            failures.append(f"{k}: {what}")
    if not input_ids_equal:
        failures.append("runtime tokenizer: input_ids differ from the checkpoint's processor")
    agreement = {k: float(np.mean(v)) for k, v in kept_agree.items()}
    if kept_bad.get("count"):
        failures.append(f"prefill: {kept_bad['count']} kept-index output(s) missing")
    if reduced:
        need_kept = vr.reduced_precision.min_kept_agreement
        for k, a in agreement.items():
            if a < need_kept:
                failures.append(f"prefill.{k}: kept-index agreement {a:.4f} < {need_kept:g} ({run_precision})")
    else:
        for k, v in kept_bad.items():
            if v and k != "count":
                failures.append(f"prefill.{k}: kept indices differ on {v} sample(s)")
    if rate < need:
        first = [i for i, m in enumerate(matches) if not m][:3]
        failures.append(
            f"generation: {sum(matches)}/{len(matches)} greedy generations identical ({rate:.3f} < {need:g}); "
            f"first mismatching samples {first}"
        )
    acc_slack = vr.reduced_precision.max_accuracy_delta if reduced else 1.0 - need
    if abs(acc_o - acc_t) > acc_slack + 1e-12:
        failures.append(f"accuracy: artifacts {acc_o:.4f} vs torch {acc_t:.4f} (allowed difference {acc_slack:g})")
    report = {
        "passed": not failures,
        "artifact_dir": str(d),
        "precision": precision,
        "runtime_precision": run_precision,
        "reduced_precision": reduced,
        "provider": provider,
        "torch": torch_device.record(),
        "samples": len(data),
        "samples_requested": n_req,
        "tolerances": {"atol": atol, "rtol": rtol, "rule": "|onnx - torch| <= atol + rtol * |torch|"}
        if not reduced else {"rel_l2": tol.rel_l2, "rule": "per sample ||onnx - torch||_2 <= rel_l2 * ||torch||_2"},
        "outputs": outputs,
        "input_ids_equal": input_ids_equal,
        "pixel_values_max_abs": pixel_err,
        "kept_indices_equal": not any(kept_bad.values()),
        "kept_mismatched_samples": kept_bad,
        "kept_agreement": agreement,
        "generation_match_rate": rate,
        "generation_matched": sum(matches),
        "min_generation_match": need,
        "generation_mismatches": [
            {"sample": i, "onnx": onnx_tokens[i], "torch": torch_tokens[i]} for i, m in enumerate(matches) if not m
        ][:10],
        "accuracy": {"onnx": acc_o, "torch": acc_t, "metric": MAIN_METRIC[task]},
        "failures": failures,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    # The manifest lives in the folder, so it records what was validated (the digest), not where:
    # a path would name the staging folder after `vpexport build` swaps it into place.
    section = {k: v for k, v in report.items() if k not in ("generation_mismatches", "artifact_dir")}
    section["artifact_digest"] = artifact_digest(read_manifest(d, verify=False))
    update_manifest(d, "validation", section)
    return report


def format_report(r: dict) -> str:
    """A Polygraphy-style comparison table plus the summary lines."""
    lines = [
        f"validate {r['artifact_dir']} ({r['provider']} at {r.get('runtime_precision', r['precision'])}, "
        f"export {r['precision']}, {r['samples']} samples; PyTorch on {r.get('torch', {}).get('device', 'cpu')})",
        f"{'output':<30} {'max_abs':>10} {'max_rel':>10} {'rel_l2':>9} {'limit':>17}  result",
    ]
    for k, o in r["outputs"].items():
        limit = f"a{o['atol']:.2g} r{o['rtol']:.2g}" if o.get("rel_l2") is None else f"l2 {o['rel_l2']:.2g}"
        skipped = f" ({o['skipped_samples']} skipped)" if o.get("skipped_samples") else ""
        lines.append(
            f"{k:<30} {o['max_abs']:>10.3g} {o['max_rel']:>10.3g} {o.get('max_rel_l2', 0):>9.3g} {limit:>17}  "
            + ("PASS" if o["passed"] else "FAIL") + skipped
        )
    lines.append(f"input ids (runtime tokenizer vs processor): {'equal' if r['input_ids_equal'] else 'DIFFER'}")
    agree = ", ".join(f"{k} {v:.4f}" for k, v in r.get("kept_agreement", {}).items())
    lines.append(
        "kept indices: " + ("identical at every prune point" if r["kept_indices_equal"] else f"DIFFER {r['kept_mismatched_samples']}")
        + (f" (agreement {agree})" if agree else "")
    )
    lines.append(
        f"greedy generation: {r['generation_matched']}/{r['samples']} identical ({r['generation_match_rate']:.3f}, "
        f"need {r['min_generation_match']:g})"
    )
    a = r["accuracy"]
    lines.append(f"accuracy ({a['metric']}): onnx {a['onnx']:.4f}  torch {a['torch']:.4f}")
    if r["samples"] < r["samples_requested"]:
        lines.append(f"note: the eval split has only {r['samples']} samples ({r['samples_requested']} requested)")
    if r["passed"]:
        lines.append(f"PASSED in {r['seconds']} s")
    else:
        lines.append(f"FAILED: {len(r['failures'])} problem(s):")
        lines += [f"  - {f}" for f in r["failures"]]
    return "\n".join(lines)


def report_json(r: dict) -> str:
    return json.dumps(r, indent=2)

"""`vpexport analyze`: how a model uses its visual tokens, layer by layer (dense model).

All statistics come from re-running the decoder layers with the model's own q/k/v (the
`PrunedModel` pieces, eager attention probabilities; no hooks). Query / key groups follow the
prompt layout [system][visual][text]; padded text positions are excluded.

Per layer l (means over the analysed samples):
* flows (HiMAP): `text->visual` mean attention mass a text query puts on visual keys;
  `visual->visual` the same for visual queries; `visual->text` the information flow from the
  image into the text: the share ||sum_{j visual} a_ij v_j|| / ||o_i|| of a text token's
  attention output carried by visual values (above 1 where the visual and text parts of o_i
  partly cancel; queries attend keys; with causal masking visual
  queries never see text keys, so the attention mass in that direction is zero by construction).
* visual share: the share of each query group's attention (system, visual, text) on visual keys.
* value contribution (VisiPruner): for the last token, c_j = a_{last,j} v_j per head,
  concatenated before o_proj, o = the last token's attention output; cos(o - c_j, o) per j.
  Fusion layer (per sample): the first layer where some visual token has cos < 0.995. Exit
  layer: after the fusion layer, the layer after the second layer (counted cumulatively) in
  which every visual token gives cos >= 0.999 (from there on the tokens can be dropped).
  Large-contribution counts: ||c_j|| > 0.2 (the paper's absolute threshold, tuned for
  LLaVA-1.5-7B's activation scale) and ||c_j|| > 0.1 ||o|| (relative: scale-free, so it also
  means something on a small model).
* concentration: how many visual tokens hold 90% of the text->visual attention.
* causal check: block text<-visual attention from layer l on and measure the answers
  (accuracy, and KL(dense || blocked) of the first answer token). Visual rows never read text
  (causal mask), so blocking from l on is exactly dropping every visual token at layer l;
  it is run that way (a drop-all point at l) through the calibration runner.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from vpexport.calibrate.runner import Runner, accuracy, first_token_kl
from vpexport.model.pruned import PrunedModel
from vpexport.pruning.schedule import PrunePoint, Schedule

FUSION_COS = 0.995
EXIT_COS = 0.999
EXIT_LAYERS = 2
ABS_NORM = 0.2
REL_NORM = 0.1
CONCENTRATION = 0.9
GROUPS = ("system", "visual", "text")


# ---------------------------------------------------------------------------- statistics
def value_contribution_cos(probs_last: torch.Tensor, v: torch.Tensor, o: torch.Tensor):
    """cos(o - c_j, o) and ||c_j|| for every key j.

    probs_last (B, H, K): the last token's attention row; v (B, H, K, hd); o (B, H, hd) its
    attention output (= sum_j c_j). Heads are concatenated (before o_proj). Returns (B, K) each."""
    b, h, k, hd = v.shape
    c = (probs_last[..., None] * v).permute(0, 2, 1, 3).reshape(b, k, h * hd)  # (B, K, H*hd)
    of = o.reshape(b, 1, h * hd)
    cos = F.cosine_similarity(of - c, of.expand_as(c), dim=-1, eps=1e-12)
    return cos, c.norm(dim=-1)


def fusion_and_exit(min_cos: list[float], max_cos_all: list[bool] | None = None) -> tuple[int | None, int | None]:
    """Per-sample fusion layer and exit (drop) layer from the per-layer minimum cos over visual tokens."""
    fusion = next((l for l, c in enumerate(min_cos) if c < FUSION_COS), None)
    if fusion is None:
        return None, None
    quiet = 0
    for l in range(fusion + 1, len(min_cos)):
        if min_cos[l] >= EXIT_COS:
            quiet += 1
            if quiet == EXIT_LAYERS:
                return fusion, l + 1 if l + 1 < len(min_cos) else None
    return fusion, None


def tokens_for_mass(weights: torch.Tensor, mass: float = CONCENTRATION) -> torch.Tensor:
    """(B, N) non-negative -> (B,) the fewest tokens whose weights hold `mass` of the total."""
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    cs = w.sort(dim=-1, descending=True).values.cumsum(-1)
    return (cs < mass - 1e-9).sum(-1) + 1


@torch.inference_mode()
def layer_stats(pl: PrunedModel, ids, mask, feats) -> list[dict]:
    """Per-layer per-sample statistics of one batch (dense model, eager attention)."""
    p, n = pl.prefix, pl.visual_tokens
    b, seq = ids.shape
    idx = torch.arange(seq, device=mask.device)
    group = torch.zeros(seq, dtype=torch.long, device=mask.device)
    group[p : p + n] = 1
    group[p + n :] = 2
    rows_valid = mask.to(torch.bool)  # (B, S) valid query rows
    out = []

    # The layers run through PrunedModel.run_layers; each layer's q/k/v are observed here.
    def observe(i, state, q, kr, vr, allowed, last_idx, h_out):
        logits = torch.matmul(q, kr.transpose(-1, -2)) / math.sqrt(pl.head_dim)
        probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).float(), dim=-1)
        attn = torch.matmul(probs, vr)  # (B, H, S, hd)
        pm = probs.mean(1)  # (B, S, S) head-averaged
        st: dict = {}
        # attention mass by (query group, key group): mean over valid query rows of the group
        mass = {}
        for gq, qn in enumerate(GROUPS):
            rsel = (group == gq)[None] & rows_valid  # (B, S)
            cnt = rsel.sum(-1).clamp_min(1)
            for gk, kn in enumerate(GROUPS):
                m = pm[:, :, group == gk].sum(-1)  # (B, S)
                mass[(qn, kn)] = ((m * rsel).sum(-1) / cnt).tolist()
        st["mass"] = {f"{a}->{c}": v_ for (a, c), v_ in mass.items()}
        # visual -> text information flow: share of text tokens' attention output from visual values
        o_vis = torch.matmul(probs[..., p : p + n], vr[:, :, p : p + n])  # (B, H, S, hd)
        o_flat = attn.transpose(1, 2).reshape(b, seq, -1)
        ov_flat = o_vis.transpose(1, 2).reshape(b, seq, -1)
        share = ov_flat.norm(dim=-1) / o_flat.norm(dim=-1).clamp_min(1e-12)  # (B, S)
        tsel = (idx >= p + n)[None] & rows_valid
        st["visual_value_share_text"] = ((share * tsel).sum(-1) / tsel.sum(-1).clamp_min(1)).tolist()
        # value contribution of visual tokens to the last token
        gi = last_idx[:, None, None, None].expand(b, pl.num_heads, 1, seq)
        pr_last = torch.gather(probs, 2, gi)[:, :, 0]  # (B, H, S)
        o_last = torch.gather(attn, 2, last_idx[:, None, None, None].expand(b, pl.num_heads, 1, pl.head_dim))[:, :, 0]
        cosv, cnorm = value_contribution_cos(pr_last[..., p : p + n], vr[:, :, p : p + n], o_last)
        onorm = o_last.reshape(b, -1).norm(dim=-1)
        st["min_cos"] = cosv.min(-1).values.tolist()
        st["large_abs"] = (cnorm > ABS_NORM).sum(-1).tolist()
        st["large_rel"] = (cnorm > REL_NORM * onorm[:, None]).sum(-1).tolist()
        st["o_norm"] = onorm.tolist()
        # concentration of text->visual attention (summed over text rows, head-averaged)
        tv = (pm[:, :, p : p + n] * tsel[:, :, None]).sum(1)  # (B, n)
        st["tokens_90"] = tokens_for_mass(tv).tolist()
        # and of the last token's attention (FastV's score)
        st["tokens_90_last"] = tokens_for_mass(pr_last[..., p : p + n].mean(1)).tolist()
        out.append(st)

    pl.run_layers(pl.start_state(ids, mask, feats), observe=observe)
    return out


def _blocked_model(runner: Runner, layer: int) -> PrunedModel:
    """A model whose text never attends visual keys from `layer` on (= drop every visual token there)."""
    if layer >= 1:
        return runner.model_for(Schedule("block", (PrunePoint(layer, 0, "drop_all"),)))
    pl = PrunedModel(runner.pipe.model, Schedule("block", (PrunePoint(1, 0, "drop_all"),)), runner.p,
                     image_size=runner.pipe.image_size)
    pl.points = {0: PrunePoint(0, 0, "drop_all")}
    pl.visual_per_layer = [0] * pl.num_layers
    return pl


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median_low(xs) if xs else None


def analyze_runner(runner: Runner, progress=None, tolerance: float = 0.01) -> dict:
    """All statistics over the runner's samples (its dense pass is reused for the causal check)."""
    L = runner.L
    pl = runner.base
    per_layer: list[dict] = [dict() for _ in range(L)]

    def add(l, key, vals):
        per_layer[l].setdefault(key, []).extend(vals)

    for eb in runner.batches:
        for l, st in enumerate(layer_stats(pl, eb.ids, eb.mask, eb.feats)):
            for k, v in st["mass"].items():
                add(l, k, v)
            for k in ("visual_value_share_text", "min_cos", "large_abs", "large_rel", "o_norm", "tokens_90", "tokens_90_last"):
                add(l, k, st[k])
        if progress is not None:
            progress.update(1)
    n_samples = len(per_layer[0]["min_cos"])
    fusion, exit_ = [], []
    for s in range(n_samples):
        f, e = fusion_and_exit([per_layer[l]["min_cos"][s] for l in range(L)])
        fusion.append(f)
        exit_.append(e)

    # causal check
    dense = runner.dense()
    dense_acc = accuracy(dense.scores)
    dense_logits = torch.cat(dense.first_logits)
    causal = []
    for l in range(L):
        res = runner.run(Schedule("block"), keep_logits=True, pl=_blocked_model(runner, l))
        kl = first_token_kl(dense_logits, torch.cat(res.first_logits))
        agree = sum(a == b for a, b in zip(res.preds, dense.preds)) / len(res.preds)
        causal.append({"block_from": l, "accuracy": accuracy(res.scores), "accuracy_change": accuracy(res.scores) - dense_acc,
                       "kl_first_token": _mean(kl), "agreement_with_dense": agree})
        if progress is not None:
            progress.update(1)

    layers = []
    for l in range(L):
        d = per_layer[l]
        row = {"layer": l}
        for k in [f"{a}->{c}" for a in GROUPS for c in GROUPS]:
            row[k] = _mean(d[k])
        row["flows"] = {"text->visual": row["text->visual"], "visual->visual": row["visual->visual"],
                        "visual->text": _mean(d["visual_value_share_text"])}
        row["visual_share"] = {g: row[f"{g}->visual"] for g in GROUPS}
        row["min_cos"] = {"mean": _mean(d["min_cos"]), "min": min(d["min_cos"]), "max": max(d["min_cos"])}
        row["fusion_samples"] = sum(c < FUSION_COS for c in d["min_cos"]) / n_samples
        row["quiet_samples"] = sum(c >= EXIT_COS for c in d["min_cos"]) / n_samples
        row["large_abs"] = _mean(d["large_abs"])
        row["large_rel"] = _mean(d["large_rel"])
        row["o_norm"] = _mean(d["o_norm"])
        row["tokens_90"] = _mean(d["tokens_90"])
        row["tokens_90_median"] = _median(d["tokens_90"])
        row["tokens_90_last"] = _mean(d["tokens_90_last"])
        layers.append(row)

    f_med, e_med = _median(fusion), _median(exit_)
    # causal deep stage: the first layer from which blocking text<-visual keeps accuracy within tolerance
    deep_causal = next((c["block_from"] for c in causal if c["accuracy_change"] >= -tolerance), L)
    stages = _stages(f_med, e_med, deep_causal, L)
    fl = f_med if f_med is not None else 0
    return {
        "samples": n_samples,
        "num_layers": L,
        "visual_tokens": runner.N,
        "prefix": runner.p,
        "thresholds": {"fusion_cos": FUSION_COS, "exit_cos": EXIT_COS, "exit_layers": EXIT_LAYERS,
                       "large_abs_norm": ABS_NORM, "large_rel_norm": REL_NORM, "concentration_mass": CONCENTRATION,
                       "causal_tolerance": tolerance},
        "dense_accuracy": dense_acc,
        "layers": layers,
        "per_sample": {"fusion_layer": fusion, "exit_layer": exit_},
        "fusion_layer": {"median": f_med, "mean": _mean(fusion), "none": sum(f is None for f in fusion)},
        "exit_layer": {"median": e_med, "mean": _mean(exit_), "none": sum(e is None for e in exit_)},
        "causal": causal,
        "causal_deep_start": deep_causal,
        "stages": stages,
        "seeds": {
            "fusion_layer": f_med,
            "exit_layer": e_med if e_med is not None else deep_causal,
            "deep_start": deep_causal,
            "fusion_keep_abs": _median(per_layer[fl]["large_abs"]),
            "fusion_keep_rel": _median(per_layer[fl]["large_rel"]),
            "concentration": {l: layers[l]["tokens_90_median"] for l in range(L)},
            "concentration_last": {l: _median(per_layer[l]["tokens_90_last"]) for l in range(L)},
        },
    }


def _stages(fusion: int | None, exit_: int | None, deep_causal: int, L: int) -> list[dict]:
    """shallow sink [0, fusion), fusion [fusion, deep), deep [deep, L)."""
    deep = exit_ if exit_ is not None else deep_causal
    st = []
    if fusion is None:
        if deep > 0:
            st.append({"stage": "shallow sink", "layers": [0, deep - 1],
                       "why": "no fusion layer found: no single visual token moves the last token's output"})
        if deep < L:
            st.append({"stage": "deep", "layers": [deep, L - 1],
                       "why": "blocking text<-visual from here on keeps accuracy within tolerance"})
        return st
    deep = max(deep, fusion + 1)
    if fusion > 0:
        st.append({"stage": "shallow sink", "layers": [0, fusion - 1],
                   "why": "no single visual token changes the last token's attention output (cos >= %.3f)" % FUSION_COS})
    st.append({"stage": "fusion", "layers": [fusion, min(deep, L) - 1],
               "why": "a few visual tokens move the last token's output (cos < %.3f at the first of these layers)" % FUSION_COS})
    if deep < L:
        st.append({"stage": "deep", "layers": [deep, L - 1],
                   "why": "visual tokens no longer matter (value-contribution exit, or causal block within tolerance)"})
    return st


# ---------------------------------------------------------------------------- outputs
def plot_all(a: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = a["num_layers"]
    xs = list(range(L))
    lay = a["layers"]
    files = []

    def fig(name, title, ylabel):
        f, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.set_title(title)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        return f, ax

    def save(f, ax, name, legend=True):
        if legend:
            ax.legend(loc="best", fontsize=9)
        f.tight_layout()
        f.savefig(out / name)
        plt.close(f)
        files.append(name)

    f, ax = fig("flows", f"Attention flows per layer ({a['samples']} samples)", "mean share")
    for k, lab in (("text->visual", "text->visual: text queries' attention mass on visual keys"),
                   ("visual->visual", "visual->visual: visual queries' mass on visual keys"),
                   ("visual->text", "visual->text: share of text tokens' attention output from visual values")):
        ax.plot(xs, [r["flows"][k] for r in lay], marker="o", label=lab)
    # the visual->text norm ratio exceeds 1 where the visual and text parts of o partly cancel
    ax.set_ylim(0, max(1.02, 1.05 * max(r["flows"]["visual->text"] for r in lay)))
    save(f, ax, "flows.png")

    f, ax = fig("value_contribution", "Value-contribution test: min over visual tokens of cos(o - c_j, o), last token",
                "cos(o - c_j, o)")
    ax.plot(xs, [r["min_cos"]["mean"] for r in lay], marker="o", label="mean over samples")
    ax.fill_between(xs, [r["min_cos"]["min"] for r in lay], [r["min_cos"]["max"] for r in lay], alpha=0.2,
                    label="range over samples")
    ax.axhline(FUSION_COS, color="tab:red", ls="--", label=f"fusion threshold {FUSION_COS}")
    ax.axhline(EXIT_COS, color="tab:green", ls=":", label=f"exit threshold {EXIT_COS}")
    # The two thresholds sit 0.004 apart at the top of the scale: a second panel over [0.98, 1]
    # separates them and shows the layers whose mean comes near them.
    f.set_size_inches(10.5, 4.2)
    zoom = f.add_axes([0.70, 0.14, 0.28, 0.74])
    ax.set_position([0.07, 0.14, 0.56, 0.74])
    zoom.plot(xs, [r["min_cos"]["mean"] for r in lay], marker="o")
    zoom.axhline(FUSION_COS, color="tab:red", ls="--")
    zoom.axhline(EXIT_COS, color="tab:green", ls=":")
    zoom.set_ylim(0.98, 1.0005)
    zoom.set_xticks(xs)
    zoom.set_xlabel("decoder layer")
    zoom.set_title("the same, 0.98 to 1")
    zoom.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    f.savefig(out / "value_contribution.png")
    plt.close(f)
    files.append("value_contribution.png")

    f, ax = fig("large_contribution", "Visual tokens with a large value contribution to the last token", "tokens (mean)")
    ax.plot(xs, [r["large_abs"] for r in lay], marker="o", label=f"||c_j|| > {ABS_NORM} (absolute, 7B scale)")
    ax.plot(xs, [r["large_rel"] for r in lay], marker="s", label=f"||c_j|| > {REL_NORM} ||o|| (relative)")
    save(f, ax, "large_contribution.png")

    f, ax = fig("fusion_exit", "Per-sample fusion and exit layers", "samples")
    import numpy as np

    w = 0.4
    fu = a["per_sample"]["fusion_layer"]
    ex = a["per_sample"]["exit_layer"]
    ax.bar(np.array(xs) - w / 2, [sum(v == l for v in fu) for l in xs], width=w,
           label=f"fusion layer ({sum(v is None for v in fu)} of {len(fu)} samples have none)")
    ax.bar(np.array(xs) + w / 2, [sum(v == l for v in ex) for l in xs], width=w,
           label=f"exit (drop) layer ({sum(v is None for v in ex)} of {len(ex)} samples have none: no layer passes the exit test)")
    save(f, ax, "fusion_exit.png")

    f, ax = fig("concentration", f"Visual tokens holding {int(CONCENTRATION * 100)}% of the attention on the image",
                f"tokens (of {a['visual_tokens']})")
    ax.plot(xs, [r["tokens_90"] for r in lay], marker="o", label="text->visual (all text queries)")
    ax.plot(xs, [r["tokens_90_last"] for r in lay], marker="s", label="last token only (FastV's score)")
    ax.set_yscale("log")
    # Plain token counts on the log axis (its default labels read 6x10^1 between the decades).
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    lo = min(min(r["tokens_90"], r["tokens_90_last"]) for r in lay)
    hi = max(max(r["tokens_90"], r["tokens_90_last"]) for r in lay)
    steps = (1, 2, 3, 5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200, 300, 400, 500, 600, 800, 1000, 1500,
             2000, 3000, 5000, 10000)
    ticks = [t for t in steps if lo / 1.3 <= t <= hi * 1.3]
    ax.yaxis.set_major_locator(FixedLocator(ticks or [lo, hi]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    save(f, ax, "concentration.png")

    f, ax = fig("causal", "Causal check: text<-visual attention blocked from layer l on", "accuracy change vs dense")
    c = a["causal"]
    ax.plot(xs, [r["accuracy_change"] for r in c], marker="o", color="tab:blue", label="accuracy change (left)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("first blocked layer l")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["kl_first_token"] for r in c], marker="s", color="tab:orange", label="KL of first answer token (right)")
    ax2.set_ylabel("KL(dense || blocked), nats")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9)
    save(f, ax, "causal.png", legend=False)
    return files


def report_md(a: dict, recipe_name: str, plots: list[str]) -> str:
    L = a["num_layers"]
    lines = [f"# Visual-token analysis: {recipe_name}", "",
             f"{a['samples']} calibration samples, {L} decoder layers, {a['visual_tokens']} visual tokens, "
             f"dense accuracy {a['dense_accuracy']:.3f}.", "", "## Stages found", ""]
    for s in a["stages"]:
        lo, hi = s["layers"]
        lines.append(f"- **{s['stage']}**: layers {lo}-{hi} ({s['why']})")
    fl, ex = a["fusion_layer"], a["exit_layer"]
    lines += ["", f"Fusion layer (first layer with a visual token at cos < {FUSION_COS}): median {fl['median']}, "
              f"mean {_fmt(fl['mean'])} ({fl['none']} samples without one). Exit (drop) layer: median {ex['median']}, "
              f"mean {_fmt(ex['mean'])} ({ex['none']} samples without one). Causal deep stage (blocking text<-visual "
              f"from there on changes accuracy by at most {a['thresholds']['causal_tolerance']:.2f}): layer {a['causal_deep_start']}.",
              "", "## Per layer", "",
              "| layer | text->visual | visual->visual | visual->text (value share) | min cos (mean) | large ||c|| abs / rel | tokens for 90% | block from l: acc change / KL |",
              "|---|---|---|---|---|---|---|---|"]
    for r, c in zip(a["layers"], a["causal"]):
        fw = r["flows"]
        lines.append(f"| {r['layer']} | {fw['text->visual']:.3f} | {fw['visual->visual']:.3f} | {fw['visual->text']:.3f} | "
                     f"{r['min_cos']['mean']:.4f} | {r['large_abs']:.1f} / {r['large_rel']:.1f} | {r['tokens_90']:.1f} | "
                     f"{c['accuracy_change']:+.3f} / {c['kl_first_token']:.3f} |")
    lines += ["", "Thresholds: large contribution ||c_j|| > 0.2 is VisiPruner's absolute threshold for LLaVA-1.5-7B; "
              f"the relative one (||c_j|| > {REL_NORM} ||o||) does not depend on the model's activation scale "
              f"(mean ||o|| of the last token here: {_fmt(_mean([r['o_norm'] for r in a['layers']]))}).", "",
              "Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def write_analysis(a: dict, dest: Path, recipe_name: str) -> Path:
    """Write analysis.json, plots and analysis.md into `dest` atomically (temp dir + rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        plots = plot_all(a, tmp)
        (tmp / "analysis.json").write_text(json.dumps(a, indent=2))
        (tmp / "analysis.md").write_text(report_md(a, recipe_name, plots))
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest

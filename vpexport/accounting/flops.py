"""FLOPs accounting, exact and in the papers' convention. Pure Python (no torch).

Conventions (see docs/recipes.md, "FLOPs conventions"):

* 1 multiply-add = 2 FLOPs. Biases, norms, activations, RoPE and softmax are ignored
  (they are O(n*d), negligible next to the matmuls); the final norm is ignored.
* Exact prefill FLOPs, per decoder layer l with n_l = prefix + visual_l + text tokens
  (visual_l from `Schedule.visual_per_layer`), hidden d, heads H, KV heads KV, head dim hd,
  FFN width m:
      q_proj 2*n*d*(H*hd);  k_proj, v_proj 2*n*d*(KV*hd) each (GQA-aware);  o_proj 2*n*(H*hd)*d
      attention QK^T and AV: 2*n*n*(H*hd) each -- the FULL n x n rectangle, not the causal
        triangle: what a masked MatMul-Softmax-MatMul (SDPA math) computes. The exported prefill
        skips part of it (causal row blocks over the [prefix][visual] head, docs/export.md), so
        for that graph these counts are the reference work, above what it executes (more so for
        the unpruned model, whose long segments have the most masked work);
      SwiGLU FFN: 3 matrices, 2*n*d*m each.
  lm_head only on the last position of each sample: 2*d*V.
* Scoring overhead at each prune point K (read from layer K-1, n = tokens at layer K-1,
  visual_in = visual tokens at layer K-1): last_token_attention 2*1*n*(H*hd);
  text_attention 2*text*n*(H*hd); visual_attention 2*visual_in*n*(H*hd);
  value_contribution 2*1*n*(H*hd) + 2*visual_in*(H*hd); random / uniform / drop_all 0.
* Vision graph: the family's vision spec counts it (vpexport/families). LLaVA's CLIP: patch conv
  2*patches*(C*p*p)*dv, then `vision.layers_run` encoder layers at n_v = patches + 1 (CLS):
  q,k,v,o 4 matrices 2*n_v*dv*dv each, attention 2*2*n_v*n_v*dv, MLP 2*2*n_v*dv*mv; projector
  2*N*dv*d + 2*N*d*d. Qwen2-VL / 2.5-VL: one patch conv over P patches (the still image's two
  temporal frames folded into it), per block qkv 2*P*dv*3dv, proj 2*P*dv^2, attention 2*2*P^2*dv
  (Qwen2.5's windowed blocks: the sum over windows of 2*2*w^2*dv), MLP 2 (3 gated) matrices
  2*P*dv*mv; merger 2*N*(4dv)^2 + 2*N*4dv*d.
* Everything is multiplied by the batch size.

The papers' convention (`paper_flops`, FastV / HiMAP): per decoder layer
f(n) = 4nd^2 + 2n^2 d + 2ndm with n = the VISUAL tokens only; ratio = sum_l f(n_l) / (L * f(N)).
Counting only the image tokens is what reproduces HiMAP's published 24% for K1=2/288, K2=8/72
on LLaVA-1.5-7B (we get 0.2463), and FastV K=3 R=50% gives 0.5403 (the ~57% FastV quotes counts
system and instruction tokens too: see `ratio_all_tokens`).
"""

from __future__ import annotations

from vpexport.arch.layout import PromptLayout
from vpexport.arch.spec import ArchSpec, TextSpec
from vpexport.pruning.schedule import Schedule

LAYER_COMPONENTS = ("q_proj", "k_proj", "v_proj", "o_proj", "attn_qk", "attn_av", "ffn")


def decoder_layer_flops(t: TextSpec, n: int, kv_len: int | None = None) -> dict[str, int]:
    """One decoder layer on `n` query tokens attending to `kv_len` keys (default n: prefill)."""
    kv_len = n if kv_len is None else kv_len
    d, qd, kvd, m = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim, t.intermediate
    return {
        "q_proj": 2 * n * d * qd,
        "k_proj": 2 * n * d * kvd,
        "v_proj": 2 * n * d * kvd,
        "o_proj": 2 * n * qd * d,
        "attn_qk": 2 * n * kv_len * qd,
        "attn_av": 2 * n * kv_len * qd,
        "ffn": 3 * 2 * n * d * m,
    }


def scoring_flops(rule: str, t: TextSpec, n: int, text: int, visual_in: int, keep: int = 0) -> int:
    """Extra FLOPs of one prune point's scoring (per sample); read from layer K-1's tensors. Each
    rule states its own (vpexport/methods)."""
    from vpexport.methods import RULES

    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}")
    return RULES[rule].flops(t, n, text, visual_in, keep)


def vision_flops(arch: ArchSpec, batch: int = 1) -> dict[str, int]:
    """The vision graph's FLOPs (patch embedding, encoder, projector / merger), as the family's
    vision spec counts them for the static image size."""
    out = {k: x * batch for k, x in arch.vision.flops(arch.text.hidden).items()}
    out["total"] = sum(out.values())
    return out


def _tokens_per_layer(arch: ArchSpec, schedule: Schedule | None, layout: PromptLayout) -> tuple[list[int], list[int]]:
    L, N = arch.text.layers, layout.visual
    vis = (schedule or Schedule("none")).visual_per_layer(L, N)
    return vis, [layout.prefix + v + layout.text for v in vis]


def prefill_flops(arch: ArchSpec, schedule: Schedule | None, layout: PromptLayout) -> dict:
    """Exact prefill FLOPs, dense vs pruned, with a per-component and per-layer breakdown."""
    t, b, L = arch.text, layout.batch, arch.text.layers
    dense_n = layout.prefix + layout.visual + layout.text
    vis, ns = _tokens_per_layer(arch, schedule, layout)

    def zero():
        return {k: 0 for k in LAYER_COMPONENTS} | {"scoring": 0, "lm_head": 0}

    dense_c, pruned_c, per_layer = zero(), zero(), []
    dense_layer = decoder_layer_flops(t, dense_n)
    for layer in range(L):
        pl = decoder_layer_flops(t, ns[layer])
        for k in LAYER_COMPONENTS:
            dense_c[k] += dense_layer[k] * b
            pruned_c[k] += pl[k] * b
        per_layer.append(
            {"layer": layer, "visual": vis[layer], "tokens": ns[layer], "dense": sum(dense_layer.values()) * b, "pruned": sum(pl.values()) * b}
        )
    scoring = []
    for p in (schedule.points if schedule else ()):
        k = p.layer
        # A point at K scores from layer K-1; one at layer 0 from the projector's output (all tokens).
        n_in, vis_in = (ns[k - 1], vis[k - 1]) if k else (dense_n, layout.visual)
        f = scoring_flops(p.rule, t, n_in, layout.text, vis_in, p.keep) * b
        scoring.append({"layer": k, "rule": p.rule, "flops": f})
        pruned_c["scoring"] += f
        per_layer[max(0, k - 1)]["pruned"] += f
    lm = 2 * t.hidden * t.vocab * b
    dense_c["lm_head"] = pruned_c["lm_head"] = lm
    dense, pruned = sum(dense_c.values()), sum(pruned_c.values())
    vision = vision_flops(arch, b)
    return {
        "batch": b,
        # The one definition every command reports: these FLOPs at this prompt layout (the recipe's,
        # measured with its tokenizer; the bench's at the width the graphs run the text at).
        "tokens": {"prefix": layout.prefix, "visual": layout.visual, "text": layout.text},
        "components": {"dense": dense_c, "pruned": pruned_c},
        "scoring": scoring,
        "per_layer": per_layer,
        "vision": vision,
        "dense": dense,
        "pruned": pruned,
        "ratio": pruned / dense,
        "with_vision": {
            "dense": dense + vision["total"],
            "pruned": pruned + vision["total"],
            "ratio": (pruned + vision["total"]) / (dense + vision["total"]),
        },
    }


def decode_step_flops(arch: ArchSpec, schedule: Schedule | None, layout: PromptLayout, generated: int = 0) -> dict:
    """FLOPs of one decode step (1 new token per sample) after `generated` tokens were already
    produced. Layer l's cache holds n_l + generated entries (n_l follows the segments: pruned
    layers cache only the kept visual tokens); the new token attends to those plus itself."""
    t, b, L = arch.text, layout.batch, arch.text.layers
    dense_kv = layout.prefix + layout.visual + layout.text + generated
    _, ns = _tokens_per_layer(arch, schedule, layout)
    kv = [n + generated for n in ns]
    lm = 2 * t.hidden * t.vocab * b
    dense = sum(sum(decoder_layer_flops(t, 1, dense_kv + 1).values()) for _ in range(L)) * b + lm
    pruned = sum(sum(decoder_layer_flops(t, 1, c + 1).values()) for c in kv) * b + lm
    return {"generated": generated, "cache_len_per_layer": kv, "dense": dense, "pruned": pruned, "ratio": pruned / dense}


def paper_layer_flops(n: int, d: int, m: int) -> int:
    """f(n) = 4nd^2 + 2n^2 d + 2ndm (FastV / HiMAP)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_flops(arch: ArchSpec, schedule: Schedule | None, layout: PromptLayout | None = None) -> dict:
    """The papers' convention, n = visual tokens only: ratio = sum_l f(n_l) / (L * f(N)).

    With `layout`, also `ratio_all_tokens`: the same formula with n = prefix + visual_l + text."""
    t, L, N = arch.text, arch.text.layers, arch.visual_tokens
    vis = (schedule or Schedule("none")).visual_per_layer(L, N)
    d, m = t.hidden, t.intermediate
    dense = L * paper_layer_flops(N, d, m)
    pruned = sum(paper_layer_flops(n, d, m) for n in vis)
    out = {"convention": "f(n)=4nd^2+2n^2d+2ndm, n=visual tokens", "dense": dense, "pruned": pruned, "ratio": pruned / dense}
    if layout is not None:
        extra = layout.prefix + layout.text
        d_all = L * paper_layer_flops(N + extra, d, m)
        p_all = sum(paper_layer_flops(n + extra, d, m) for n in vis)
        out["ratio_all_tokens"] = p_all / d_all
    return out


# Dense prefill figures that papers publish, by built-in architecture, with the convention that
# reproduces them (`published_macs`): VisiPruner's 3.82 T for LLaVA-1.5-7B is the multiply-
# accumulates of the 32 decoder layers over the 576 visual tokens alone (3.817 T by that count).
PUBLISHED_DENSE = {
    "llava-1.5-7b": {"source": "VisiPruner (LLaVA-1.5-7B)", "dense": 3.82e12},
}
MACS_CONVENTION = ("multiply-accumulates of the decoder layers over the visual tokens only: q/k/v/o and the "
                   "three SwiGLU matrices per token, QK^T and AV over the visual tokens; no text, no lm_head")


def published_macs(arch: ArchSpec, schedule: Schedule | None) -> dict:
    """The convention of published dense figures such as VisiPruner's 3.82 T: exact per-layer
    multiply-accumulates (half the FLOPs of `decoder_layer_flops`) with n = the visual tokens a
    layer holds. `published`: the paper's dense figure for this architecture, where one exists."""
    t, L, N = arch.text, arch.text.layers, arch.visual_tokens
    vis = (schedule or Schedule("none")).visual_per_layer(L, N)
    dense = L * sum(decoder_layer_flops(t, N).values()) // 2
    pruned = sum(sum(decoder_layer_flops(t, n).values()) // 2 for n in vis)
    out = {"convention": MACS_CONVENTION, "dense": dense, "pruned": pruned, "ratio": pruned / dense}
    if arch.name in PUBLISHED_DENSE:
        out["published"] = dict(PUBLISHED_DENSE[arch.name])
    return out


def tokens_label(tokens: dict) -> str:
    """How a FLOPs ratio's prompt layout is named in every output: 'prompt 9+144+7 tokens'."""
    return f"prompt {tokens['prefix']}+{tokens['visual']}+{tokens['text']} tokens"

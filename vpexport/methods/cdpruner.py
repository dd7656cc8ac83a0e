"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs"; code: github.com/Theia-4869/CDPruner): before the decoder, keep the visual tokens that
maximise a determinantal point process conditioned on the instruction.

The rule, in the form OpenVINO GenAI ships for the LLM's own embedding space
(`src/cpp/src/visual_language/cdpruner/`: `conditional_kernel.cpp`, `fast_dpp.cpp`), which needs no
separate text encoder and so applies to every model family:
1. V: the projector's output (n, d); T: the mean input embedding of the prompt's other tokens
   (prefix and valid text); both L2-normalised as v / sqrt(sum v^2 + 1e-6);
2. relevance r_i = <V_i, T>, min-max normalised over the image: (r - min) / (max - min + 1e-6);
3. similarity S = V V^T; the conditional kernel L = (1 - w) S + w diag(r) S diag(r), with the
   relevance weight w = 0.5 (GenAI's default `relevance_weight`);
4. the greedy MAP inference of the DPP (Chen et al., NeurIPS 2018, "Fast Greedy MAP Inference for
   Determinantal Point Process"): d_i^2 = L_ii; `keep` times pick j = argmax d^2 (the lowest index on
   ties), e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j^2 + 1e-6), append e to the c's, d^2 -= e^2, and
   take j out.

Where it differs from its sources: the paper's reference code scores relevance with CLIP's text
tower (absent from a LLaVA or Qwen checkpoint) and uses diag(r) S diag(r) alone; GenAI by default
also splits the image into two halves, each with its own kernel and half the budget
(`split_threshold`), which this rule does not (one kernel, the paper's). d_j^2 is clamped at 0
under the square root: past the kernel's rank the updates leave values a rounding error below 0,
where GenAI's NaN guard has the same effect.

Static form: `keep` iterations unrolled (ArgMax, Gather, a growing stack of the c rows; no NonZero),
returning the 0/1 mask of the selected tokens, which the point's TopK turns into the same indices.
"""

from __future__ import annotations

from vpexport.methods.base import Method, ScoreRule, scaled_keep

RELEVANCE_WEIGHT = 0.5  # OpenVINO GenAI's default relevance_weight
EPS = 1e-6  # GenAI's numerical_threshold: L2 normalisation, min-max range, the DPP's square root
# The paper's most aggressive LLaVA-1.5 setting: 64 of 576 visual tokens.
DEFAULT_KEEP = 64


def _normalise(x):
    import torch

    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + EPS)


def conditional_kernel(v, t):
    """v (..., n, d) visual features, t (..., d) the instruction's mean embedding -> (..., n, n)
    CDPruner's kernel (1 - w) S + w diag(r) S diag(r), in float32."""
    import torch

    vn, tn = _normalise(v.float()), _normalise(t.float())
    r = torch.matmul(vn, tn.unsqueeze(-1)).squeeze(-1)  # (..., n)
    lo, hi = r.min(-1, keepdim=True).values, r.max(-1, keepdim=True).values
    r = (r - lo) / (hi - lo + EPS)
    s = torch.matmul(vn, vn.transpose(-1, -2))
    return (1.0 - RELEVANCE_WEIGHT) * s + RELEVANCE_WEIGHT * (r.unsqueeze(-1) * s * r.unsqueeze(-2))


class ConditionalDPP(ScoreRule):
    name = "conditional_dpp"
    summary = "instruction-conditioned DPP over the projector's output, greedy MAP (CDPruner)"
    keep_dependent = True
    pre_llm = True

    def score(self, x, keep):
        import torch

        p, n = x.p, x.n
        emb = x.h_out.float()  # (B, L, d): the sequence entering layer 0
        b, seq = emb.shape[:2]
        # The instruction: every valid token outside the image span (prefix and text).
        other = torch.cat([x.key_valid[:, :p], torch.zeros(b, n, dtype=torch.bool, device=emb.device),
                           x.key_valid[:, p + n :]], dim=1).to(emb.dtype)  # (B, L)
        text = (emb * other.unsqueeze(-1)).sum(1) / other.sum(1, keepdim=True).clamp_min(1.0)
        kernel = conditional_kernel(emb[:, p : p + n], text)  # (B, n, n)
        d2 = torch.diagonal(kernel, dim1=-2, dim2=-1)  # (B, n)
        chosen = torch.zeros(b, n, device=emb.device)
        cs = None  # (B, i, n) the c rows so far
        for _ in range(keep):
            j = d2.argmax(-1, keepdim=True)  # (B, 1)
            row = torch.gather(kernel, 1, j.unsqueeze(-1).expand(b, 1, n)).squeeze(1)  # (B, n) = L_j
            if cs is not None:
                cj = torch.gather(cs, 2, j.unsqueeze(1).expand(b, cs.shape[1], 1))  # (B, i, 1)
                row = row - (cj * cs).sum(1)
            e = row / torch.sqrt(torch.gather(d2, 1, j).clamp_min(0.0) + EPS)
            cs = e.unsqueeze(1) if cs is None else torch.cat([cs, e.unsqueeze(1)], dim=1)
            chosen = chosen.scatter(1, j, 1.0)
            d2 = (d2 - e * e).masked_fill(chosen > 0, float("-inf"))
        return chosen

    def flops(self, t, n, text, visual_in, keep=0):
        # the n x n similarities and the relevance over the hidden size, the kernel's elementwise
        # form, then step i of the greedy MAP: i multiply-adds per token for the c rows
        kernel = 2 * visual_in * visual_in * t.hidden + 2 * visual_in * t.hidden + 4 * visual_in * visual_in
        return kernel + sum(2 * i * visual_in for i in range(keep))

    def reference(self, x):
        """The kernel element by element and GenAI's `select_single_batch` as plain loops over
        Python lists, for one sample, in float64."""
        import torch

        seq = x.sequence.double()  # (L_valid, d)
        n, p = x.n, x.p
        others = [i for i in range(seq.shape[0]) if not p <= i < p + n]
        text = seq[others].mean(0)
        unit = [(v / ((v * v).sum() + EPS) ** 0.5) for v in x.features.double()]
        t = text / ((text * text).sum() + EPS) ** 0.5
        rel = [float(u @ t) for u in unit]
        lo, hi = min(rel), max(rel)
        rel = [(r - lo) / (hi - lo + EPS) for r in rel]
        w = RELEVANCE_WEIGHT
        kernel = [[(1 - w) * float(unit[i] @ unit[j]) + w * rel[i] * float(unit[i] @ unit[j]) * rel[j]
                   for j in range(n)] for i in range(n)]
        d2 = [kernel[i][i] for i in range(n)]
        cis: list[list[float]] = []
        selected: list[int] = []
        for _ in range(x.keep):
            best = 0
            for i in range(1, n):
                if d2[i] > d2[best]:  # strict: the lowest index wins a tie
                    best = i
            j = best
            denom = max(d2[j], 0.0) + EPS
            e = [(kernel[j][i] - sum(c[j] * c[i] for c in cis)) / denom**0.5 for i in range(n)]
            cis.append(e)
            selected.append(j)
            d2 = [float("-inf") if i in selected else d2[i] - e[i] * e[i] for i in range(n)]
        out = torch.zeros(n)
        out[selected] = 1.0
        return out


class CDPruner(Method):
    name = "cdpruner"
    summary = "one point before the decoder; keep the instruction-conditioned most diverse tokens (DPP)"
    reference = "CDPruner (Zhang et al., 2025), in OpenVINO GenAI's kernel form"
    rules = (ConditionalDPP(),)

    def default(self, layers, visual, task):
        keep = scaled_keep(DEFAULT_KEEP, visual)
        return self.schedule([(0, keep)], meta={"published": f"CDPruner {DEFAULT_KEEP} of 576 tokens at the projector"})

    def coarse(self, search):
        for k in search.keeps(search.N):
            yield [(0, k)], 0

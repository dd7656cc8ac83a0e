"""HiMAP ("Lifting the Veil", seed 002): two points. At K1 the visual tokens are ranked by the
attention they receive from every token after the image (text -> visual, stage 1); at K2 by the
attention they receive from the other visual tokens (visual -> visual, stage 2)."""

from __future__ import annotations

from vpexport.methods.base import Method, ScoreRule, attention_probs, scaled_keep, scaled_layer


class TextAttention(ScoreRule):
    name = "text_attention"
    summary = "attention each visual token receives from all tokens after the image (HiMAP stage 1)"

    def score(self, x, keep):
        t0 = x.p + x.n
        pr = attention_probs(x.q[:, :, t0:], x.k, x.allowed[:, :, t0:])  # (B, H, T, L)
        pr = pr * x.key_valid[:, None, t0:, None].to(pr.dtype)  # padded text rows do not vote
        return pr[:, :, :, x.p : x.p + x.n].sum(dim=2).mean(dim=1)

    def flops(self, t, n, text, visual_in, keep=0):
        return 2 * text * n * t.heads * t.head_dim

    def reference(self, x):
        rows = [r for r in range(x.p + x.n, x.probs.shape[1]) if x.text_valid[r - x.p - x.n]]
        return x.probs[:, rows][:, :, x.p : x.p + x.n].sum(1).mean(0)


class VisualAttention(ScoreRule):
    name = "visual_attention"
    summary = "attention each visual token receives from the other visual tokens (HiMAP stage 2)"

    def score(self, x, keep):
        vis = slice(x.p, x.p + x.n)
        pr = attention_probs(x.q[:, :, vis], x.k, x.allowed[:, :, vis])  # (B, H, n, L)
        return pr[:, :, :, vis].sum(dim=2).mean(dim=1)

    def flops(self, t, n, text, visual_in, keep=0):
        return 2 * visual_in * n * t.heads * t.head_dim

    def reference(self, x):
        vis = slice(x.p, x.p + x.n)
        return x.probs[:, vis, vis].sum(1).mean(0)


class HiMAP(Method):
    name = "himap"
    summary = "two points; text->visual attention at K1, visual->visual attention at K2"
    reference = "HiMAP, 'Lifting the Veil' (seed 002)"
    rules = (TextAttention(), VisualAttention())
    compared_at_equal_flops = True

    def default(self, layers, visual, task):
        k2 = 8 if task == "vqa" else 15
        k1l, k2l = scaled_layer(2, layers), scaled_layer(k2, layers)
        if k2l <= k1l:
            k2l = min(layers - 1, k1l + 1)
        return self.schedule(
            [(k1l, scaled_keep(288, visual)), (k2l, scaled_keep(72, visual))],
            meta={"published": f"HiMAP K1=2 keep 288, K2={k2} keep 72 ({task})"},
        )

    def coarse(self, search):
        conc = {int(k): v for k, v in (search.seeds.get("concentration") or {}).items()}
        L, N = search.L, search.N
        for K1 in range(1, L - 1):
            for k1 in search.keeps(N, [conc.get(K1 - 1)]):
                for K2 in range(K1 + 1, L):
                    for k2 in search.keeps(k1):
                        yield [(K1, k1), (K2, k2)], 0

"""FastV (Chen et al., 2024): one point at layer K; rank the visual tokens by the attention the
last token pays them at layer K-1, averaged over heads."""

from __future__ import annotations

from vpexport.methods.base import Method, ScoreRule, attention_probs, gather_rows, scaled_keep, scaled_layer


class LastTokenAttention(ScoreRule):
    name = "last_token_attention"
    summary = "attention the last text token pays each visual token (FastV)"

    def score(self, x, keep):
        idx = x.last_idx[:, None]
        pr = attention_probs(gather_rows(x.q, idx), x.k, gather_rows(x.allowed, idx))  # (B, H, 1, L)
        return pr[:, :, 0, x.p : x.p + x.n].mean(dim=1)

    def flops(self, t, n, text, visual_in, keep=0):
        return 2 * 1 * n * t.heads * t.head_dim

    def reference(self, x):
        return x.probs[:, x.last, x.p : x.p + x.n].mean(0)


class FastV(Method):
    name = "fastv"
    summary = "one point; rank visual tokens by the last token's attention at layer K-1"
    reference = "FastV (Chen et al., 2024)"
    rules = (LastTokenAttention(),)
    compared_at_equal_flops = True

    def default(self, layers, visual, task):
        return self.schedule([(scaled_layer(3, layers), scaled_keep(288, visual))], meta={"published": "FastV K=3 R=50%"})

    def coarse(self, search):
        conc_last = {int(k): v for k, v in (search.seeds.get("concentration_last") or {}).items()}
        for K in range(1, search.L):
            for k in search.keeps(search.N, [conc_last.get(K - 1)]):
                yield [(K, k)], 0

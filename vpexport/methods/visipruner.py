"""VisiPruner (seeds 000, 001), static form: a shallow sink stage (layers [0, sink_layers) hide the
visual keys from the text queries, layer 0 moving their visual attention mass onto the first
visual token), a fusion point that keeps the tokens whose value contribution to the last token is
largest, and an exit point that drops every remaining visual token."""

from __future__ import annotations

from pydantic import Field

from vpexport.methods.base import DropAll, Method, ScoreRule, attention_probs, gather_rows, scaled_keep, scaled_layer

MAX_SINK = 2  # calibration tries sink stages of 0..MAX_SINK layers


class ValueContribution(ScoreRule):
    name = "value_contribution"
    summary = "L2 norm of a_last,j * v_j, the last token's attention output from token j (VisiPruner fusion)"

    def score(self, x, keep):
        idx = x.last_idx[:, None]
        a = attention_probs(gather_rows(x.q, idx), x.k, gather_rows(x.allowed, idx))[:, :, 0, x.p : x.p + x.n]  # (B, H, n)
        vn2 = x.v[:, :, x.p : x.p + x.n].float().pow(2).sum(-1)  # (B, H, n)
        # ||c_j||_2 with c_j = a_{last,j} * v_j per head, heads concatenated (before o_proj)
        return (a.pow(2) * vn2).sum(dim=1).sqrt()

    def flops(self, t, n, text, visual_in, keep=0):
        qd = t.heads * t.head_dim
        return 2 * 1 * n * qd + 2 * visual_in * qd

    def reference(self, x):
        vis = slice(x.p, x.p + x.n)
        c = x.probs[:, x.last, vis][:, :, None] * x.v[:, vis]  # (H, n, hd)
        return c.permute(1, 0, 2).reshape(x.n, -1).norm(dim=-1)


class VisiPruner(Method):
    name = "visipruner"
    summary = "shallow sink stage, fusion-layer keep-k by value contribution, exit layer drops all"
    reference = "VisiPruner (seeds 000, 001), static form"
    rules = (ValueContribution(), DropAll())
    uses_sink = True
    # layers [0, sink_layers) hide the visual keys from the text queries
    options = {"sink_layers": (int, Field(0, ge=0))}

    def default(self, layers, visual, task):
        fusion, exit_ = scaled_layer(9, layers), scaled_layer(24, layers)
        if exit_ <= fusion:
            exit_ = min(layers - 1, fusion + 1)
        return self.schedule(
            [(fusion, scaled_keep(10, visual)), (exit_, 0)],
            sink_layers=min(scaled_layer(6, layers), fusion - 1),
            meta={"published": "VisiPruner 7B layout: sink < 6, ~10 fusion tokens, exit ~24 (static form)"},
        )

    def coarse(self, search):
        fk = [search.seeds.get("fusion_keep_abs"), search.seeds.get("fusion_keep_rel")]
        L, N = search.L, search.N
        for sink in range(0, MAX_SINK + 1):
            for Kf in range(sink + 1, L):
                for k in search.keeps(N, fk):
                    yield [(Kf, k)], sink
                    for Ke in range(Kf + 1, L):
                        yield [(Kf, k), (Ke, 0)], sink

"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): before the decoder, keep the most diverse visual tokens.

The rule, as the authors' code applies it to the projector's output: with the cosine distances
D = 1 - cos(x_i, x_j) between the visual tokens, a greedy max-min selection of `keep` tokens:
the first is the token farthest from its nearest neighbour (the largest second-smallest entry of
its column of D, the smallest being its own 0), each next one the token whose distance to the
nearest already selected token is largest.

Static form: the greedy loop runs a fixed `keep` iterations (unrolled, ArgMax and a running
minimum; no NonZero), and the score is the 0/1 mask of the selected tokens, which the point's
TopK turns into the same indices. A selected token is masked out of later steps; in the authors'
code it is excluded only by its distance 0 to itself, the same unless tokens are exact duplicates.
"""

from __future__ import annotations

from vpexport.methods.base import DropAll, Method, ScoreRule, scaled_keep, scaled_layer

# The authors' default budget: threshold_ratio 0.1 of the visual tokens.
DEFAULT_RATIO = 0.1


def cosine_distances(x):
    """(..., n, d) -> (..., n, n) 1 - cosine similarity, the authors' pairwise form."""
    import torch

    xn = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - torch.matmul(xn, xn.transpose(-1, -2))


class MaxMinDiversity(ScoreRule):
    name = "diversity"
    summary = "greedy max-min cosine diversity over the projector's output (DivPrune)"
    keep_dependent = True
    pre_llm = True

    def score(self, x, keep):
        import torch

        feats = x.h_out[:, x.p : x.p + x.n].float()  # (B, n, d)
        b, n = feats.shape[:2]
        dist = cosine_distances(feats)  # (B, n, n)
        rows = torch.arange(b, device=feats.device)
        first = torch.topk(dist, 2, dim=1, largest=False).values[:, 1, :]  # nearest-neighbour distance
        idx = first.argmax(-1)
        chosen = torch.zeros(b, n, device=feats.device)
        chosen[rows, idx] = 1.0
        nearest = dist[rows, idx]  # (B, n) distance to the nearest selected token
        for _ in range(keep - 1):
            idx = nearest.masked_fill(chosen > 0, float("-inf")).argmax(-1)
            chosen[rows, idx] = 1.0
            nearest = torch.minimum(nearest, dist[rows, idx])
        return chosen

    def flops(self, t, n, text, visual_in, keep=0):
        # the n x n cosine similarities over the hidden size
        return 2 * visual_in * visual_in * t.hidden

    def reference(self, x):
        """The authors' loop for one sample: rows of D for the selected tokens, column minima."""
        import torch

        d = cosine_distances(x.features.float())
        s = []
        for i in range(x.keep):
            if i == 0:
                scores = torch.topk(d, 2, dim=0, largest=False).values[1, :]
            else:
                scores = torch.index_select(d, 0, torch.tensor(s)).min(dim=0).values
                scores[s] = float("-inf")
            s.append(int(torch.argmax(scores)))
        out = torch.zeros(x.n)
        out[s] = 1.0
        return out


class DivPrune(Method):
    name = "divprune"
    summary = "one point before the decoder; keep the most diverse visual tokens (greedy max-min)"
    reference = "DivPrune (Alvar et al., CVPR 2025)"
    rules = (MaxMinDiversity(),)

    def default(self, layers, visual, task):
        keep = scaled_keep(round(DEFAULT_RATIO * 576), visual)
        return self.schedule([(0, keep)], meta={"published": f"DivPrune threshold_ratio {DEFAULT_RATIO} at the projector"})

    def coarse(self, search):
        for k in search.keeps(search.N):
            yield [(0, k)], 0


class DivPruneExit(Method):
    """A combined schedule: DivPrune's diverse subset enters the decoder, and an exit point drops
    every visual token at a deeper layer (VisiPruner's observation that the deep layers no longer
    read the image), so the layers after the exit run on text alone."""

    name = "divprune_exit"
    summary = "DivPrune before the decoder, then drop every visual token at an exit layer"
    reference = "DivPrune (Alvar et al., CVPR 2025) + VisiPruner's exit (seeds 000, 001)"
    rules = (MaxMinDiversity(), DropAll())

    def default(self, layers, visual, task):
        keep = scaled_keep(round(DEFAULT_RATIO * 576), visual)
        return self.schedule([(0, keep), (scaled_layer(24, layers), 0)],
                             meta={"published": "DivPrune threshold_ratio 0.1, then VisiPruner's exit layer 24 (combined)"})

    def coarse(self, search):
        for k in search.keeps(search.N):
            for exit_ in range(1, search.L):
                yield [(0, k), (exit_, 0)], 0

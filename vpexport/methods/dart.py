"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494), its in-decoder form: attention-free, it keeps the
visual tokens that duplicate the others least.

The rule, as the reference code (`get_retained_image_token`, DART_K_norm variant) applies it at
the prune layer K from layer K-1:
1. pivots: the `pivot_image` visual tokens and the `pivot_text` text tokens whose keys (heads
   concatenated) have the largest L1 norm;
2. each pivot in turn takes, from the visual tokens not yet taken (the visual pivots are taken
   from the start), the ones whose hidden state (layer K-1's output after the decoder's final
   norm) has the lowest cosine similarity to the pivot's;
3. the kept set is the visual pivots and everything the pivots took.

Static form: the budget `keep` is fixed, so pivot j takes (keep - visual pivots) / pivots tokens
(the first pivots one more while there is a remainder) in a loop unrolled over the pivots, with
TopK and a taken-mask instead of Python sets; the score returned is that 0/1 mask (exactly `keep`
ones), which the point's TopK turns into the same indices. The pivots are visited in increasing
position (the reference code iterates a Python set of positions, whose order is an artefact of
hashing). Text pivots are drawn from the valid (unpadded) text tokens; a prompt with fewer valid
text tokens than `PIVOT_TEXT` has that many text pivots.
"""

from __future__ import annotations

from vpexport.methods.base import Method, ScoreRule, scaled_keep, scaled_layer

PIVOT_IMAGE = 4
PIVOT_TEXT = 4


def pivot_counts(keep: int, n: int, text: int) -> tuple[int, int]:
    """(visual pivots, text pivots) for a budget `keep` of `n` visual tokens and `text` text slots."""
    img = min(PIVOT_IMAGE, keep, n)
    return img, min(PIVOT_TEXT, text)


def takes(keep: int, img: int, pivots: int) -> list[int]:
    """How many tokens each pivot takes (in visiting order): keep - img spread over the pivots."""
    rest = keep - img
    if pivots == 0:
        return []
    base, extra = divmod(rest, pivots)
    return [base + (1 if j < extra else 0) for j in range(pivots)]


class DuplicationAware(ScoreRule):
    name = "duplication"
    summary = "pivots by key L1 norm; each keeps the visual tokens least similar to it (DART)"
    keep_dependent = True

    def score(self, x, keep):
        import torch

        b, h, L, hd = x.k.shape
        p, n = x.p, x.n
        l1 = x.k.transpose(1, 2).reshape(b, L, h * hd).float().abs().sum(-1)  # (B, L)
        img, txt = pivot_counts(keep, n, L - p - n)
        dev = l1.device
        img_piv = torch.topk(l1[:, p : p + n], img, dim=-1).indices  # (B, img), within the visual span
        positions = [img_piv + p]
        n_piv = torch.full((b,), img, dtype=torch.long, device=dev)  # pivots per sample
        if txt:
            valid = x.key_valid[:, p + n :]
            tl1 = l1[:, p + n :].masked_fill(~valid, float("-inf"))
            t_idx = torch.topk(tl1, txt, dim=-1).indices + (p + n)
            n_txt = valid.sum(-1).clamp(max=txt)  # a prompt with fewer valid text tokens has fewer pivots
            t_ok = torch.arange(txt, device=dev)[None] < n_txt[:, None]
            positions.append(torch.where(t_ok, t_idx, torch.full_like(t_idx, L)))  # absent: sorted last
            n_piv = n_piv + n_txt
        order = torch.cat(positions, dim=1).sort(dim=-1).values.clamp(max=L - 1)  # (B, P) increasing
        # Per sample, pivot j takes base + (j < extra) tokens (0 for an absent pivot): the same
        # counts as `takes`, as tensors since the number of pivots differs per sample. TopK runs at
        # the largest count any pivot can have and keeps each sample's first ones.
        rest = keep - img
        base, extra = rest // n_piv, rest % n_piv
        most = min(n - img, -(-rest // img)) if rest > 0 else 0
        hid = x.final_norm(x.h_out).float()
        hid = hid / hid.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        vis = hid[:, p : p + n]  # (B, n, d)
        taken = torch.zeros(b, n, device=dev).scatter(1, img_piv, 1.0)
        for j in range(order.shape[1] if most else 0):
            count = torch.where(j < n_piv, base + (j < extra).long(), torch.zeros_like(base))  # (B,)
            piv = torch.gather(hid, 1, order[:, j, None, None].expand(b, 1, hid.shape[-1]))  # (B, 1, d)
            sim = torch.matmul(vis, piv.transpose(1, 2))[..., 0]  # (B, n) cosine similarities
            sim = sim.masked_fill(taken > 0, float("inf"))
            sel = torch.topk(-sim, most, dim=-1).indices  # least similar first
            ok = (torch.arange(most, device=dev)[None] < count[:, None]).float()
            taken = torch.maximum(taken, torch.zeros_like(taken).scatter(1, sel, ok))
        return taken

    def flops(self, t, n, text, visual_in, keep=0):
        # L1 norms of the keys, then one cosine similarity per pivot and visual token (hidden size)
        qd = t.heads * t.head_dim
        return (visual_in + text) * qd + 2 * (PIVOT_IMAGE + PIVOT_TEXT) * visual_in * t.hidden

    def reference(self, x):
        """The reference code's loop for one unpadded sample, with Python sets."""
        import torch

        p, n, keep = x.p, x.n, x.keep
        L = x.k.shape[1]
        kcat = x.k.permute(1, 0, 2).reshape(L, -1).float()
        l1 = kcat.abs().sum(-1)
        text_pos = [p + n + i for i, ok in enumerate(x.text_valid) if ok]
        img, txt = pivot_counts(keep, n, len(text_pos))  # fewer valid text tokens: fewer pivots
        img_idx = (l1[p : p + n].topk(img).indices + p).tolist()
        tl1 = l1[text_pos]
        txt_idx = [text_pos[i] for i in tl1.topk(txt).indices.tolist()] if txt else []
        pool = set(range(p, p + n)) - set(img_idx)
        kept = set(img_idx)
        hid = x.hidden.float()
        for item, c in zip(sorted(img_idx + txt_idx), takes(keep, img, img + txt)):
            if c == 0:
                continue
            cand = sorted(pool)
            sim = torch.nn.functional.cosine_similarity(hid[item][None], hid[cand], dim=-1)
            chosen = [cand[i] for i in (-sim).topk(c).indices.tolist()]
            kept.update(chosen)
            pool.difference_update(chosen)
        out = torch.zeros(n)
        out[[i - p for i in kept]] = 1.0
        return out


class DART(Method):
    name = "dart"
    summary = "one point; attention-free: keep the visual tokens least similar to key-norm pivots"
    reference = "DART (Wen et al., 2025, arXiv 2502.11494), in-decoder form"
    rules = (DuplicationAware(),)

    def default(self, layers, visual, task):
        # The reference code's LLaVA-1.5 setting: prune at layer 2, keep 128 of 576 (77.8% pruned).
        return self.schedule([(scaled_layer(2, layers), scaled_keep(128, visual))],
                             meta={"published": "DART K=2 keep 128/576, 4 image + 4 text pivots"})

    def coarse(self, search):
        for K in range(1, search.L):
            for k in search.keeps(search.N):
                yield [(K, k)], 0

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


# --------------------------------------------------------------------------- before the decoder
def projector_takes(keep: int, img: int, pivots: int) -> list[int]:
    """How many tokens each pivot takes before the decoder, in visiting order: pivot p takes
    ceil(rest / (pivots - p)) of what is left, as TensorRT Edge-LLM's DART pruner does."""
    out, rest = [], keep - img
    for j in range(pivots):
        c = -(-rest // (pivots - j)) if rest > 0 else 0
        out.append(c)
        rest -= c
    return out


def projector_text_pivots(p: int) -> int:
    """Text pivots before the decoder: 4, or fewer when the prompt may have fewer non-image tokens
    (the prefix and at least one text token are always there), so the count is static."""
    return min(PIVOT_TEXT, p + 1)


class DuplicationAtProjector(ScoreRule):
    name = "duplication_projector"
    summary = "pivots by embedding L1 norm; each keeps the visual tokens least similar to it (DART before the LLM)"
    keep_dependent = True
    pre_llm = True

    def score(self, x, keep):
        import torch

        p, n = x.p, x.n
        emb = x.h_out.float()  # (B, L, d): the sequence entering layer 0
        b, L, d = emb.shape
        dev = emb.device
        l1 = emb.abs().sum(-1)  # (B, L)
        img = min(PIVOT_IMAGE, keep, n)
        txt = projector_text_pivots(p)
        # Visual pivots: the largest L1 norms of the image span, in decreasing norm. Text pivots:
        # the largest among every valid token outside it (the prompt's prefix and text).
        img_piv = torch.topk(l1[:, p : p + n], img, dim=-1).indices  # (B, img) within the span
        other = torch.cat([x.key_valid[:, :p], torch.zeros(b, n, dtype=torch.bool, device=dev),
                           x.key_valid[:, p + n :]], dim=1)
        txt_piv = torch.topk(l1.masked_fill(~other, float("-inf")), txt, dim=-1).indices  # (B, txt)
        pivots = torch.cat([img_piv + p, txt_piv], dim=1)  # visiting order: image, then text
        unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        vis = unit[:, p : p + n]  # (B, n, d)
        taken = torch.zeros(b, n, device=dev).scatter(1, img_piv, 1.0)
        for j, count in enumerate(projector_takes(keep, img, img + txt)):
            if count == 0:
                continue
            piv = torch.gather(unit, 1, pivots[:, j, None, None].expand(b, 1, d))  # (B, 1, d)
            sim = torch.matmul(vis, piv.transpose(1, 2))[..., 0]  # (B, n) cosine similarities
            sel = torch.topk((-sim).masked_fill(taken > 0, float("-inf")), count, dim=-1).indices
            taken = taken.scatter(1, sel, 1.0)
        return taken

    def flops(self, t, n, text, visual_in, keep=0):
        # L1 norms of the embeddings, then one cosine similarity per pivot and visual token
        return n * t.hidden + 2 * (PIVOT_IMAGE + PIVOT_TEXT) * visual_in * t.hidden

    def reference(self, x):
        """Edge-LLM's per-span loop for one unpadded sample, with Python lists."""
        import torch

        p, n, keep = x.p, x.n, x.keep
        seq = x.sequence.double()
        l1 = seq.abs().sum(-1).tolist()
        span = list(range(p, p + n))
        text_pos = [i for i in range(len(l1)) if not p <= i < p + n]
        by_norm = lambda pos: sorted(pos, key=lambda i: (-l1[i], i))  # noqa: E731 - ties: lower index
        img_piv = by_norm(span)[: min(PIVOT_IMAGE, keep, n)]
        txt_piv = by_norm(text_pos)[: projector_text_pivots(p)]
        retained = list(img_piv)
        cand = [i for i in span if i not in img_piv]
        pivots = img_piv + txt_piv
        for j, piv in enumerate(pivots):
            rest = keep - len(retained)
            if rest <= 0 or not cand:
                break
            k = -(-rest // (len(pivots) - j))
            e = seq[piv]
            score = {c: -float(e @ seq[c]) / max(float(e.norm() * seq[c].norm()), 1e-8) for c in cand}
            top = sorted(cand, key=lambda c: (-score[c], c))[:k]
            retained += top
            cand = [c for c in cand if c not in top]
        out = torch.zeros(n)
        out[[i - p for i in retained]] = 1.0
        return out


class DARTProjector(Method):
    name = "dart_projector"
    summary = "one point before the decoder; keep the visual tokens least similar to embedding-norm pivots"
    reference = "DART (Wen et al., 2025, arXiv 2502.11494), the pre-LLM form of TensorRT Edge-LLM"
    rules = (DuplicationAtProjector(),)

    def default(self, layers, visual, task):
        # Edge-LLM's default reductionRatio 0.25: 75% of the visual tokens stay.
        return self.schedule([(0, max(1, -(-visual * 3 // 4)))],
                             meta={"published": "DART before the LLM, Edge-LLM reductionRatio 0.25"})

    def coarse(self, search):
        for k in search.keeps(search.N):
            yield [(0, k)], 0

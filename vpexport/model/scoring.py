"""Importance scores for visual tokens, computed inside the forward pass from layer K-1.

Only the attention rows a rule needs are materialised (one row for the last token, the text
rows, or the visual rows), so the rest of the layer keeps using fused SDPA. All functions are
traceable: shapes depend only on static Python ints and the (possibly dynamic) text length.

Shapes: q (B, H, L, hd) and k (B, H, L, hd) after RoPE with KV heads already repeated,
v the same; `allowed` (B, 1, L, L) bool attention mask; visual span [p, p + n).
"""

from __future__ import annotations

import math

import torch


def _probs(q_rows: torch.Tensor, k: torch.Tensor, allowed_rows: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q_rows.shape[-1])
    logits = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed_rows, torch.finfo(logits.dtype).min)
    return torch.softmax(logits.float(), dim=-1)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H|1, L, D), idx (B, R) -> (B, H|1, R, D)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


def last_token_attention(q, k, v, allowed, last_idx, p: int, n: int) -> torch.Tensor:
    """FastV: head-averaged attention of the last (valid) token over the visual span."""
    idx = last_idx[:, None]
    pr = _probs(_rows(q, idx), k, _rows(allowed, idx))  # (B, H, 1, L)
    return pr[:, :, 0, p : p + n].mean(dim=1)


def text_attention(q, k, v, allowed, query_valid, p: int, n: int) -> torch.Tensor:
    """HiMAP stage 1: attention each visual token receives from all tokens after the image."""
    t0 = p + n
    pr = _probs(q[:, :, t0:], k, allowed[:, :, t0:])  # (B, H, T, L)
    pr = pr * query_valid[:, None, t0:, None].to(pr.dtype)
    return pr[:, :, :, p : p + n].sum(dim=2).mean(dim=1)


def visual_attention(q, k, v, allowed, p: int, n: int) -> torch.Tensor:
    """HiMAP stage 2: column sums of the visual x visual block (attention from other visual tokens)."""
    pr = _probs(q[:, :, p : p + n], k, allowed[:, :, p : p + n])  # (B, H, n, L)
    return pr[:, :, :, p : p + n].sum(dim=2).mean(dim=1)


def value_contribution(q, k, v, allowed, last_idx, p: int, n: int) -> torch.Tensor:
    """VisiPruner: ||c_j||_2 with c_j = a_{last,j} * v_j per head, heads concatenated (before o_proj)."""
    idx = last_idx[:, None]
    a = _probs(_rows(q, idx), k, _rows(allowed, idx))[:, :, 0, p : p + n]  # (B, H, n)
    vn2 = v[:, :, p : p + n].float().pow(2).sum(-1)  # (B, H, n)
    return (a.pow(2) * vn2).sum(dim=1).sqrt()


def fixed_random_indices(n: int, keep: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:keep].sort().values


def uniform_indices(n: int, keep: int) -> torch.Tensor:
    """Spatially strided subset: a 2-D lattice when `keep` is a square and the tokens form a square grid."""
    g, r = int(math.isqrt(n)), int(math.isqrt(keep))
    if g * g == n and r * r == keep:
        step = g / r
        coords = [int(step * (i + 0.5)) for i in range(r)]
        return torch.tensor([y * g + x for y in coords for x in coords], dtype=torch.long)
    step = n / keep
    return torch.tensor([int(step * (i + 0.5)) for i in range(keep)], dtype=torch.long)

"""A deliberately plain reference for pruned prefill/generation (any family), for tests only.

It shares nothing with vpexport/model/pruned.py: attention is computed as full probability
matrices from the Hugging Face projections and HF's own RoPE helper, scores follow the
methods' definitions literally (research.md), and tokens are dropped per sample with Python
index lists. Decoding is done without a cache: the whole sequence is re-run each step with
the visual tokens fixed to the prefill's choices, which is what a pruned KV cache means.
"""

from __future__ import annotations

import math

import torch

from vpexport.methods import RULES
from vpexport.methods.base import ReferenceInputs
from vpexport.pruning.schedule import Schedule


def _rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _attention(layer, h, pos, allowed, rotary, sink_mode, p, n, nh, nkv):
    a = layer.self_attn
    x = layer.input_layernorm(h)
    b, l, _ = x.shape
    hd = a.q_proj.out_features // nh
    q = a.q_proj(x).view(b, l, nh, hd).transpose(1, 2)
    k = a.k_proj(x).view(b, l, nkv, hd).transpose(1, 2)
    v = a.v_proj(x).view(b, l, nkv, hd).transpose(1, 2)
    cos, sin = rotary(h, pos)  # pos (1, L), or (3, 1, L) for M-RoPE: the model's own recomposition
    q, k = _rope(q, k, cos, sin)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    if sink_mode == "mask":  # text queries see no visual keys
        logits[:, :, p + n :, p : p + n] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if sink_mode == "redirect":  # text queries' visual mass moves to the first visual token
        t = probs[:, :, p + n :]
        mass = t[..., p : p + n].sum(-1)
        t[..., p : p + n] = 0
        t[..., p] = mass
    out = (probs @ v).transpose(1, 2).reshape(b, l, nh * hd)
    h = h + a.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, probs, k, v


def _scores(rule, probs, k, v, hidden, p, n, last, text_valid, keep):
    """Layer K-1 of one sample (probs (H, L, L), k / v (H, L, hd), hidden (L, d) after the final
    norm); returns (n,) scores over the current visual span: each rule's own plain reference
    (`Rule.reference`), independent of the batched in-graph `Rule.score`."""
    return RULES[rule].reference(ReferenceInputs(probs, v, p, n, last, text_valid, k, hidden, keep))


@torch.no_grad()
def reference_forward(model, ids, mask, feats, prefix, schedule: Schedule, fixed_kept=None, positions=None):
    """Last-position logits (B, V) and the kept original visual indices per point, per sample.
    `positions(row_ids)`: a sample's (L,) or (L, 3) (M-RoPE) positions for its valid ids; default 0..L-1."""
    lm = model.model.language_model
    tc = model.config.text_config
    nh, nkv = tc.num_attention_heads, tc.num_key_value_heads
    n_full = feats.shape[1]
    logits_out, kept_out = [], []
    for b in range(ids.shape[0]):
        valid = int(mask[b].sum())
        emb = lm.embed_tokens(ids[b : b + 1, :valid]).clone()
        emb[0, prefix : prefix + n_full] = feats[b]
        h = emb
        pos = list(range(valid)) if positions is None else positions(ids[b, :valid]).tolist()
        vis = list(range(n_full))  # original visual indices present
        text_valid = [1] * (valid - prefix - n_full)
        kept_b, probs, k, v = [], None, None, None
        points = {pt.layer: (j, pt) for j, pt in enumerate(schedule.points)}
        for i, layer in enumerate(lm.layers):
            n = len(vis)
            if i in points:
                j, pt = points[i]
                if fixed_kept is not None:
                    chosen = list(fixed_kept[j][b])
                elif RULES[pt.rule].kind == "drop":
                    chosen = []
                elif RULES[pt.rule].kind == "fixed":
                    raise ValueError("index-only rules need fixed_kept")
                elif RULES[pt.rule].pre_llm:  # the projector's output, before any layer
                    s = RULES[pt.rule].reference(ReferenceInputs(None, None, prefix, n, h.shape[1] - 1, text_valid,
                                                                 keep=pt.keep, features=h[0, prefix : prefix + n], sequence=h[0]))
                    top = sorted(torch.topk(s, pt.keep).indices.tolist())
                    chosen = [vis[t] for t in top]
                else:
                    s = _scores(pt.rule, probs[0], k[0], v[0], lm.norm(h)[0], prefix, n, h.shape[1] - 1, text_valid,
                                pt.keep)
                    top = sorted(torch.topk(s, pt.keep).indices.tolist())
                    chosen = [vis[t] for t in top]
                keep_pos = list(range(prefix)) + [prefix + vis.index(c) for c in chosen] + list(
                    range(prefix + n, h.shape[1])
                )
                h = h[:, keep_pos]
                pos = [pos[t] for t in keep_pos]
                vis = chosen
                kept_b.append(chosen)
            l = h.shape[1]
            allowed = torch.ones(l, l, dtype=torch.bool).tril()[None]
            sink = None
            if i < schedule.sink_layers:
                sink = "redirect" if i == 0 else "mask"
            pt = torch.tensor([pos]) if positions is None else torch.tensor(pos).T[:, None, :]
            h, probs, k, v = _attention(layer, h, pt, allowed, lm.rotary_emb, sink, prefix, len(vis), nh, nkv)
        h = lm.norm(h)
        logits_out.append(model.lm_head(h[:, -1])[0])
        kept_out.append(kept_b)
    kept = [torch.tensor([kept_out[b][j] for b in range(len(kept_out))]) for j in range(len(schedule.points))]
    return torch.stack(logits_out), kept


@torch.no_grad()
def reference_generate(model, ids, mask, feats, prefix, schedule, max_new_tokens, eos, positions=None):
    """Greedy, no KV cache: re-run everything with the prefill's visual choices fixed."""
    logits, kept = reference_forward(model, ids, mask, feats, prefix, schedule, positions=positions)
    outs = []
    for b in range(ids.shape[0]):
        valid = int(mask[b].sum())
        seq = ids[b : b + 1, :valid]
        fixed = [k[b : b + 1].tolist() for k in kept]
        toks = []
        lg = logits[b : b + 1]
        for _ in range(max_new_tokens):
            t = int(lg.argmax(-1))
            if t == eos:
                break
            toks.append(t)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            lg, _ = reference_forward(model, seq, torch.ones_like(seq), feats[b : b + 1], prefix, schedule, fixed,
                                      positions)
        outs.append(toks)
    return outs, kept, logits

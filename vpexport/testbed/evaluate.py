"""Evaluation helper: plain HF greedy generation (and a random visual-token-drop reference).

`evaluate(ckpt, jsonl)` loads a checkpoint with `AutoProcessor` / `LlavaForConditionalGeneration`,
answers every record greedily and scores exact match (and token F1). `random_drop` keeps a
random fraction of the visual tokens from decoder layer `layer` on (dropped from the hidden
states, so from every later layer's keys/values too), with the kept tokens' original position
ids: the control that shows the tasks depend on local visual detail.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from vpexport.model.loading import image_embeds
from vpexport.testbed.metrics import exact_match, load_split, token_f1


def load(ckpt: str | Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = Path(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    proc = AutoProcessor.from_pretrained(ckpt)
    meta = json.loads((ckpt / "vpexport_testbed.json").read_text())
    return model, proc, meta


def _batches(records, proc, template, batch_size):
    """Group records by prompt length so that batches need no padding."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        n = len(proc.tokenizer(template.format(question=r["question"])).input_ids)
        groups[n].append(i)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            yield idx[s: s + batch_size]


def _inputs(proc, records, idx, template):
    from PIL import Image

    images = [Image.open(records[i]["image"]).convert("RGB") for i in idx]
    texts = [template.format(question=records[i]["question"]) for i in idx]
    return proc(images=images, text=texts, return_tensors="pt")


def _decode(proc, seqs, eos_id):
    out = []
    for s in seqs.tolist():
        if eos_id in s:
            s = s[: s.index(eos_id)]
        out.append(proc.tokenizer.decode(s, skip_special_tokens=True).strip())
    return out


def generate_answers(model, proc, records, template, max_new_tokens=20, batch_size=64):
    import torch

    preds = [None] * len(records)
    eos = proc.tokenizer.eos_token_id
    with torch.no_grad():
        for idx in _batches(records, proc, template, batch_size):
            enc = _inputs(proc, records, idx, template)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            for i, a in zip(idx, _decode(proc, out[:, enc["input_ids"].shape[1]:], eos)):
                preds[i] = a
    return preds


def _pruned_logits(model, embeds, image_mask, keep_idx, layer):
    """Last-token logits; from decoder layer `layer` on only `keep_idx` (B, K) positions remain."""
    import torch

    lm = model.model.language_model
    B, L, _ = embeds.shape
    h = embeds
    pos = torch.arange(L)[None].expand(B, -1)
    for i, blk in enumerate(lm.layers):
        if i == layer and keep_idx is not None:
            h = h.gather(1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
            pos = pos.gather(1, keep_idx)
        n = h.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(B, 1, n, n).to(h.dtype)
        pe = lm.rotary_emb(h, pos)
        h = blk(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        if isinstance(h, tuple):
            h = h[0]
    return model.lm_head(lm.norm(h[:, -1]))


def random_drop_answers(model, proc, records, template, keep: float = 0.25, layer: int = 2, seed: int = 0,
                        max_new_tokens=20, batch_size=64):
    """Greedy answers when only a random `keep` fraction of visual tokens survives from `layer` on.

    Kept indices are fixed per record (seed + record index); no KV cache: each step recomputes the
    prompt, which gives the same result as caching full K/V below `layer` and kept K/V from it on.
    keep=1.0 reproduces plain generation (a self-check)."""
    import torch

    preds = [None] * len(records)
    eos = proc.tokenizer.eos_token_id
    img_id = model.config.image_token_id
    with torch.no_grad():
        for idx in _batches(records, proc, template, batch_size):
            enc = _inputs(proc, records, idx, template)
            ids = enc["input_ids"]
            embeds = image_embeds(model, ids, enc["pixel_values"].to(model.dtype))
            vis = (ids[0] == img_id).nonzero().flatten()
            nv = len(vis)
            k = max(1, int(round(keep * nv)))
            keep_idx = []
            for i in idx:
                r = np.random.RandomState(seed + i)
                sel = np.sort(r.choice(nv, size=k, replace=False)) if k < nv else np.arange(nv)
                kept_vis = vis[torch.from_numpy(sel)]
                other = torch.tensor([j for j in range(ids.shape[1]) if ids[0, j] != img_id])
                keep_idx.append(torch.sort(torch.cat([other, kept_vis])).values)
            keep_idx = torch.stack(keep_idx)
            gen = []
            done = torch.zeros(len(idx), dtype=torch.bool)
            for _ in range(max_new_tokens):
                logits = _pruned_logits(model, embeds, None, keep_idx, layer)
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                gen.append(nxt)
                done |= nxt == eos
                if done.all():
                    break
                L = embeds.shape[1]
                embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[:, None]], 1)
                keep_idx = torch.cat([keep_idx, torch.full((len(idx), 1), L)], 1)
            for i, a in zip(idx, _decode(proc, torch.stack(gen, 1), eos)):
                preds[i] = a
    return preds


def score(records, preds) -> dict:
    em = [exact_match(p, r["answer"]) for p, r in zip(preds, records)]
    f1 = [token_f1(p, r["answer"]) for p, r in zip(preds, records)]
    by_kind = defaultdict(list)
    for e, r in zip(em, records):
        by_kind[r.get("kind", "all")].append(e)
    return {"n": len(records), "exact_match": float(np.mean(em)), "token_f1": float(np.mean(f1)),
            "exact_match_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}


def evaluate(ckpt, jsonl, limit: int | None = None, drop_keep: float | None = None, drop_layer: int = 2,
             seed: int = 0) -> dict:
    import torch

    torch.set_num_threads(2)
    model, proc, meta = load(ckpt)
    recs = load_split(jsonl)[:limit]
    tpl = meta["prompt_template"]
    if drop_keep is None:
        preds = generate_answers(model, proc, recs, tpl)
    else:
        preds = random_drop_answers(model, proc, recs, tpl, keep=drop_keep, layer=drop_layer, seed=seed)
    res = score(recs, preds)
    res["examples"] = [{"q": r["question"], "ref": r["answer"], "pred": p} for r, p in list(zip(recs, preds))[:5]]
    return res

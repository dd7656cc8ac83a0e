"""Deterministic training of the mini LLaVA testbed on both tasks (vqa + caption).

Two stages, both with the project's own code:
  1. vision: the CLIP tower learns per-patch targets (digit 0-9 / none, cell row, cell column)
     through throw-away linear heads (not saved).
  2. full model: answer cross-entropy on both tasks, plus two auxiliary losses that make the
     position lookup learnable in minutes on a CPU: the per-patch vision targets continue, and
     one attention head of decoder layer `att_layer` is told where the evidence is (the patch
     holding the digit an answer token is about). Without the attention hint the language model
     plateaus (measured earlier: 24-41% after 25 minutes).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from vpexport.testbed import data as D
from vpexport.testbed.model import PROMPT_TEMPLATE, build_mini, save_checkpoint

NVIS = D.NPATCH * D.NPATCH


class Encoder:
    """Turns generated examples into token ids / labels / pixel tensors (same as the processor)."""

    def __init__(self, tok):
        self.tok = tok
        pre, post = PROMPT_TEMPLATE.split("<image>")
        self.prefix = tok(pre).input_ids  # includes bos
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.eos = tok.eos_token_id
        self.post = post
        self._cache = {}

    def ids(self, text: str, bos=False):
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def example(self, ex):
        q = self.ids(self.post.format(question=ex["question"]))
        a = self.ids(ex["answer"]) + [self.eos]
        ids = self.prefix + [self.image_id] * NVIS + q + a
        n_prompt = len(ids) - len(a)
        labels = [-100] * n_prompt + a
        img0 = len(self.prefix)
        # attention evidence: (position predicting a token, patch indices)
        ev = []
        match = []  # (position, 1 if the question's digit is in the image) for "is there a d"
        s = ex["scene"]
        # "where is the d" / "is there a d": the position of the asked digit's token
        q_digit = img0 + NVIS + q.index(self.ids(ex["question"].split()[3])[0]) \
            if ex["kind"] in ("where", "exists") else None
        if ex["kind"] == "caption":
            pos = n_prompt - 1
            for c in sorted(s.digits):
                for _ in range(3):  # row word, column word, digit
                    ev.append((pos, [s.patch_of[c]]))
                    pos += 1
        elif ex.get("evidence"):
            for j in range(len(a) - 1):  # every answer token but eos
                ev.append((n_prompt - 1 + j, ex["evidence"]))
            if q_digit is not None:
                # also look the digit up where it is mentioned: the question's digit token itself
                # attends to the patches holding that digit (a one-hop, content-keyed lookup)
                ev.append((q_digit, ex["evidence"]))
        if ex["kind"] == "exists":
            y = int(ex["answer"] == "yes")
            match = [(q_digit, y), (n_prompt - 1, y)]
        return ids, labels, img0, ev, match


def pixels(images: list[np.ndarray]):
    import torch

    x = torch.from_numpy(np.stack(images)).float().div_(255.0).sub_(0.5).div_(0.5)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def make_batch(enc: Encoder, exs):
    import torch

    rows = [enc.example(e) for e in exs]
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = torch.full((B, L), enc.tok.pad_token_id, dtype=torch.long)
    lab = torch.full((B, L), -100, dtype=torch.long)
    am = torch.zeros((B, L), dtype=torch.long)
    ev_b, ev_t = [], []  # flattened evidence: batch, position (+ a patch mask row each)
    m_b, m_t, m_y = [], [], []  # flattened "is the asked digit present" targets
    s_b, s_t = [], []  # text rows of the salience hint: every token after the image
    masks = []
    for i, (x, y, img0, ev, match) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        am[i, : len(x)] = 1
        for pos, patches in ev:
            m = torch.zeros(NVIS, dtype=torch.bool)
            m[patches] = True
            ev_b.append(i)
            ev_t.append(pos)
            masks.append(m)
        for pos in range(img0 + NVIS, len(x) - 1):
            s_b.append(i)
            s_t.append(pos)
        for pos, yes in match:
            m_b.append(i)
            m_t.append(pos)
            m_y.append(yes)
    img0 = rows[0][2]
    patch_lab = torch.from_numpy(np.stack([e["scene"].patch_labels() for e in exs]))
    return {
        "input_ids": ids, "labels": lab, "attention_mask": am,
        "pixel_values": pixels([e["scene"].image for e in exs]),
        "ev_b": torch.tensor(ev_b, dtype=torch.long), "ev_t": torch.tensor(ev_t, dtype=torch.long),
        "ev_m": torch.stack(masks) if masks else torch.zeros((0, NVIS), dtype=torch.bool),
        "img0": img0, "patch_lab": patch_lab,
        "m_b": torch.tensor(m_b, dtype=torch.long), "m_t": torch.tensor(m_t, dtype=torch.long),
        "m_y": torch.tensor(m_y, dtype=torch.long),
        "s_b": torch.tensor(s_b, dtype=torch.long), "s_t": torch.tensor(s_t, dtype=torch.long),
    }


def background_drop_mask(rng, b, p: float):
    """2D attention mask that hides, in a share `p` of the examples, 50-95% of the visual tokens
    holding no digit (from every layer; the rest keep their original positions).

    Why: a cell question whose answer is "none" was answered from the blank patches of that cell;
    with them pruned, the model named a digit from another cell, and counts went up. LLaVA-scale
    models lose little when background tokens go (the premise of token pruning); this teaches the
    testbed the same, while every digit patch stays necessary (random pruning still drops digits).
    """
    import torch

    mask = b["attention_mask"].clone()
    for i in range(mask.shape[0]):
        if rng.rand() >= p:
            continue
        blank = np.flatnonzero(b["patch_lab"][i].numpy() == 10)
        n = int(round(len(blank) * rng.uniform(0.5, 0.95)))
        drop = rng.choice(blank, size=n, replace=False)
        mask[i, b["img0"] + torch.from_numpy(drop)] = 0
    return mask


def sample_batch(rng, bank, pool, n, caption_frac=0.5, vqa_weights=D.VQA_WEIGHTS):
    imgs, labels = bank
    return [D.sample(rng, imgs, labels, pool, "caption" if rng.rand() < caption_frac else "vqa", vqa_weights)
            for _ in range(n)]


def _lr(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(out: str | Path, seed: int = 0, steps: int = 3000, vision_steps: int = 300, batch: int = 32,
          lr: float = 2e-3, att_layer: int = 3, att_weight: float = 1.0, probe_weight: float = 1.0, threads: int = 2,
          save_every: int = 250, log_every: int = 25, log_file: str | None = None, max_minutes: float = 115.0,
          caption_frac: float = 0.5, init_from: str | Path | None = None, vqa_weights=D.VQA_WEIGHTS,
          salience_layer: int | None = None, salience_head: int = 1, salience_weight: float = 0.5,
          drop_background: float = 0.0):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    t_start = time.time()
    model, tok, proc = build_mini(seed)
    init_meta = None
    if init_from is not None:  # continue from a saved checkpoint (weights only; fresh optimizer)
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(init_from)
        model.load_state_dict(src.state_dict())
        del src
        init_meta = json.loads((Path(init_from) / "vpexport_testbed.json").read_text()).get("training")
    model.set_attn_implementation("sdpa")
    enc = Encoder(tok)
    bank = D.load_digit_bank()
    pools = D.split_indices(len(bank[0]), seed=0)
    rng = np.random.RandomState(seed)
    vrng = np.random.RandomState(seed + 10_000)  # a fixed validation batch from the calib pool
    val = sample_batch(vrng, bank, pools["calib"], 96)
    vcfg = model.config.vision_config
    Hv = vcfg.hidden_size
    heads = nn.ModuleDict({"digit": nn.Linear(Hv, 11), "row": nn.Linear(Hv, 3), "col": nn.Linear(Hv, 3)})
    Ht = model.config.text_config.hidden_size
    # language-side probes (not saved): digit identity must be readable (a) in the projected
    # visual tokens and (b) in the residual stream right after the hinted lookup layer
    # (c) the looked-up patch's cell row/column (what "where is d" answers), and (d) one layer
    # later, whether the asked digit is present at all ("is there a d": the looked-up digit must
    # be compared with the question's; measured, without (c)/(d) both stayed near chance)
    probes = nn.ModuleDict({"proj": nn.Linear(Ht, 11), "lookup": nn.Linear(Ht, 11), "row": nn.Linear(Ht, 3),
                            "col": nn.Linear(Ht, 3), "match": nn.Linear(Ht, 2)})
    pr = torch.arange(NVIS) // D.NPATCH // D.SLOTS
    pc = torch.arange(NVIS) % D.NPATCH // D.SLOTS
    logf = open(log_file, "a") if log_file else None
    cls_w = torch.ones(11)
    cls_w[10] = 0.05  # "no digit" patches outnumber digit patches ~40:1

    # attention hint: capture the input of decoder layer `att_layer`'s attention and recompute
    # head 0's probabilities only on the evidence rows (cheap; the model itself runs SDPA)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = {}

    def _grabber(key):
        def grab(mod, args, kwargs):
            captured[key] = (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"])
        return grab

    layers = model.model.language_model.layers
    layers[att_layer].self_attn.register_forward_pre_hook(_grabber(att_layer), with_kwargs=True)
    if salience_layer is not None:
        layers[salience_layer].self_attn.register_forward_pre_hook(_grabber(salience_layer), with_kwargs=True)

    def head_rows(layer, head, ev_b, ev_t):
        """Softmax attention of one head of `layer` at rows (ev_b, ev_t), from the captured input."""
        attn_mod = layers[layer].self_attn
        hd = attn_mod.head_dim
        kv_head = head // (attn_mod.config.num_attention_heads // attn_mod.config.num_key_value_heads)
        h, (cos, sin) = captured[layer]
        if cos.shape[0] != h.shape[0]:
            cos, sin = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        q = attn_mod.q_proj(h[ev_b, ev_t])[:, head * hd:(head + 1) * hd]  # (E, hd)
        k = attn_mod.k_proj(h)[..., kv_head * hd:(kv_head + 1) * hd]  # (B, L, hd)
        q, _ = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], cos[ev_b, ev_t][:, None],
                                    sin[ev_b, ev_t][:, None])
        _, k = apply_rotary_pos_emb(k[:, None], k[:, None], cos, sin)
        k = k[ev_b]  # (E, 1, L, hd)
        sc = (q[:, 0, 0, None, :] * k[:, 0]).sum(-1) * attn_mod.scaling  # (E, L)
        L = sc.shape[1]
        causal = torch.arange(L)[None] > ev_t[:, None]
        return sc.masked_fill(causal, float("-inf")).softmax(-1)

    def log(msg):
        tqdm.write(msg)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    def vision_feats(pix):
        out_v = model.model.vision_tower(pix, output_hidden_states=True)
        return out_v.hidden_states[model.config.vision_feature_layer][:, 1:]

    def _grab_vis(mod, args, outp):
        captured["vis"] = outp.hidden_states[model.config.vision_feature_layer][:, 1:]

    def vision_loss(pix, patch_lab, f=None):
        f = vision_feats(pix) if f is None else f
        B = f.shape[0]
        l_d = F.cross_entropy(heads["digit"](f).flatten(0, 1), patch_lab.flatten(), weight=cls_w)
        l_r = F.cross_entropy(heads["row"](f).flatten(0, 1), pr.repeat(B))
        l_c = F.cross_entropy(heads["col"](f).flatten(0, 1), pc.repeat(B))
        acc = (heads["digit"](f).argmax(-1) == patch_lab)[patch_lab < 10].float().mean().item()
        return l_d + 0.5 * (l_r + l_c), acc

    # ---- stage 1: vision tower on per-patch targets
    vparams = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(vparams, lr=lr, weight_decay=0.01)
    bar = tqdm(range(vision_steps), desc="vision", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, vision_steps, lr, 30)
        exs = sample_batch(rng, bank, pools["train"], 64)
        loss, acc = vision_loss(pixels([e["scene"].image for e in exs]),
                                torch.from_numpy(np.stack([e["scene"].patch_labels() for e in exs])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == vision_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", digit_acc=f"{acc:.3f}")
            log(f"vision step {step} loss {loss.item():.4f} digit_acc {acc:.3f} t {time.time() - t_start:.0f}s")

    # ---- stage 2: everything
    vis_ids = {id(p) for p in model.model.vision_tower.parameters()}
    # a continued phase keeps the vision tower as it is (its per-patch heads are not saved):
    # frozen, it needs no backward pass either
    train_vision = init_from is None
    if not train_vision:
        model.model.vision_tower.requires_grad_(False)
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in vis_ids] + list(probes.parameters()), "scale": 1.0},
        {"params": list(model.model.vision_tower.parameters()) + list(heads.parameters()),
         "scale": 0.3 if train_vision else 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    meta = {
        "prompt_template": PROMPT_TEMPLATE,
        "tasks": {"vqa": {"questions": list(D.VQA_KINDS), "metric": "exact_match"},
                  "caption": {"question": D.CAPTION_QUESTION, "metric": "token_f1"}},
        "visual_tokens": NVIS,
        "training": {"seed": seed, "steps": steps, "vision_steps": vision_steps, "batch": batch, "lr": lr,
                     "att_layer": att_layer, "att_weight": att_weight, "salience_layer": salience_layer,
                     "salience_head": salience_head, "salience_weight": salience_weight,
                     "drop_background": drop_background, "probe_weight": probe_weight, "threads": threads,
                     "caption_frac": caption_frac,
                     "vqa_weights": {k: round(float(w), 4) for k, w in zip(D.VQA_KINDS, vqa_weights)},
                     "init_from": str(init_from) if init_from else None,
                     "init_training": init_meta,
                     "data": "sklearn load_digits, train split by source sample (vpexport.testbed.data)"},
    }

    def run_batch(b, train_mode=True):
        # right padding + causal attention: pads never reach a real token, so no mask is needed
        # (and SDPA without a mask is about 2x faster on CPU); a mask only when blank patches are dropped
        outp = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b.get("drop_mask"),
                     use_cache=False, output_hidden_states=True)
        logits = outp.logits[:, :-1]
        lab = b["labels"][:, 1:]
        l_lm = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100)
        l_att = torch.zeros(())
        if att_weight > 0 and len(b["ev_b"]):
            rows = head_rows(att_layer, 0, b["ev_b"], b["ev_t"])[:, b["img0"]: b["img0"] + NVIS]
            mass = (rows * b["ev_m"]).sum(-1)
            l_att = -(mass + 1e-6).log().mean()
        if salience_layer is not None and len(b["s_b"]):
            rows = head_rows(salience_layer, salience_head, b["s_b"], b["s_t"])[:, b["img0"]: b["img0"] + NVIS]
            mass = (rows * (b["patch_lab"][b["s_b"]] < 10)).sum(-1)
            l_att = l_att + salience_weight * -(mass + 1e-6).log().mean()
        l_probe = torch.zeros(())
        if probe_weight > 0:
            hs = outp.hidden_states
            img = hs[0][:, b["img0"]: b["img0"] + NVIS]  # projected visual tokens as they enter layer 0
            l_probe = F.cross_entropy(probes["proj"](img).flatten(0, 1), b["patch_lab"].flatten(), weight=cls_w)
            if len(b["ev_b"]):
                first = b["ev_m"].float().argmax(-1)  # first evidence patch of each hinted row
                lab_ev = b["patch_lab"][b["ev_b"], first]
                h_ev = hs[att_layer + 1][b["ev_b"], b["ev_t"]]
                l_probe = l_probe + F.cross_entropy(probes["lookup"](h_ev), lab_ev)
                l_probe = l_probe + 0.5 * (F.cross_entropy(probes["row"](h_ev), pr[first])
                                           + F.cross_entropy(probes["col"](h_ev), pc[first]))
            if len(b["m_b"]):
                h_m = hs[min(att_layer + 2, len(hs) - 1)][b["m_b"], b["m_t"]]
                l_probe = l_probe + F.cross_entropy(probes["match"](h_m), b["m_y"])
        pred = logits.argmax(-1)
        ok = ((pred == lab) | (lab == -100)).all(-1).float().mean().item()
        return l_lm, l_att, l_probe, ok

    model.model.vision_tower.register_forward_hook(_grab_vis)
    bar = tqdm(range(steps), desc="llava", mininterval=10)
    t2 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, 100) * g["scale"]
        exs = sample_batch(rng, bank, pools["train"], batch, caption_frac, vqa_weights)
        b = make_batch(enc, exs)
        if drop_background > 0:
            b["drop_mask"] = background_drop_mask(rng, b, drop_background)
        l_lm, l_att, l_probe, ok = run_batch(b)
        l_vis = vision_loss(None, b["patch_lab"], captured["vis"])[0] if train_vision else torch.zeros(())
        loss = l_lm + att_weight * l_att + probe_weight * l_probe + 0.3 * l_vis
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                model.eval()
                vb = make_batch(enc, val)
                vl, va, vp, vok = run_batch(vb)
                model.train()
            kinds = np.array([e["kind"] for e in val])
            bar.set_postfix(lm=f"{l_lm.item():.3f}", att=f"{l_att.item():.3f}", val_ok=f"{vok:.2f}")
            log(f"step {step} lm {l_lm.item():.4f} att {l_att.item():.4f} probe {l_probe.item():.4f} "
                f"vis {l_vis.item():.4f} train_ok {ok:.3f} val_probe {vp.item():.4f} "
                f"val_lm {vl.item():.4f} val_att {va.item():.4f} val_ok {vok:.3f} "
                f"s/step {(time.time() - t2) / (step + 1):.2f} t {time.time() - t_start:.0f}s")
        if (step + 1) % save_every == 0 or step == steps - 1:
            meta["training"]["steps_done"] = step + 1
            meta["training"]["seconds"] = round(time.time() - t_start)
            model.eval()
            save_checkpoint(out, model, proc, meta)
            model.train()
        if (time.time() - t_start) / 60 > max_minutes:
            log(f"stopping at step {step}: time limit {max_minutes} min")
            meta["training"]["steps_done"] = step + 1
            meta["training"]["seconds"] = round(time.time() - t_start)
            save_checkpoint(out, model, proc, meta)
            break
    return out

"""The rewritten model (any family in vpexport/families): a segmented decoder with static visual-token counts and in-graph pruning.

Built on the loaded Hugging Face modules (weights are shared, never copied). The prompt layout
is [prefix][visual][text]; `prefix` and the visual counts are Python ints fixed at build time,
the text part is right-padded (attention mask) and may be a dynamic axis. At each prune point
the scores come from the previous layer's q/k/v (only the rows the rule needs), then
TopK -> sort -> Gather of hidden states, original position ids and the key-padding mask.

Per-layer KV caches keep the length of their segment: [prefix][visual_l][text][generated].
A decode step attends to them with the same key layout, so decoding needs no pruning logic.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from vpexport.families import family_for_model
from vpexport.errors import UserInputError
from vpexport.methods import RULES
from vpexport.methods.base import ScoreInputs, attention_probs
from vpexport.pruning.schedule import Schedule


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotary (cos, sin) (B, L, hd) -> (B, 1, L, hd) tables for `apply_rope`, made once per segment.

    rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2]: the sign moves into the table, so
    each layer's RoPE is one half-swap and the multiply-adds (no Neg, and none of the Shape
    arithmetic that `chunk` traces into for every layer). `head_dim` is a Python int: a traced
    size would make the slice bounds computed values.
    """
    half = head_dim // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] on the last axis. As a reversed slice of a (.., 2, half) view it exports
    as one Slice (step -1) between free Reshapes: one copy pass instead of two slices and a concat."""
    return x.reshape(-1, 2, half).flip(1).view_as(x)


def apply_rope(q, k, cos, sin, head_dim: int):
    """`cos`, `sin` from `rope_tables`; `head_dim` a Python int so the slices export with constant bounds."""
    if cos.dim() != 4:
        raise ValueError("apply_rope takes the (B, 1, L, hd) tables of rope_tables")
    half = head_dim // 2
    return q * cos + swap_halves(q, half) * sin, k * cos + swap_halves(k, half) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, groups, l, d).reshape(b, h * groups, l, d)


def causal_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, 1, L, L) bool, True where query i may attend key j (j <= i and j valid)."""
    i = torch.arange(key_valid.shape[1], device=key_valid.device)
    return (i[:, None] >= i[None, :])[None, None] & key_valid[:, None, None, :]


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> additive mask (0 allowed, dtype's min elsewhere), built once per segment.

    A bool attn_mask makes the exporter's SDPA write Where(mask, 0, -inf) and, after the Softmax,
    Where(IsNaN(p), 0, p) in every layer: two more passes over each (B, H, L, L) block. The NaN guard
    is for rows with no allowed key; causal rows always allow the first key (the prompt is
    right-padded), so an additive mask gives the same probabilities without it.
    """
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device))


def _mrope_channels(rotary_emb, head_dim: int) -> torch.Tensor:
    """(head_dim,) long: the position channel (0 temporal, 1 height, 2 width) each RoPE dimension
    reads, as Hugging Face's `recomposition_frequencies` splits the frequencies by `mrope_section`
    (section i from channel i % 3) and repeats them for the second half."""
    section = list(rotary_emb.mrope_section)
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} does not cover head_dim {head_dim} // 2")
    half = torch.cat([torch.full((s,), i % 3, dtype=torch.long) for i, s in enumerate(section)])
    return torch.cat([half, half])


# Causal row blocks in prefill attention (see PrunedModel._attend): blocks of at least this many query
# rows (smaller blocks cost more in per-op overhead than the masked work they skip), at most this many.
ATTN_BLOCK_ROWS = 64
ATTN_MAX_BLOCKS = 8


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # (B, V) at each sample's last valid position
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, KV, L_l, hd), post-RoPE keys
    kept: list[torch.Tensor]  # per prune point (B, keep) original visual indices, sorted; empty for drop_all
    text_len: torch.Tensor  # (B,) valid text tokens


@dataclass
class DecoderState:
    """What flows between decoder layers during prefill (shapes follow the current segment)."""

    h: torch.Tensor  # (B, L_seg, d)
    pos: torch.Tensor  # (B, L_seg) original position ids; (B, L_seg, 3) for M-RoPE
    key_valid: torch.Tensor  # (B, L_seg) bool: not padding
    vis_orig: torch.Tensor  # (B, n) original indices of the visual tokens present
    n: int  # visual tokens present (static)
    text_len: torch.Tensor  # (B,) valid text tokens
    score: torch.Tensor | None = None  # (B, n) scores read from the last layer, for a point at the next one


class PrunedModel(nn.Module):
    """`schedule` fixes the segments; `prefix` is the number of tokens before the image."""

    def __init__(self, hf_model, schedule: Schedule, prefix: int, image_size=None):
        """`image_size` (H, W): the static image size of a dynamic-resolution family (Qwen2-VL)."""
        super().__init__()
        self.family = family_for_model(hf_model)
        ad = self.family.adapter(hf_model)
        self.adapter = ad
        tc = ad.text_config()
        self.embed_tokens = ad.embed_tokens
        self.layers = ad.layers
        self.norm = ad.final_norm
        self.rotary_emb = ad.rotary_emb
        self.lm_head = ad.lm_head
        q0 = ad.attention_parts(self.layers[0])[0]
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = tc.num_key_value_heads or self.num_heads
        self.head_dim = q0.out_features // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.num_layers = len(self.layers)
        self.image_token_id = ad.image_token_id
        self.sliding_window = ad.sliding_window()
        # A rope whose frequencies depend on the sequence length ("dynamic", "longrope") is
        # computed per call; every other kind is a fixed function of the position (see `rope`).
        fixed_rope = getattr(self.rotary_emb, "rope_type", "default") not in ("dynamic", "longrope")
        self.max_positions = (int(getattr(tc, "max_position_embeddings", 0) or 0) or None) if fixed_rope else None
        self._rope_cache: dict = {}

        self.vision_graph = self.family.vision_graph(hf_model, image_size)
        self.visual_tokens = self.vision_graph.tokens
        self.prefix = int(prefix)
        # Positions of the static [prefix][visual] span and of the first text token (the family's
        # 1-D RoPE or M-RoPE layout); the text and generated tokens continue one by one from it.
        grid = self.vision_graph.grid
        self.mrope = self.family.positions == "mrope"
        self.register_buffer("head_pos", self.family.head_positions(self.prefix, self.visual_tokens, grid),
                             persistent=False)
        self.text_pos0 = self.family.text_position_start(self.prefix, self.visual_tokens, grid)
        if self.mrope:
            self.register_buffer("mrope_channel", _mrope_channels(self.rotary_emb, self.head_dim), persistent=False)

        schedule.check(self.num_layers, self.visual_tokens)
        self.schedule = schedule
        self.points = {p.layer: p for p in schedule.points}
        self.visual_per_layer = schedule.visual_per_layer(self.num_layers, self.visual_tokens)
        self.sink_layers = schedule.sink_layers
        # Fixed index sets for the index-only baselines, drawn once from the schedule seed.
        self._fixed_idx: dict[int, torch.Tensor] = {}
        for p in schedule.points:
            if RULES[p.rule].kind == "fixed":
                n_in = self.visual_per_layer[p.layer - 1] if p.layer else self.visual_tokens
                self._fixed_idx[p.layer] = RULES[p.rule].fixed_indices(n_in, p.keep, schedule.seed + p.layer)
        # The position buffers follow the wrapped model's weights (a model loaded on a GPU).
        self.to(next(hf_model.parameters()).device)

    # ------------------------------------------------------------------ vision
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, N, d): the family's vision graph."""
        return self.vision_graph(pixel_values)

    # ------------------------------------------------------------------ decoder pieces
    def rope(self, h: torch.Tensor, pos: torch.Tensor):
        """RoPE tables for a segment's original positions (see `rope_tables`): rows of a (cos, sin)
        table over every position, computed once in f32 by the model's own rotary embedding.

        Looked up rather than computed from `pos` in the graph: at reduced precision a runtime
        evaluates position x frequency in bf16/fp16 where it cannot fold it (after a prune point the
        positions come from TopK), and an angle of ~600 rad in bf16 is off by whole radians (OpenVINO
        at bf16: relative L2 error ~0.2 in every key after the first prune point). The rows are the
        same numbers the per-call computation gives (one product per element, then cos/sin in f32).

        M-RoPE (`pos` (B, L, 3): temporal / height / width): each head dimension takes its rows from
        the channel `mrope_channel` names, the same numbers as Hugging Face's per-channel frequencies
        recomposed by `mrope_section`. A (B, L) `pos` (decode: text positions, equal in every
        channel) reads the 1-D rows, which is what M-RoPE gives for equal channels.
        """
        if self.max_positions is None:
            return rope_tables(*self.rotary_emb(h, pos.permute(2, 0, 1) if pos.dim() == 3 else pos), self.head_dim)
        key = (h.device, h.dtype, self.max_positions)
        if key not in self._rope_cache:
            probe = torch.zeros(1, 1, self.head_dim, device=h.device, dtype=torch.float32)
            every = torch.arange(self.max_positions, device=h.device)[None]
            cos, sin = self.rotary_emb(probe, every)
            self._rope_cache[key] = (cos[0].to(h.dtype), sin[0].to(h.dtype))
        cos, sin = self._rope_cache[key]
        if pos.dim() == 3:
            b, l, c = pos.shape
            ch = self.mrope_channel[None, None, None, :].expand(b, l, 1, self.head_dim)
            return rope_tables(torch.gather(cos[pos], 2, ch)[:, :, 0], torch.gather(sin[pos], 2, ch)[:, :, 0],
                               self.head_dim)
        return rope_tables(cos[pos], sin[pos], self.head_dim)

    @contextmanager
    def positions_below(self, limit: int):
        """Look RoPE rows up in a table of the first `limit` positions only, for tracing a graph that
        never reaches past them (the prefill: its last text position is text_pos0 + text length - 1).
        The table is a constant of the exported graph: over a 128k-position config it is 131 MB at
        head dim 128, of which the prefill reads a thousand rows. Decode keeps the whole table, as
        generation may run to the model's own limit."""
        saved = self.max_positions
        if saved is not None:
            self.max_positions = min(saved, int(limit))
        try:
            yield
        finally:
            self.max_positions = saved

    def _qkv(self, i: int, x: torch.Tensor, cos, sin):
        """`cos`, `sin`: the segment's tables from `rope`."""
        qp, kp, vp, _ = self.adapter.attention_parts(self.layers[i])
        b, l, _ = x.shape
        q = qp(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = kp(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = vp(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin, self.head_dim)
        return q, k, v

    @staticmethod
    def _attn_blocks(bias: torch.Tensor, head: int) -> list:
        """Causal row blocks of a segment's prefill attention: [(a, b, bias[:, :, a:b, :b])], the last
        block (the rest of the head and the text) as (a, None, bias[:, :, a:]).

        Query rows [a, b) with b <= head (the static [prefix][visual] span) cannot see keys at or
        after b, so their block runs against keys [0, b) only: every key left out has zero
        probability, the result is the full attention's, with about (c + 1) / 2c of its QK^T,
        softmax and PV work for c blocks. Bounds are Python ints (static in the graph, in dynamic
        text mode too); the bias blocks are cut once per segment, not per layer.
        """
        c = min(head // ATTN_BLOCK_ROWS, ATTN_MAX_BLOCKS)
        bounds = [0] + ([head * j // c for j in range(1, c)] if c >= 2 else [])
        blocks = [(a, b, bias[:, :, a:b, :b]) for a, b in zip(bounds, bounds[1:])]
        a = bounds[-1]
        blocks.append((a, None, bias[:, :, a:] if a else bias))
        return blocks

    def _attend(self, q, k, v, blocks: list) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + bias) v over the causal row blocks.

        Written out rather than as F.scaled_dot_product_attention: the exporter decomposes SDPA per
        call, scaling q and k by sqrt(scale) and transposing k again in every block; here q is
        scaled and k transposed once per layer and each block only slices them. On the
        LLaVA-1.5-scale stand-in OpenVINO spent ~10% of the pruned prefill on those repeated
        scalings and transposes.
        """
        qs = q * (1 / math.sqrt(self.head_dim))
        kt = k.transpose(-1, -2)
        outs = []
        for a, b, m in blocks:
            if b is None:
                qa = qs[:, :, a:] if a else qs
                p = torch.softmax(torch.matmul(qa, kt) + m, dim=-1)
                outs.append(torch.matmul(p, v))
            else:
                p = torch.softmax(torch.matmul(qs[:, :, a:b], kt[..., :b]) + m, dim=-1)
                outs.append(torch.matmul(p, v[:, :, :b]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _finish_layer(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        o_proj = self.adapter.attention_parts(layer)[3]
        b, _, l, _ = attn.shape
        h = h + o_proj(attn.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _sink_redirect(self, probs: torch.Tensor, p: int, n: int) -> torch.Tensor:
        """VisiPruner layer 0: move the text queries' visual attention mass onto the first visual token."""
        vis = probs[..., p : p + n]
        mass = vis.sum(-1, keepdim=True)
        return torch.cat([probs[..., :p], mass, torch.zeros_like(vis[..., 1:]), probs[..., p + n :]], dim=-1)

    def pre_llm_score(self, point, st: "DecoderState"):
        """A layer-0 point's scores, from the projector's output (the visual span of `st.h`)."""
        r = RULES[point.rule]
        if r.kind != "score":
            return None
        p, n = self.prefix, st.n
        return r.score(ScoreInputs(None, None, None, None, st.key_valid, p + n + st.text_len - 1, p, n, st.h, self.norm),
                       point.keep)

    def _score(self, point, q, k, v, allowed, key_valid, last_idx, p, n, h_out):
        """(B, n) scores of a point's scoring rule from layer K-1's tensors; None for the other kinds."""
        r = RULES[point.rule]
        if r.kind != "score":
            return None
        return r.score(ScoreInputs(q, k, v, allowed, key_valid, last_idx, p, n, h_out, self.norm), point.keep)

    # ------------------------------------------------------------------ prefill
    def merge_embeddings(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        p, n = self.prefix, self.visual_tokens
        emb = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        img = nn.functional.pad(image_features.to(emb.dtype), (0, 0, p, seq - p - n))
        pos = torch.arange(seq, device=emb.device)
        return torch.where(((pos >= p) & (pos < p + n))[None, :, None], img, emb)

    def check_inputs(self, input_ids: torch.Tensor) -> None:
        """Eager-only check that the image tokens sit at the static span this model was built for."""
        p, n = self.prefix, self.visual_tokens
        span = input_ids[:, p : p + n]
        if input_ids.shape[1] < p + n + 1 or not bool((span == self.image_token_id).all()):
            raise UserInputError(
                f"image tokens are not at positions [{p}, {p + n}) of the prompt",
                field="prompt",
                fix="use the recipe's prompt template with one <image> placeholder (the system prefix is fixed)",
            )
        if int((input_ids == self.image_token_id).sum()) != n * input_ids.shape[0]:
            raise UserInputError("the prompt has more than one image", field="prompt", fix="use one <image> per prompt")

    def start_state(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor
    ) -> "DecoderState":
        """The state entering layer 0: merged embeddings, original positions, nothing pruned yet."""
        p, n = self.prefix, self.visual_tokens
        b, seq = input_ids.shape
        if self.sliding_window is not None and not torch.jit.is_tracing() and seq > self.sliding_window:
            raise UserInputError(
                f"sequence of {seq} tokens exceeds the sliding window {self.sliding_window}",
                field="export.text_length.max",
                fix="shorten the prompt",
            )
        h = self.merge_embeddings(input_ids, image_features)
        if self.mrope:
            text = self.text_pos0 + torch.arange(seq - p - n, device=h.device)
            pos = torch.cat([self.head_pos.to(h.device), text[:, None].expand(seq - p - n, 3)], dim=0)
            pos = pos[None].expand(b, seq, 3)
        else:
            pos = torch.arange(seq, device=h.device)[None].expand(b, seq)
        return DecoderState(
            h=h,
            pos=pos,
            key_valid=attention_mask.to(torch.bool),
            vis_orig=torch.arange(n, device=h.device)[None].expand(b, n),
            n=n,
            text_len=attention_mask[:, p + n :].sum(-1),
        )

    def run_layers(self, st: "DecoderState", start: int = 0, kv=None, kept=None, observe=None):
        """Run decoder layers start..L-1 from `st` (the state entering `start`); returns (st, kv, kept).

        At a prune point, `st.score` (read from the previous layer) picks the kept tokens. `observe`,
        if given, is called per layer as observe(i, st, q, k, v, allowed, last_idx, h_out) with the
        layer's input state, its post-RoPE q and repeated k/v and its output hidden state
        (calibration records scores from it).
        """
        p = self.prefix
        kv = [] if kv is None else kv
        kept = [] if kept is None else kept
        cos, sin = self.rope(st.h, st.pos)
        allowed = causal_mask(st.key_valid)
        blocks = self._attn_blocks(attention_bias(allowed, st.h.dtype), p + st.n)
        for i in range(start, self.num_layers):
            if i in self.points:
                if i == 0 and st.score is None:
                    st = replace(st, score=self.pre_llm_score(self.points[0], st))
                st = self._prune(self.points[i], st)
                kept.append(st.vis_orig)
                cos, sin = self.rope(st.h, st.pos)
                allowed = causal_mask(st.key_valid)
                blocks = self._attn_blocks(attention_bias(allowed, st.h.dtype), p + st.n)
            n = st.n
            x = self.layers[i].input_layernorm(st.h)
            q, k, v = self._qkv(i, x, cos, sin)
            kv.append((k, v))
            kr, vr = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
            layer_blocks = blocks
            if 0 < i < self.sink_layers:
                sink_allowed = allowed & ~self._text_visual_block(st.h.shape[1], p, n, st.h.device)
                layer_blocks = self._attn_blocks(attention_bias(sink_allowed, q.dtype), p + n)
            attn = self._attend(q, kr, vr, layer_blocks)
            if i == 0 and self.sink_layers > 0:
                t0 = p + n
                probs = attention_probs(q[:, :, t0:], kr, allowed[:, :, t0:])
                text_out = torch.matmul(self._sink_redirect(probs, p, n).to(vr.dtype), vr)
                attn = torch.cat([attn[:, :, :t0], text_out], dim=2)
            last_idx = p + n + st.text_len - 1
            h_out = self._finish_layer(i, st.h, attn)
            if observe is not None:
                observe(i, st, q, kr, vr, allowed, last_idx, h_out)
            nxt = self.points.get(i + 1)
            score = None
            if nxt is not None and n > 0:
                score = self._score(nxt, q, kr, vr, allowed, st.key_valid, last_idx, p, n, h_out)
            st = replace(st, h=h_out, score=score)
        return st, kv, kept

    def finish(self, st: "DecoderState") -> torch.Tensor:
        """Final norm + lm_head at each sample's last valid position: (B, V)."""
        h = self.norm(st.h)
        last_idx = self.prefix + st.n + st.text_len - 1
        last = torch.gather(h, 1, last_idx[:, None, None].expand(h.shape[0], 1, h.shape[-1]))[:, 0]
        return self.lm_head(last)

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor
    ) -> PrefillOutput:
        st = self.start_state(input_ids, attention_mask, image_features)
        st, kv, kept = self.run_layers(st)
        return PrefillOutput(self.finish(st), kv, kept, st.text_len)

    @staticmethod
    def _text_visual_block(seq: int, p: int, n: int, device) -> torch.Tensor:
        i = torch.arange(seq, device=device)
        text_rows = i >= p + n
        vis_cols = (i >= p) & (i < p + n)
        return (text_rows[:, None] & vis_cols[None, :])[None, None]

    def _prune(self, point, st: "DecoderState") -> "DecoderState":
        p, n = self.prefix, st.n
        if RULES[point.rule].kind == "drop":
            cut = lambda t: torch.cat([t[:, :p], t[:, p + n :]], dim=1)  # noqa: E731
            return replace(st, h=cut(st.h), pos=cut(st.pos), key_valid=cut(st.key_valid),
                           vis_orig=st.vis_orig[:, :0], n=0, score=None)
        b = st.h.shape[0]
        if point.layer in self._fixed_idx:
            sel = self._fixed_idx[point.layer].to(st.h.device)[None].expand(b, point.keep)
        else:
            sel = torch.topk(st.score, point.keep, dim=-1).indices.sort(dim=-1).values

        dev = st.h.device
        full = torch.cat([torch.arange(p, device=dev)[None].expand(b, p), sel + p,
                          torch.arange(p + n, st.h.shape[1], device=dev)[None].expand(b, st.h.shape[1] - p - n)], dim=1)

        def take(t):
            idx = full if t.dim() == 2 else full[:, :, None].expand(b, full.shape[1], t.shape[-1])
            return torch.gather(t, 1, idx)

        return replace(st, h=take(st.h), pos=take(st.pos), key_valid=take(st.key_valid),
                       vis_orig=torch.gather(st.vis_orig, 1, sel), n=point.keep, score=None)

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        input_ids: torch.Tensor,  # (B, 1)
        position_ids: torch.Tensor,  # (B, 1) original positions
        text_mask: torch.Tensor,  # (B, T + S + 1): text + generated + this token
        kv: list[tuple[torch.Tensor, torch.Tensor]],
    ):
        h = self.embed_tokens(input_ids)
        b = h.shape[0]
        cos, sin = self.rope(h, position_ids)
        tm = text_mask.to(torch.bool)
        p = self.prefix
        new_kv = []
        for i in range(self.num_layers):
            n = self.visual_per_layer[i]
            x = self.layers[i].input_layernorm(h)
            q, k, v = self._qkv(i, x, cos, sin)
            k = torch.cat([kv[i][0], k], dim=2)
            v = torch.cat([kv[i][1], v], dim=2)
            new_kv.append((k, v))
            kr, vr = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
            head = torch.ones(b, p + n, dtype=torch.bool, device=h.device)
            allowed = torch.cat([head, tm], dim=1)
            if 0 < i < self.sink_layers:
                vis = torch.zeros_like(allowed)
                vis[:, p : p + n] = True
                allowed = allowed & ~vis
            probs = attention_probs(q, kr, allowed[:, None, None, :])
            if i == 0 and self.sink_layers > 0:
                probs = self._sink_redirect(probs, p, n)
            attn = torch.matmul(probs.to(vr.dtype), vr)
            h = self._finish_layer(i, h, attn)
        return self.lm_head(self.norm(h))[:, 0], new_kv

    def decode_step(
        self,
        input_ids: torch.Tensor,  # (B, 1)
        position_ids: torch.Tensor,  # (B, 1) original positions
        cache_mask: torch.Tensor,  # (B, C): which of the caches' C text slots hold a valid token
        kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (B, KV, prefix + n_l + C, hd)
    ):
        """One token against fixed-capacity caches; the same result as `decode` without its Concat.

        `decode` appends the new key/value to each cache and returns the grown caches, so every step
        copies every cache (and a runtime feeds all of them back). Here the caches are read only:
        slots [prefix + n_l, prefix + n_l + C) hold the text and the tokens generated so far
        (`cache_mask` marks the valid ones, padding and not-yet-written slots are 0), the token
        attends to them and to itself, and only its own key/value per layer, (B, KV, 1, hd), is
        returned for the caller to write into the next free slot. Scores against the cache and
        against the token itself are concatenated (B, KV, G, C' + 1 floats), never the caches.
        The query heads are grouped (B, KV, G, hd), so GQA reads the caches without repeating them.
        """
        h = self.embed_tokens(input_ids)
        b = h.shape[0]
        cos, sin = self.rope(h, position_ids)
        tm = cache_mask.to(torch.bool)
        p, g, hd = self.prefix, self.groups, self.head_dim
        scale = 1.0 / math.sqrt(hd)
        new_kv = []
        for i in range(self.num_layers):
            n = self.visual_per_layer[i]
            x = self.layers[i].input_layernorm(h)
            q, k, v = self._qkv(i, x, cos, sin)  # (B, H, 1, hd), (B, KV, 1, hd)
            new_kv.append((k, v))
            kc, vc = kv[i]
            qg = q.reshape(b, self.num_kv_heads, g, hd)
            s_cache = torch.matmul(qg, kc.transpose(-1, -2)) * scale  # (B, KV, G, p + n + C)
            s_self = (qg * k).sum(-1, keepdim=True) * scale  # (B, KV, G, 1)
            head = torch.ones(b, p + n, dtype=torch.bool, device=h.device)
            if 0 < i < self.sink_layers:
                head[:, p : p + n] = False
            allowed = torch.cat([head, tm, torch.ones(b, 1, dtype=torch.bool, device=h.device)], dim=1)
            logits = torch.cat([s_cache, s_self], dim=-1).masked_fill(~allowed[:, None, None, :],
                                                                       torch.finfo(s_cache.dtype).min)
            probs = torch.softmax(logits.float(), dim=-1)
            if i == 0 and self.sink_layers > 0:
                probs = self._sink_redirect(probs, p, n)
            probs = probs.to(vc.dtype)
            attn = torch.matmul(probs[..., :-1], vc) + probs[..., -1:] * v  # (B, KV, G, hd)
            h = self._finish_layer(i, h, attn.reshape(b, self.num_heads, 1, hd))
        return self.lm_head(self.norm(h))[:, 0], new_kv

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def greedy(self, logits, kv, attention_mask, text_len, max_new_tokens: int, eos_token_id: int | None):
        """Greedy decoding from prefill logits/KV; the new tokens of each sample (up to, excluding, eos)."""
        b = logits.shape[0]
        text_mask = attention_mask[:, self.prefix + self.visual_tokens :].to(torch.long)
        next_pos = (self.text_pos0 + text_len)[:, None]
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            picked = nxt.tolist()  # one device-to-host copy per step
            for j in range(b):
                if not done[j]:
                    t = picked[j]
                    if eos_token_id is not None and t == eos_token_id:
                        done[j] = True
                    else:
                        tokens[j].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            text_mask = torch.cat([text_mask, torch.ones(b, 1, dtype=text_mask.dtype, device=text_mask.device)], dim=1)
            logits, kv = self.decode(nxt[:, None], next_pos, text_mask, kv)
            next_pos = next_pos + 1
        return tokens

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
    ) -> tuple[list[list[int]], PrefillOutput]:
        """Greedy decoding; returns the new tokens of each sample (up to and excluding eos)."""
        self.check_inputs(input_ids)
        out = self.prefill(input_ids, attention_mask, self.encode_image(pixel_values))
        tokens = self.greedy(out.logits, out.kv, attention_mask, out.text_len, max_new_tokens, eos_token_id)
        return tokens, out

"""The rewritten model against Hugging Face (no pruning) and against a plain reference (pruning)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import reference_forward, reference_generate
from tests.tiny import FAMILIES, make_batch, tiny_llava
from vpexport.model.pruned import PrunedModel
from vpexport.methods import METHODS
from vpexport.pruning.schedule import PrunePoint, Schedule

PREFIX = 5
N = 36  # 48 px / patch 8 -> 6x6


def _hf_last_logits(model, ids, mask, px):
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    return logits[torch.arange(ids.shape[0]), mask.sum(-1) - 1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text_lens", [[6], [7, 3, 5]], ids=["batch1", "batch3"])
def test_unpruned_matches_hf(family, text_lens):
    model = tiny_llava(family)
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX)
    ids, mask, px = make_batch(model, text_lens)
    with torch.no_grad():
        ref = _hf_last_logits(model, ids, mask, px)
        ours = pm.prefill(ids, mask, pm.encode_image(px)).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5


def test_image_features_match_hf():
    model = tiny_llava("llama")
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX)
    _, _, px = make_batch(model, [3, 4])
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=px)
        ref = getattr(ref, "pooler_output", ref)
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
        ours = pm.encode_image(px)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_greedy_generation_matches_hf(family):
    model = tiny_llava(family)
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX)
    ids, mask, px = make_batch(model, [6, 3, 5], seed=1)
    ours, _ = pm.generate(ids, mask, px, max_new_tokens=8, eos_token_id=2)
    for b in range(3):
        valid = int(mask[b].sum())
        hf = model.generate(
            input_ids=ids[b : b + 1, :valid], pixel_values=px[b : b + 1], max_new_tokens=8, do_sample=False,
            eos_token_id=2, pad_token_id=0,
        )[0, valid:].tolist()
        if 2 in hf:
            hf = hf[: hf.index(2)]
        assert ours[b] == hf, f"sample {b}"
        assert len(hf) > 0


SCHEDULES = {
    "fastv": METHODS["fastv"].schedule([(2, 12)]),
    "himap": METHODS["himap"].schedule([(1, 18), (3, 6)]),
    "visipruner": METHODS["visipruner"].schedule([(2, 5), (3, 0)], sink_layers=1),
    "random": METHODS["random"].schedule([(2, 9)], seed=3),
    "uniform": METHODS["uniform"].schedule([(1, 9)]),
    # 4 visual + 4 text pivots (3 for the 3-token prompt): 19 kept, pivots take unequal counts
    "dart": METHODS["dart"].schedule([(2, 19)]),
    "divprune": METHODS["divprune"].schedule([(0, 11)]),
    "divprune_exit": METHODS["divprune_exit"].schedule([(0, 11), (3, 0)]),
    "cdpruner": METHODS["cdpruner"].schedule([(0, 13)]),
    # 4 image + 4 text pivots, takes ceil(rest / pivots left): 4, 3, 3, ... of the 17 after the pivots
    "dart_projector": METHODS["dart_projector"].schedule([(0, 21)]),
}


@pytest.mark.parametrize("method", sorted(SCHEDULES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_matches_plain_reference(method, family):
    model = tiny_llava(family)
    sched = SCHEDULES[method]
    pm = PrunedModel(model, sched, prefix=PREFIX)
    ids, mask, px = make_batch(model, [7, 3, 5], seed=2)
    with torch.no_grad():
        feats = pm.encode_image(px)
        out = pm.prefill(ids, mask, feats)
    fixed = [k.tolist() for k in out.kept] if method in ("random", "uniform") else None
    if fixed is not None:
        fixed = [[row for row in k] for k in fixed]
    ref_logits, ref_kept = reference_forward(model, ids, mask, feats, PREFIX, sched, fixed_kept=fixed)
    # Kept indices follow the method's definition (checked independently by the reference).
    assert len(out.kept) == len(sched.points)
    for ours_k, ref_k, pt in zip(out.kept, ref_kept, sched.points):
        assert ours_k.shape == (3, pt.keep)
        assert torch.equal(ours_k, ref_k.reshape(3, pt.keep)), pt
    assert (out.logits - ref_logits).abs().max().item() < 1e-4
    # KV caches follow the segments' static lengths.
    t = ids.shape[1] - PREFIX - N
    for layer, (k, v) in enumerate(out.kv):
        assert k.shape[2] == PREFIX + pm.visual_per_layer[layer] + t


def test_index_rules_are_the_defined_subsets():
    model = tiny_llava("llama")
    pm = PrunedModel(model, SCHEDULES["uniform"], prefix=PREFIX)
    ids, mask, px = make_batch(model, [4, 2])
    out = pm.prefill(ids, mask, pm.encode_image(px))
    # 9 of a 6x6 grid: a 3x3 lattice with stride 2, centred.
    assert out.kept[0][0].tolist() == [y * 6 + x for y in (1, 3, 5) for x in (1, 3, 5)]
    pr = PrunedModel(model, SCHEDULES["random"], prefix=PREFIX)
    k1 = pr.prefill(ids, mask, pr.encode_image(px)).kept[0]
    assert torch.equal(k1[0], k1[1]) and k1[0].unique().numel() == 9
    other = PrunedModel(model, METHODS["random"].schedule([(2, 9)], seed=4), prefix=PREFIX)
    assert not torch.equal(other.prefill(ids, mask, other.encode_image(px)).kept[0][0], k1[0])


@pytest.mark.parametrize("method", ["fastv", "himap", "visipruner"])
def test_pruned_generation_matches_reference(method):
    model = tiny_llava("llama")
    sched = SCHEDULES[method]
    pm = PrunedModel(model, sched, prefix=PREFIX)
    ids, mask, px = make_batch(model, [6, 3, 5], seed=5)
    ours, out = pm.generate(ids, mask, px, max_new_tokens=6, eos_token_id=2)
    with torch.no_grad():
        feats = pm.encode_image(px)
    ref, _, _ = reference_generate(model, ids, mask, feats, PREFIX, sched, max_new_tokens=6, eos=2)
    assert ours == ref
    assert any(len(t) > 1 for t in ours)


def test_pruning_changes_the_answer_path():
    """Sanity: a heavy prune must change logits (the test above could not pass by ignoring pruning)."""
    model = tiny_llava("llama")
    ids, mask, px = make_batch(model, [5])
    dense = PrunedModel(model, Schedule("none"), prefix=PREFIX)
    pruned = PrunedModel(model, Schedule("fastv", (PrunePoint(1, 2, "last_token_attention"),)), prefix=PREFIX)
    with torch.no_grad():
        f = dense.encode_image(px)
        a = dense.prefill(ids, mask, f).logits
        b = pruned.prefill(ids, mask, f).logits
    assert (a - b).abs().max().item() > 1e-3


def test_image_span_is_checked():
    from vpexport.errors import UserInputError

    model = tiny_llava("llama")
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX + 1)
    ids, mask, px = make_batch(model, [4])
    with pytest.raises(UserInputError, match="image tokens"):
        pm.generate(ids, mask, px, max_new_tokens=2, eos_token_id=2)


@pytest.mark.parametrize("method", ["none", "himap", "visipruner"])
def test_causal_row_blocks_match_full_attention(method, monkeypatch):
    """Prefill attention split into causal row blocks (PrunedModel._attn_blocks) equals one block.

    The tiny model's [prefix][visual] head (41 rows) is below the default block size, so the block
    size is lowered here to cut it into several blocks, at every segment."""
    import vpexport.model.pruned as pruned_mod

    model = tiny_llava("llama")
    sched = Schedule("none") if method == "none" else SCHEDULES[method]
    ids, mask, px = make_batch(model, [7, 3, 5], seed=6)
    outs = {}
    for rows in (10**6, 8):
        monkeypatch.setattr(pruned_mod, "ATTN_BLOCK_ROWS", rows)
        pm = PrunedModel(model, sched, prefix=PREFIX)
        with torch.no_grad():
            outs[rows] = pm.prefill(ids, mask, pm.encode_image(px))
    bias = torch.zeros(1, 1, 50, 50)
    assert len(pm._attn_blocks(bias, PREFIX + N)) > 2  # several blocks in the run above
    full, blocked = outs[10**6], outs[8]
    assert (full.logits - blocked.logits).abs().max().item() < 1e-5
    for (k0, v0), (k1, v1) in zip(full.kv, blocked.kv):
        assert (k0 - k1).abs().max().item() < 1e-5 and (v0 - v1).abs().max().item() < 1e-5
    for a, b in zip(full.kept, blocked.kept):
        assert torch.equal(a, b)
    if method == "none":
        with torch.no_grad():
            ref = _hf_last_logits(model, ids, mask, px)
        assert (blocked.logits - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_rows_are_the_per_call_rotary_embedding(family):
    """The prefill/decode graphs look RoPE up in a per-position table; its rows must be exactly what
    the model's rotary embedding computes for those positions (at any position, pruned or not)."""
    from vpexport.model.pruned import rope_tables

    model = tiny_llava(family)
    pm = PrunedModel(model, Schedule("none"), prefix=3)
    assert pm.max_positions == model.config.text_config.max_position_embeddings
    h = torch.randn(2, 7, model.config.text_config.hidden_size)
    pos = torch.randint(0, pm.max_positions, (2, 7))
    got = pm.rope(h, pos)
    want = rope_tables(*pm.rotary_emb(h, pos), pm.head_dim)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)

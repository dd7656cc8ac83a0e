"""Qwen2-VL / Qwen2.5-VL through the rewritten decoder: against Hugging Face (no pruning) and
against the plain reference with M-RoPE positions (pruning)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import reference_forward, reference_generate
from tests.test_pruned_model import SCHEDULES
from tests.tiny import QWEN_IMAGE_TOKEN, QWEN_KINDS, make_qwen_batch, tiny_qwen
from vpexport.families.qwen_vision import hf_pixel_values
from vpexport.model.pruned import PrunedModel
from vpexport.pruning.schedule import Schedule

PREFIX = 5
SIZES = [(168, 168), (112, 196)]  # 6x6 and 4x7 merged tokens


@pytest.fixture(scope="module", params=QWEN_KINDS)
def qwen(request):
    return request.param, tiny_qwen(request.param)


def _hf_inputs(model, ids, px):
    vc = model.config.vision_config
    b, _, h, w = px.shape
    return dict(input_ids=ids, pixel_values=hf_pixel_values(px, vc.patch_size, vc.temporal_patch_size,
                                                             vc.spatial_merge_size),
                image_grid_thw=torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]] * b),
                mm_token_type_ids=(ids == QWEN_IMAGE_TOKEN).int())


def _hf_positions(model, px_row):
    """Hugging Face's own M-RoPE positions for one sample's valid ids, (L, 3)."""
    vc = model.config.vision_config
    _, h, w = px_row.shape

    def positions(row):
        pos, _ = model.model.get_rope_index(row[None], (row[None] == QWEN_IMAGE_TOKEN).int(),
                                            image_grid_thw=torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]]))
        return pos[:, 0].T

    return positions


@pytest.mark.parametrize("size", SIZES, ids=["6x6", "4x7"])
@pytest.mark.parametrize("text_lens", [[6], [7, 3, 5]], ids=["batch1", "batch3"])
def test_unpruned_matches_hf(qwen, size, text_lens):
    _, model = qwen
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX, image_size=size)
    ids, mask, px = make_qwen_batch(text_lens, size)
    with torch.no_grad():
        ours = pm.prefill(ids, mask, pm.encode_image(px)).logits
        for b in range(len(text_lens)):
            valid = int(mask[b].sum())
            ref = model(**_hf_inputs(model, ids[b : b + 1, :valid], px[b : b + 1])).logits[0, -1]
            assert (ours[b] - ref).abs().max().item() < 1e-5, f"sample {b}"


@pytest.mark.parametrize("size", SIZES, ids=["6x6", "4x7"])
def test_unpruned_greedy_generation_matches_hf(qwen, size):
    _, model = qwen
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX, image_size=size)
    ids, mask, px = make_qwen_batch([6, 3, 5], size, seed=1)
    ours, _ = pm.generate(ids, mask, px, max_new_tokens=8, eos_token_id=2)
    for b in range(3):
        valid = int(mask[b].sum())
        hf = model.generate(**_hf_inputs(model, ids[b : b + 1, :valid], px[b : b + 1]), max_new_tokens=8,
                            do_sample=False, eos_token_id=2, pad_token_id=0)[0, valid:].tolist()
        if 2 in hf:
            hf = hf[: hf.index(2)]
        assert ours[b] == hf, f"sample {b}"
        assert len(hf) > 0


def test_positions_are_hugging_faces():
    model = tiny_qwen("qwen2-vl")
    pm = PrunedModel(model, Schedule("none"), prefix=PREFIX, image_size=(112, 196))
    ids, mask, px = make_qwen_batch([4], (112, 196))
    st = pm.start_state(ids, mask, pm.encode_image(px))
    assert torch.equal(st.pos[0], _hf_positions(model, px[0])(ids[0]))
    assert pm.text_pos0 == PREFIX + 7  # the text continues after max(4, 7) merged rows / columns


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_pruned_matches_plain_reference(qwen, method):
    _, model = qwen
    sched = SCHEDULES[method]
    pm = PrunedModel(model, sched, prefix=PREFIX, image_size=(168, 168))
    ids, mask, px = make_qwen_batch([7, 3, 5], seed=2)
    with torch.no_grad():
        feats = pm.encode_image(px)
        out = pm.prefill(ids, mask, feats)
    fixed = [k.tolist() for k in out.kept] if method in ("random", "uniform") else None
    ref_logits, ref_kept = reference_forward(model, ids, mask, feats, PREFIX, sched, fixed_kept=fixed,
                                             positions=_hf_positions(model, px[0]))
    for ours_k, ref_k, pt in zip(out.kept, ref_kept, sched.points):
        assert torch.equal(ours_k, ref_k.reshape(3, pt.keep)), pt
    assert (out.logits - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["fastv", "himap"])
def test_pruned_generation_matches_reference(qwen, method):
    _, model = qwen
    sched = SCHEDULES[method]
    pm = PrunedModel(model, sched, prefix=PREFIX, image_size=(168, 168))
    ids, mask, px = make_qwen_batch([6, 3, 5], seed=5)
    ours, _ = pm.generate(ids, mask, px, max_new_tokens=6, eos_token_id=2)
    with torch.no_grad():
        feats = pm.encode_image(px)
    ref, _, _ = reference_generate(model, ids, mask, feats, PREFIX, sched, max_new_tokens=6, eos=2,
                                   positions=_hf_positions(model, px[0]))
    assert ours == ref
    assert any(len(t) > 1 for t in ours)


def test_pruned_positions_are_gathered(qwen):
    """A prune point keeps each kept token's own (t, h, w) position: shifting the visual positions
    after pruning would change the logits (the test above could not pass by ignoring M-RoPE)."""
    _, model = qwen
    pm = PrunedModel(model, SCHEDULES["fastv"], prefix=PREFIX, image_size=(168, 168))
    ids, mask, px = make_qwen_batch([5], seed=3)
    with torch.no_grad():
        feats = pm.encode_image(px)
        ours = pm.prefill(ids, mask, feats).logits
    hf_pos = _hf_positions(model, px[0])
    one_d = reference_forward(model, ids, mask, feats, PREFIX, SCHEDULES["fastv"],
                              positions=lambda row: hf_pos(row)[:, :1].expand(-1, 3).contiguous())[0]
    assert (ours - one_d).abs().max().item() > 1e-3

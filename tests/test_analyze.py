"""analyze: the value-contribution statistic on hand-built cases, stage detection, the causal
block's equivalence to a drop-all point, and the CLI's output folder."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.test_calibrate import mini_recipe, mini_setup  # noqa: F401  (fixtures)
from tests.tiny import make_batch, tiny_llava
from vpexport.calibrate.analyze import _blocked_model, fusion_and_exit, tokens_for_mass, value_contribution_cos
from vpexport.model.pruned import PrunedModel, causal_mask, repeat_kv
from vpexport.pruning.schedule import Schedule


def test_value_contribution_hand_built():
    # one head, head dim 2, three keys; the last token attends keys 0 and 1 half each
    probs = torch.tensor([[[0.5, 0.5, 0.0]]])  # (B=1, H=1, K=3)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])  # (1, 1, 3, 2)
    o = torch.einsum("bhk,bhkd->bhd", probs, v)  # [0.5, 0.5]
    cos, norm = value_contribution_cos(probs, v, o)
    # o - c_0 = [0, 0.5] -> cos with [0.5, 0.5] = 1/sqrt(2); key 2 has no weight -> cos 1
    assert cos[0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0], abs=1e-6)
    assert norm[0].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)


def test_value_contribution_concatenates_heads():
    # two heads: key 0 matters only in head 1; the cos is over the concatenated output
    probs = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # (1, H=2, K=2)
    v = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # (1, 2, 2, 1)
    o = torch.einsum("bhk,bhkd->bhd", probs, v)  # head0: 2, head1: 3 -> [2, 3]
    cos, norm = value_contribution_cos(probs, v, o)
    # c_0 = [0, 3] -> o - c_0 = [2, 0]; c_1 = [2, 0] -> o - c_1 = [0, 3]
    assert cos[0].tolist() == pytest.approx([2 / math.sqrt(13), 3 / math.sqrt(13)], abs=1e-6)
    assert norm[0].tolist() == pytest.approx([3.0, 2.0])


def test_fusion_and_exit_rules():
    # fusion at the first layer below 0.995; exit after the 2nd (cumulative) layer with all >= 0.999
    assert fusion_and_exit([1.0, 0.999, 0.99, 0.9995, 0.99, 0.9999, 1.0, 1.0]) == (2, 6)
    assert fusion_and_exit([1.0] * 8) == (None, None)
    assert fusion_and_exit([0.9, 0.9, 0.9, 0.9]) == (0, None)
    assert fusion_and_exit([0.9, 1.0, 1.0, 0.9]) == (0, 3)


def test_tokens_for_mass():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert tokens_for_mass(w, 0.9).tolist() == [3, 4]
    assert tokens_for_mass(w, 0.5).tolist() == [1, 2]


@torch.no_grad()
def _masked_forward(pl: PrunedModel, ids, mask, feats, block_from: int):
    """Dense forward where text queries cannot attend visual keys in layers >= block_from."""
    p, n = pl.prefix, pl.visual_tokens
    b, seq = ids.shape
    h = pl.merge_embeddings(ids, feats)
    pos = torch.arange(seq)[None].expand(b, seq)
    cos, sin = pl.rope(h, pos)
    allowed = causal_mask(mask.bool())
    for i in range(pl.num_layers):
        q, k, v = pl._qkv(i, pl.layers[i].input_layernorm(h), cos, sin)
        m = allowed & ~pl._text_visual_block(seq, p, n, h.device) if i >= block_from else allowed
        attn = F.scaled_dot_product_attention(q, repeat_kv(k, pl.groups), repeat_kv(v, pl.groups), attn_mask=m,
                                              scale=1 / math.sqrt(pl.head_dim))
        h = pl._finish_layer(i, h, attn)
    h = pl.norm(h)
    last = p + n + mask[:, p + n :].sum(-1) - 1
    return pl.lm_head(h[torch.arange(b), last])


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_causal_block_equals_drop_all(layer):
    model = tiny_llava("llama", layers=4)
    ids, mask, px = make_batch(model, [5, 3], prefix=5)
    runner = SimpleNamespace(pipe=SimpleNamespace(model=model, image_size=None), p=5,
                             model_for=lambda s: PrunedModel(model, s, 5))
    pl = _blocked_model(runner, layer)
    with torch.no_grad():
        feats = pl.encode_image(px)
        got = pl.prefill(ids, mask, feats).logits
    ref = _masked_forward(PrunedModel(model, Schedule("none"), 5), ids, mask, feats, layer)
    assert torch.allclose(got, ref, atol=1e-5)
    dense = _masked_forward(PrunedModel(model, Schedule("none"), 5), ids, mask, feats, 99)
    assert not torch.allclose(got, dense, atol=1e-5)


def test_analyze_cli_writes_folder(mini_recipe, tmp_path):
    from tests.test_calibrate import cli

    out = tmp_path / "art"
    assert cli(["analyze", str(mini_recipe), "--out", str(out), "--samples", "4", "--batch-size", "2"]) == 0
    d = out / "analysis"
    a = json.loads((d / "analysis.json").read_text())
    assert a["samples"] == 4 and len(a["layers"]) == 8 and len(a["causal"]) == 8
    for k in ("flows.png", "value_contribution.png", "concentration.png", "causal.png", "analysis.md"):
        assert (d / k).is_file(), k
    assert not (d / "visual_share.png").exists()  # its curves are flows.png's
    assert "stage" in (d / "analysis.md").read_text().lower()
    assert [p.name for p in out.iterdir()] == ["analysis"]  # no temp folder left behind


def test_analyze_says_when_it_replaces_an_analysis(mini_recipe, tmp_path, capsys):
    from tests.test_calibrate import cli

    out = tmp_path / "art"
    assert cli(["analyze", str(mini_recipe), "--out", str(out), "--samples", "4", "--batch-size", "2"]) == 0
    assert "replacing" not in capsys.readouterr().err
    assert cli(["analyze", str(mini_recipe), "--out", str(out), "--samples", "3", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert f"[analyze] replacing {out / 'analysis'} (4 samples) with an analysis of 3" in err
    assert json.loads((out / "analysis" / "analysis.json").read_text())["samples"] == 3

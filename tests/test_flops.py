"""FLOPs and KV-cache accounting: hand-computed numbers on a tiny arch, and the papers' ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpexport.accounting import (
    decode_step_flops,
    kv_cache_bytes,
    paper_flops,
    prefill_flops,
    scoring_flops,
    vision_flops,
)
from vpexport.families import BUILTIN_ARCHS
from vpexport.arch.layout import PromptLayout
from vpexport.arch.spec import ArchSpec, TextSpec
from vpexport.families.llava import ClipVisionSpec
from vpexport.methods import METHODS
from vpexport.pruning.schedule import Schedule
from vpexport.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

# d=8, H=2, KV=1 (GQA), hd=4, m=16, V=10, 3 layers; vision: 4x4 image, 2x2 patches -> 4 patches,
# dv=4, mv=8, 3 layers with feature_layer -2 -> 2 run; 4 visual tokens.
TINY = ArchSpec(
    name="tiny",
    family="llava",
    text=TextSpec(family="llama", hidden=8, intermediate=16, layers=3, heads=2, kv_heads=1, head_dim=4, vocab=10),
    vision=ClipVisionSpec(hidden=4, intermediate=8, layers=3, heads=1, image_size=4, patch_size=2, channels=3,
                      feature_layer=-2, select_strategy="default"),
    image_token_id=9,
)  # fmt: skip
LAY = PromptLayout(prefix=2, visual=4, text=3)  # n = 9 dense
FASTV = METHODS["fastv"].schedule([(1, 2)])  # layers 1, 2 see 2 visual tokens -> n = 7

# Per layer on n tokens (by hand): q 2*n*8*8=128n, k 2*n*8*4=64n, v 64n, o 128n,
# QK^T 2*n*n*8=16n^2, AV 16n^2, FFN 3*2*n*8*16=768n  ->  1152n + 32n^2.
#   n=9: 10368 + 2592 = 12960;   n=7: 8064 + 1568 = 9632;   lm_head 2*8*10 = 160.


def test_exact_prefill_tiny_by_hand():
    f = prefill_flops(TINY, FASTV, LAY)
    assert f["dense"] == 3 * 12960 + 160 == 39040
    # scoring at layer 1 reads layer 0 (n=9): last_token_attention 2*1*9*(2*4) = 144
    assert f["components"]["pruned"]["scoring"] == 144
    assert f["pruned"] == 12960 + 2 * 9632 + 144 + 160 == 32528
    assert f["ratio"] == pytest.approx(32528 / 39040)
    c = f["components"]["dense"]
    assert (c["q_proj"], c["k_proj"], c["v_proj"], c["o_proj"]) == (3 * 128 * 9, 3 * 64 * 9, 3 * 64 * 9, 3 * 128 * 9)
    assert c["attn_qk"] == c["attn_av"] == 3 * 16 * 81 and c["ffn"] == 3 * 768 * 9 and c["lm_head"] == 160
    assert [row["tokens"] for row in f["per_layer"]] == [9, 7, 7]
    assert sum(row["pruned"] for row in f["per_layer"]) + 160 == f["pruned"]


def test_batch_multiplies_everything():
    f1 = prefill_flops(TINY, FASTV, LAY)
    f2 = prefill_flops(TINY, FASTV, PromptLayout(2, 4, 3, batch=2))
    assert f2["dense"] == 2 * f1["dense"] and f2["pruned"] == 2 * f1["pruned"]
    assert f2["with_vision"]["dense"] == 2 * f1["with_vision"]["dense"]
    assert kv_cache_bytes(TINY, FASTV, PromptLayout(2, 4, 3, batch=2))["dense_bytes"] == 2 * 432


def test_vision_tower_by_hand():
    v = vision_flops(TINY)
    # patch conv 2*4*(3*2*2)*4 = 384; n_v = 5: qkvo 4*2*5*4*4 = 640, attention 2*2*25*4 = 400,
    # MLP 2*2*5*4*8 = 640 -> 1680 per layer, 2 layers run; projector 2*4*4*8 + 2*4*8*8 = 768
    assert (v["patch_embed"], v["encoder"], v["projector"], v["total"]) == (384, 3360, 768, 4512)
    f = prefill_flops(TINY, FASTV, LAY)
    assert f["with_vision"] == {"dense": 39040 + 4512, "pruned": 32528 + 4512, "ratio": pytest.approx(37040 / 43552)}


def test_scoring_rules_by_hand():
    # n=9 tokens at layer K-1, text=3, visual_in=4, H*hd=8
    assert scoring_flops("last_token_attention", TINY.text, 9, 3, 4) == 144
    assert scoring_flops("text_attention", TINY.text, 9, 3, 4) == 2 * 3 * 9 * 8 == 432
    assert scoring_flops("visual_attention", TINY.text, 9, 3, 4) == 2 * 4 * 9 * 8 == 576
    assert scoring_flops("value_contribution", TINY.text, 9, 3, 4) == 144 + 2 * 4 * 8 == 208
    for rule in ("random", "uniform", "drop_all"):
        assert scoring_flops(rule, TINY.text, 9, 3, 4) == 0
    with pytest.raises(ValueError):
        scoring_flops("bogus", TINY.text, 9, 3, 4)
    # HiMAP: text_attention at 1 (from layer 0, n=9, 4 visual), visual_attention at 2 (from layer 1, n=7, 2 visual)
    him = METHODS["himap"].schedule([(1, 2), (2, 1)])
    f = prefill_flops(TINY, him, LAY)
    assert [s["flops"] for s in f["scoring"]] == [432, 2 * 2 * 7 * 8]
    # layers: n = 9, 7, 6 -> 12960 + 9632 + (6912 + 1152) + scoring + lm_head
    assert f["pruned"] == 12960 + 9632 + 8064 + 432 + 224 + 160


def test_decode_step_by_hand():
    d = decode_step_flops(TINY, FASTV, LAY)
    # one token, cache c (+1 for itself): 128+64+64+128+768 = 1152 + 2*2*(c+1)*8 = 1152 + 32(c+1)
    assert d["cache_len_per_layer"] == [9, 7, 7]
    assert d["dense"] == 3 * (1152 + 320) + 160 == 4576
    assert d["pruned"] == (1152 + 320) + 2 * (1152 + 256) + 160 == 4448
    d5 = decode_step_flops(TINY, FASTV, LAY, generated=5)
    assert d5["cache_len_per_layer"] == [14, 12, 12] and d5["dense"] == 3 * (1152 + 32 * 15) + 160


def test_kv_cache_by_hand():
    kv = kv_cache_bytes(TINY, FASTV, LAY, "float16")
    # per token per layer: 2 * KV(1) * hd(4) * 2 bytes = 16
    assert kv["dense_bytes"] == 3 * 9 * 16 == 432 and kv["pruned_bytes"] == (9 + 7 + 7) * 16 == 368
    assert kv_cache_bytes(TINY, FASTV, LAY, "fp32")["dense_bytes"] == 864
    assert kv_cache_bytes(TINY, None, LAY)["ratio"] == 1.0
    with pytest.raises(ValueError):
        kv_cache_bytes(TINY, FASTV, LAY, "float64")


def test_paper_convention_by_hand():
    # f(n) = 4n*64 + 2n^2*8 + 2n*8*16 = 512n + 16n^2 with n = visual tokens only
    p = paper_flops(TINY, FASTV)
    assert p["dense"] == 3 * (512 * 4 + 16 * 16) == 6912
    assert p["pruned"] == 2304 + 2 * (1024 + 64) == 4480
    assert p["ratio"] == pytest.approx(4480 / 6912)


def test_dense_schedule_is_ratio_one():
    f = prefill_flops(TINY, Schedule("none"), LAY)
    assert f["dense"] == f["pruned"] and f["ratio"] == 1.0 and paper_flops(TINY, None)["ratio"] == 1.0


# ----------------------------------------------------------------------------- the papers' numbers
def _baseline(name):
    r = load_recipe(ROOT / "recipes" / "baselines" / name)
    arch = r.resolve_arch()
    return arch, r.schedule(arch), r.layout(arch)


def test_fastv_k3_r50_paper_ratio():
    arch, sched, lay = _baseline("llava7b_fastv_k3_r50.yaml")
    r = paper_flops(arch, sched)["ratio"]
    assert 0.54 <= r <= 0.60
    assert r == pytest.approx(0.540276, abs=1e-6)


def test_himap_qa_paper_ratio():
    arch, sched, lay = _baseline("llava7b_himap_qa.yaml")
    r = paper_flops(arch, sched)["ratio"]
    assert 0.24 <= r <= 0.29
    assert r == pytest.approx(0.246245, abs=1e-6)
    # the published default in METHODS is the same schedule
    assert METHODS["himap"].default(32, 576, "vqa").points == sched.points


def test_llava7b_exact_magnitudes():
    arch, sched, lay = _baseline("llava7b_himap_qa.yaml")
    f = prefill_flops(arch, sched, lay)
    # dense prefill of a 651-token prompt on a ~6.5B-parameter decoder: about 2 * params * tokens
    assert 8.0e12 < f["dense"] < 9.5e12
    assert f["pruned"] < f["dense"] and 0.25 < f["ratio"] < 0.40
    assert f["with_vision"]["ratio"] > f["ratio"]  # the unpruned vision tower dilutes the saving
    assert BUILTIN_ARCHS["llava-1.5-7b"].spec().text.kv_heads == 32


def test_published_dense_figure_by_its_convention():
    """VisiPruner's 3.82 T for LLaVA-1.5-7B is the decoder's multiply-accumulates over the 576 visual
    tokens (q/k/v/o + three SwiGLU matrices per token, QK^T and AV over them), by hand."""
    from vpexport.accounting.flops import published_macs
    from vpexport.families import BUILTIN_ARCHS

    arch = BUILTIN_ARCHS["llava-1.5-7b"].spec()
    d, m, n, L = 4096, 11008, 576, 32
    by_hand = L * (n * (4 * d * d + 3 * d * m) + 2 * n * n * d)
    pm = published_macs(arch, None)
    assert pm["dense"] == by_hand and pm["ratio"] == 1.0
    assert abs(pm["dense"] / pm["published"]["dense"] - 1) < 0.001  # 3.817 T against the paper's 3.82 T
    big = published_macs(BUILTIN_ARCHS["llava-1.5-13b"].spec(), None)
    assert "published" not in big and big["dense"] == 40 * (n * (4 * 5120**2 + 3 * 5120 * 13824) + 2 * n * n * 5120)


def test_plan_shows_the_published_figure(tmp_path):
    import json

    from tests.artifact_helpers import cli

    r = cli("plan", "recipes/baselines/llava7b_himap_qa.yaml", "--json")
    assert r.returncode == 0, r.stderr
    pm = json.loads(r.stdout)["published_macs"]
    assert pm["published"]["dense"] == 3.82e12 and 0.24 < pm["ratio"] < 0.26
    text = cli("plan", "recipes/baselines/llava7b_himap_qa.yaml").stdout
    assert "MACs, visual tokens only" in text and "published dense: VisiPruner (LLaVA-1.5-7B)" in text
    r13 = cli("plan", "recipes/baselines/llava13b_himap_qa.yaml", "--json")
    assert r13.returncode == 0 and "published" not in json.loads(r13.stdout)["published_macs"]

"""The testbed trainer: its supervision targets point at the right tokens, and a short run
(both stages, then a continued phase) saves a checkpoint that loads like any LLaVA."""

import json
from pathlib import Path

import numpy as np
import pytest

from vpexport.testbed import data as D

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "vpexport" / "testbed" / "checkpoints" / "mini-llava"


@pytest.fixture(scope="module")
def enc():
    from transformers import AutoTokenizer

    from vpexport.testbed.train import Encoder

    return Encoder(AutoTokenizer.from_pretrained(CKPT))


def _examples(kind, n=12, seed=0):
    bank = D.load_digit_bank()
    pool = D.split_indices(len(bank[0]))["train"]
    rng = np.random.RandomState(seed)
    out = []
    while len(out) < n:
        e = D.sample(rng, *bank, pool, "vqa", vqa_weights=tuple(float(k == kind) for k in D.VQA_KINDS))
        if e["kind"] == kind:
            out.append(e)
    return out


def test_vqa_mix_picks_kinds():
    assert {e["kind"] for e in _examples("exists", 8)} == {"exists"}


def test_exists_targets(enc):
    for e in _examples("exists"):
        ids, labels, img0, ev, match = enc.example(e)
        digit = enc.ids(e["question"].split()[3])[0]
        n_prompt = sum(1 for x in labels if x == -100)
        (q_pos, y1), (last, y2) = match
        assert ids[q_pos] == digit and last == n_prompt - 1
        assert y1 == y2 == int(e["answer"] == "yes")
        # a present digit is also looked up from the question's digit token
        assert (q_pos in {p for p, _ in ev}) == (e["answer"] == "yes")
        for _, patches in ev:
            assert all(e["scene"].patch_labels()[p] == int(e["question"].split()[3]) for p in patches)


def test_where_targets(enc):
    for e in _examples("where"):
        ids, labels, img0, ev, match = enc.example(e)
        assert match == []
        d = int(e["question"].split()[3])
        (patch,) = e["evidence"]
        assert e["scene"].patch_labels()[patch] == d
        row, col = divmod(patch, D.NPATCH)
        assert D.cell_name((row // D.SLOTS) * D.GRID + col // D.SLOTS) == e["answer"]


def test_salience_rows_are_the_text_after_the_image(enc):
    from vpexport.testbed.train import NVIS, make_batch

    exs = _examples("cell", 3) + _examples("exists", 2)
    b = make_batch(enc, exs)
    for i, e in enumerate(exs):
        rows = b["s_t"][b["s_b"] == i].tolist()
        n = len(enc.example(e)[0])
        assert rows == list(range(b["img0"] + NVIS, n - 1))
        assert 2 <= int((b["patch_lab"][i] < 10).sum()) <= 5  # the digit patches the rows look at


def test_background_drop_keeps_every_digit(enc):
    from vpexport.testbed.train import NVIS, background_drop_mask, make_batch

    b = make_batch(enc, _examples("cell", 6) + _examples("where", 6))
    assert (background_drop_mask(np.random.RandomState(0), b, 0.0) == b["attention_mask"]).all()
    mask = background_drop_mask(np.random.RandomState(0), b, 1.0)
    vis = mask[:, b["img0"]: b["img0"] + NVIS]
    digit = b["patch_lab"] < 10
    assert (vis[digit] == 1).all()  # every digit patch stays visible
    hidden = ((vis == 0) & ~digit).sum(1) / (~digit).sum(1)
    assert ((hidden > 0.45) & (hidden < 0.96)).all()  # 50-95% of the blank ones are hidden
    outside = mask.clone()
    outside[:, b["img0"]: b["img0"] + NVIS] = b["attention_mask"][:, b["img0"]: b["img0"] + NVIS]
    assert (outside == b["attention_mask"]).all()  # text and padding untouched


def test_bad_vqa_mix_is_one_line_error(tmp_path, capsys):
    from vpexport.cli import main

    with pytest.raises(SystemExit) as e:
        main(["testbed", "train", "--out", str(tmp_path / "never"), "--vqa-mix", "cell=1,wher=1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--vqa-mix" in err and "'wher'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_short_training_run_loads(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vpexport.testbed.train import train

    first = train(tmp_path / "a", steps=2, vision_steps=1, batch=4, threads=1, log_every=1)
    second = train(tmp_path / "b", steps=1, vision_steps=0, batch=4, threads=1, init_from=first,
                   vqa_weights=(0.0, 0.5, 0.5, 0.0), salience_layer=0, drop_background=0.5)
    meta = json.loads((second / "vpexport_testbed.json").read_text())["training"]
    assert meta["steps_done"] == 1 and meta["init_training"]["steps_done"] == 2
    assert meta["vqa_weights"] == {"cell": 0.0, "where": 0.5, "exists": 0.5, "count": 0.0}
    assert meta["salience_layer"] == 0 and meta["salience_head"] == 1
    LlavaForConditionalGeneration.from_pretrained(second)

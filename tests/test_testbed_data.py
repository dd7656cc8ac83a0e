import json
from pathlib import Path

import numpy as np
import pytest

from vpexport.testbed import data as D

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"


@pytest.fixture(scope="module")
def bank():
    return D.load_digit_bank()


def _patch(img, p):
    py, px = divmod(p, D.NPATCH)
    return img[py * D.PATCH:(py + 1) * D.PATCH, px * D.PATCH:(px + 1) * D.PATCH].astype(float)


def test_scene_contains_claimed_digits(bank):
    imgs, labels = bank
    pool = D.split_indices(len(imgs))["train"]
    rng = np.random.RandomState(3)
    for _ in range(20):
        s = D.make_scene(rng, imgs, labels, pool)
        assert 2 <= len(s.digits) <= 5
        for (c, d), src in zip(sorted(s.digits.items()), s.sources):
            assert labels[src] == d and src in set(pool.tolist())
            p = s.patch_of[c]
            # the digit's patch lies inside its cell, and holds the source sample (scaled by 0.7..1)
            py, px = divmod(p, D.NPATCH)
            assert (py // D.SLOTS) * D.GRID + px // D.SLOTS == c
            patch, ref = _patch(s.image, p), imgs[src].astype(float)
            assert np.corrcoef(patch.ravel(), ref.ravel())[0, 1] > 0.99
        cap = D.caption_answer(s).split()
        assert [int(t) for t in cap[2::3]] == [s.digits[c] for c in sorted(s.digits)]


def test_vqa_answers_consistent(bank):
    imgs, labels = bank
    pool = D.split_indices(len(imgs))["train"]
    rng = np.random.RandomState(5)
    for _ in range(200):
        ex = D.sample(rng, imgs, labels, pool, "vqa")
        s, q, a = ex["scene"], ex["question"], ex["answer"]
        vals = list(s.digits.values())
        if ex["kind"] == "cell":
            cell = [c for c in range(9) if D.cell_name(c) in q][0]
            assert a == (str(s.digits[cell]) if cell in s.digits else "none")
        elif ex["kind"] == "where":
            d = int(q.split()[3])
            assert vals.count(d) == 1 and D.cell_name([c for c, v in s.digits.items() if v == d][0]) == a
        elif ex["kind"] == "exists":
            d = int(q.split()[3])
            assert a == ("yes" if d in vals else "no")
        else:
            assert a == str(len(vals))


def test_generator_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    D.generate(a, seed=7, n_train=3, n_calib=4, n_eval=4)
    D.generate(b, seed=7, n_train=3, n_calib=4, n_eval=4)
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = tmp_path / "c"
    D.generate(c, seed=8, n_calib=4, n_eval=0)
    assert (a / "vqa" / "calib.jsonl").read_text() != (c / "vqa" / "calib.jsonl").read_text()


def test_splits_disjoint_by_source():
    idx = D.split_indices(1797)
    sets = {k: set(v.tolist()) for k, v in idx.items()}
    assert not sets["train"] & sets["calib"] and not sets["train"] & sets["eval"] and not sets["calib"] & sets["eval"]
    assert sum(len(s) for s in sets.values()) == 1797


def test_shipped_data_matches_splits():
    from PIL import Image

    from vpexport.testbed.metrics import load_split

    idx = {k: set(v.tolist()) for k, v in D.split_indices(1797).items()}
    imgs, _ = D.load_digit_bank()
    for task in D.TASKS:
        for split in ("calib", "eval"):
            recs = load_split(MINI / task / f"{split}.jsonl")
            assert len(recs) == {"calib": 600, "eval": 300}[split]
            for r in recs:
                assert set(r["sources"]) <= idx[split]
            r = recs[0]
            img = np.asarray(Image.open(r["image"]))
            assert img.shape == (D.IMAGE_SIZE, D.IMAGE_SIZE)
    total = sum(p.stat().st_size for p in MINI.rglob("*") if p.is_file())
    assert total < 5_000_000


def test_shipped_data_is_the_generator_default(tmp_path):
    """docs/testbed.md: `vpexport testbed data --out data/mini --seed 0` rewrites the shipped files
    bit-identically (so a recipe's calib/eval split is the generator's, and its defaults match them)."""
    from click.testing import CliRunner

    from vpexport.testbed.cli import testbed

    r = CliRunner().invoke(testbed, ["data", "--out", str(tmp_path), "--seed", "0"])
    assert r.exit_code == 0, r.output
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(MINI) for p in MINI.rglob("*") if p.is_file())
    assert made == shipped
    for f in made:
        assert (tmp_path / f).read_bytes() == (MINI / f).read_bytes(), f

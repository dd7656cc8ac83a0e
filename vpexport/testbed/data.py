"""Task images composed from scikit-learn's real handwritten digits (`load_digits`).

Canvas: 96x96 grayscale, a 3x3 grid of 32x32 cells. An occupied cell holds one 8x8 digit
sample placed on the 8-pixel patch grid at a random one of its 4x4 patch slots, so with the
testbed's CLIP tower (patch 8) every digit lives in exactly one of the 144 visual tokens.
Empty patches may hold distractor specks. Digits are drawn only from the split's own source
samples, so train / calib / eval are disjoint by source sample.

Tasks (answers end with eos when trained):
  vqa:     "what digit is at the top left ?" -> "7" | "none"
           "where is the 7 ?"               -> "top left"   (7 occurs exactly once)
           "is there a 7 ?"                 -> "yes" | "no"
           "how many digits are there ?"    -> "4"
  caption: "list the digits in reading order ." -> "top left 7 top right 2 middle center 0"
           (every digit in reading order, each after its cell name)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SIZE = 96
PATCH = 8
GRID = 3  # 3x3 cells
CELL = IMAGE_SIZE // GRID  # 32 px
SLOTS = CELL // PATCH  # 4x4 patch slots per cell
NPATCH = IMAGE_SIZE // PATCH  # 12 -> 144 patches
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CAPTION_QUESTION = "list the digits in reading order ."
SPLIT_SIZES = {"calib": 300, "eval": 300}  # source samples per held-out split; the rest is train
TASKS = ("vqa", "caption")
VQA_KINDS = ("cell", "where", "exists", "count")
VQA_WEIGHTS = (0.4, 0.2, 0.2, 0.2)


def cell_name(cell: int) -> str:
    return f"{ROWS[cell // GRID]} {COLS[cell % GRID]}"


def load_digit_bank():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    return imgs, d.target.astype(np.int64)


def split_indices(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint source-sample indices per split (fixed by `seed`)."""
    perm = np.random.RandomState(seed).permutation(n)
    a = SPLIT_SIZES["calib"]
    b = a + SPLIT_SIZES["eval"]
    return {"calib": np.sort(perm[:a]), "eval": np.sort(perm[a:b]), "train": np.sort(perm[b:])}


@dataclass
class Scene:
    image: np.ndarray  # (96, 96) uint8
    digits: dict[int, int]  # cell -> digit
    patch_of: dict[int, int]  # cell -> patch index (row-major over the 12x12 patch grid)
    sources: list[int] = field(default_factory=list)  # source sample indices used

    def patch_labels(self) -> np.ndarray:
        """Per-patch digit label (0-9) or 10 for no digit."""
        lab = np.full(NPATCH * NPATCH, 10, dtype=np.int64)
        for c, p in self.patch_of.items():
            lab[p] = self.digits[c]
        return lab


def make_scene(rng: np.random.RandomState, imgs, labels, pool: np.ndarray) -> Scene:
    k = rng.randint(2, 6)  # 2..5 digits
    cells = np.sort(rng.choice(GRID * GRID, size=k, replace=False))
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    digits, patch_of, sources = {}, {}, []
    used = set()
    for c in cells:
        src = int(pool[rng.randint(len(pool))])
        sy, sx = rng.randint(SLOTS), rng.randint(SLOTS)
        py, px = (c // GRID) * SLOTS + sy, (c % GRID) * SLOTS + sx
        canvas[py * PATCH:(py + 1) * PATCH, px * PATCH:(px + 1) * PATCH] = imgs[src] * rng.uniform(0.7, 1.0)
        digits[int(c)] = int(labels[src])
        patch_of[int(c)] = py * NPATCH + px
        sources.append(src)
        used.add(py * NPATCH + px)
    # distractors: sparse specks and short strokes in empty patches
    free = [p for p in range(NPATCH * NPATCH) if p not in used]
    for p in rng.choice(free, size=rng.randint(2, 9), replace=False):
        py, px = divmod(int(p), NPATCH)
        n = rng.randint(1, 4)
        ys = rng.randint(0, PATCH, size=n) + py * PATCH
        xs = rng.randint(0, PATCH, size=n) + px * PATCH
        canvas[ys, xs] = rng.uniform(80, 255, size=n)
        if rng.rand() < 0.4:  # a short horizontal or vertical stroke
            y0, x0 = py * PATCH + rng.randint(PATCH), px * PATCH + rng.randint(PATCH - 3)
            if rng.rand() < 0.5:
                canvas[y0, x0:x0 + 3] = rng.uniform(80, 255)
            else:
                y0 = py * PATCH + rng.randint(PATCH - 3)
                canvas[y0:y0 + 3, x0] = rng.uniform(80, 255)
    return Scene(canvas.clip(0, 255).astype(np.uint8), digits, patch_of, sources)


def caption_answer(s: Scene) -> str:
    return " ".join(f"{cell_name(c)} {s.digits[c]}" for c in sorted(s.digits))


def make_vqa(rng: np.random.RandomState, s: Scene, weights=VQA_WEIGHTS) -> tuple[str, str, str, list[int]]:
    """Returns (kind, question, answer, evidence patch indices); `weights` follow VQA_KINDS."""
    kind = VQA_KINDS[rng.choice(len(VQA_KINDS), p=weights)]
    vals = list(s.digits.values())
    once = [d for d in range(10) if vals.count(d) == 1]
    if kind == "where" and not once:
        kind = "cell"
    if kind == "cell":
        occupied = rng.rand() < 0.75
        cells = sorted(s.digits) if occupied else [c for c in range(GRID * GRID) if c not in s.digits]
        c = int(cells[rng.randint(len(cells))])
        ans = str(s.digits[c]) if c in s.digits else "none"
        return kind, f"what digit is at the {cell_name(c)} ?", ans, [s.patch_of[c]] if c in s.digits else []
    if kind == "where":
        d = once[rng.randint(len(once))]
        c = [c for c, v in s.digits.items() if v == d][0]
        return kind, f"where is the {d} ?", cell_name(c), [s.patch_of[c]]
    if kind == "exists":
        if rng.rand() < 0.5:
            d = vals[rng.randint(len(vals))]
        else:
            absent = [d for d in range(10) if d not in vals]
            d = absent[rng.randint(len(absent))]
        ev = [s.patch_of[c] for c, v in s.digits.items() if v == d]
        return kind, f"is there a {d} ?", "yes" if ev else "no", ev
    return "count", "how many digits are there ?", str(len(s.digits)), []


def sample(rng, imgs, labels, pool, task: str, vqa_weights=VQA_WEIGHTS):
    """One example: dict with scene, question, answer, kind, evidence."""
    s = make_scene(rng, imgs, labels, pool)
    if task == "caption":
        return {"scene": s, "kind": "caption", "question": CAPTION_QUESTION, "answer": caption_answer(s)}
    kind, q, a, ev = make_vqa(rng, s, vqa_weights)
    return {"scene": s, "kind": kind, "question": q, "answer": a, "evidence": ev}


def write_split(out: Path, split: str, n_images: int, seed: int, imgs, labels, pool) -> dict:
    """Write n_images PNGs under out/images/<split>/ and one JSONL per task (one record per image)."""
    from PIL import Image

    rng = np.random.RandomState([seed, {"train": 1, "calib": 2, "eval": 3}[split]])
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    recs = {t: [] for t in TASKS}
    for i in range(n_images):
        s = make_scene(rng, imgs, labels, pool)
        name = f"{split}_{i:05d}.png"
        Image.fromarray(s.image, mode="L").save(img_dir / name, optimize=True)
        kind, q, a, _ = make_vqa(rng, s)
        meta = {"digits": {str(c): d for c, d in s.digits.items()}, "sources": s.sources}
        recs["vqa"].append({"image": f"../images/{split}/{name}", "question": q, "answer": a, "kind": kind, **meta})
        recs["caption"].append(
            {"image": f"../images/{split}/{name}", "question": CAPTION_QUESTION, "answer": caption_answer(s),
             "kind": "caption", **meta}
        )
    for t in TASKS:
        (out / t).mkdir(parents=True, exist_ok=True)
        with open(out / t / f"{split}.jsonl", "w") as f:
            for r in recs[t]:
                f.write(json.dumps(r) + "\n")
    return {t: len(recs[t]) for t in TASKS}


def generate(out: str | Path, seed: int = 0, n_train: int = 0, n_calib: int = 600, n_eval: int = 300) -> dict:
    """Deterministically (re)generate data/mini-style splits under `out`."""
    out = Path(out)
    imgs, labels = load_digit_bank()
    idx = split_indices(len(imgs), seed=0)  # the source-sample split is fixed, whatever the seed
    summary = {}
    for split, n in (("train", n_train), ("calib", n_calib), ("eval", n_eval)):
        if n > 0:
            summary[split] = write_split(out, split, n, seed, imgs, labels, idx[split])
    with open(out / "splits.json", "w") as f:
        json.dump({k: v.tolist() for k, v in idx.items()} | {"seed": seed, "source": "sklearn.datasets.load_digits"},
                  f)
    return summary

"""Task metrics and the evaluation loop shared by `eval`, `calibrate` and `validate`.

vqa: exact match after normalisation. caption: token F1 (main metric) and exact match.
"""

from __future__ import annotations

import re
from collections import Counter

MAIN_METRIC = {"vqa": "exact_match", "caption": "token_f1"}


def normalize(text: str) -> str:
    """Lower-case; drop special tokens (</s>, <pad>, <unk>) and punctuation; collapse whitespace."""
    text = re.sub(r"</?s>|<pad>|<unk>", " ", text or "")
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def score(task: str, preds: list[str], refs: list[str]) -> dict:
    em = sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(refs)
    out = {"exact_match": em, "samples": len(refs)}
    if task == "caption":
        out["token_f1"] = sum(token_f1(p, r) for p, r in zip(preds, refs)) / len(refs)
    out["accuracy"] = out[MAIN_METRIC[task]]
    return out


def evaluate(answer_fn, samples, task: str, batch_size: int = 16, progress: str | None = None) -> dict:
    """`answer_fn(images, questions) -> list[str]`; returns metrics plus per-sample predictions."""
    from vpexport.progress import progress as bar_for

    preds: list[str] = []
    bar = bar_for(total=len(samples), desc=progress or "", unit="sample", enabled=progress is not None)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = [s.load_image("task.data") for s in chunk]
        preds.extend(answer_fn(images, [s.question for s in chunk]))
        bar.update(len(chunk))
    bar.close()
    out = score(task, preds, [s.answer for s in samples])
    out["predictions"] = preds
    return out

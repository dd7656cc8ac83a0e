"""Answer metrics and sample-data loading (no torch import; reused by `vpexport eval`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from vpexport.errors import UserInputError


def normalize(text: str) -> str:
    """Lower-case, drop special tokens like </s>, collapse whitespace, strip trailing punctuation."""
    text = re.sub(r"</?s>|<pad>|<unk>", " ", text or "")
    text = " ".join(text.lower().split())
    return text.strip(" .,;:!?")


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 over whitespace tokens."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def load_split(jsonl_path: str | Path) -> list[dict]:
    """Read {"image", "question", "answer"} records; `image` becomes an absolute path resolved
    relative to the JSONL file. Raises UserInputError on a missing file, bad JSON or missing keys."""
    path = Path(jsonl_path)
    if not path.is_file():
        raise UserInputError(f"sample data file not found: {path}", field="data", fix="give a .jsonl file path")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{n}: not valid JSON ({e.msg})", field="data") from None
            missing = [k for k in ("image", "question", "answer") if k not in rec]
            if missing:
                raise UserInputError(f"{path}:{n}: missing key(s) {', '.join(missing)}", field="data",
                                     fix='each line needs {"image": ..., "question": ..., "answer": ...}')
            img = Path(rec["image"])
            rec["image"] = str(img if img.is_absolute() else (path.parent / img).resolve())
            out.append(rec)
    return out

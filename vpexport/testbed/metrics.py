"""Answer metrics and sample-data loading (no torch import; reused by `vpexport eval`)."""

from __future__ import annotations

import json
from pathlib import Path

from vpexport.errors import UserInputError
from vpexport.evaluation import exact_match, normalize, token_f1  # noqa: F401  (one definition, re-exported)


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

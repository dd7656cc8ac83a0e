"""Task sample data: JSONL lines of {"image": path, "question": str, "answer": str}.

Image paths are relative to the JSONL file unless absolute. The same format serves the
testbed splits and a user's own calibration / evaluation data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import UserInputError


@dataclass(frozen=True)
class Sample:
    image: Path
    question: str
    answer: str
    source: str = ""  # "FILE:LINE" of the JSONL line it came from

    def load_image(self, field: str = "task.data"):
        """The sample's RGB image; an unreadable one is a one-line error naming the JSONL file and line."""
        from vpexport.runtime.preprocess import load_image

        try:
            return load_image(self.image, field=field)
        except UserInputError as e:
            if not self.source:
                raise
            raise UserInputError(f"{self.source}: {e}", field=e.field, fix="fix or replace the image on that line") from None

def load_samples(path: str | Path, limit: int | None = None, field: str = "task.data") -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"sample data {path} does not exist", field=field, fix="point it at a JSONL file")
    samples = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read {path}: {e}", field=field, fix="give a UTF-8 JSONL file") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            img = Path(row["image"])
            s = Sample(img if img.is_absolute() else path.parent / img, str(row["question"]), str(row["answer"]),
                       f"{path}:{no}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserInputError(
                f"{path}:{no} is not a JSON object with image/question/answer ({type(e).__name__}: {e})",
                field=field,
                fix='write one {"image": ..., "question": ..., "answer": ...} object per line',
            ) from None
        if not s.image.is_file():
            raise UserInputError(f"{path}:{no}: image {s.image} does not exist", field=field, fix="fix the image path")
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise UserInputError(f"{path} holds no samples", field=field, fix="add at least one JSONL line")
    return samples

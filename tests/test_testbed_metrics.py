import json

import pytest

from vpexport.errors import UserInputError
from vpexport.testbed.metrics import exact_match, load_split, token_f1


def test_exact_match():
    assert exact_match("7", "7") == 1.0
    assert exact_match(" Top Left </s>", "top left") == 1.0
    assert exact_match("top", "top left") == 0.0


def test_token_f1():
    assert token_f1("top left 4", "top left 4") == 1.0
    assert token_f1("", "a") == 0.0
    assert token_f1("top left 4 top right", "top left 4") == pytest.approx(2 * 0.6 * 1.0 / 1.6)
    assert token_f1("9", "4") == 0.0


def test_load_split(tmp_path):
    (tmp_path / "im").mkdir()
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"image": "im/a.png", "question": "q", "answer": "a"}) + "\n\n")
    recs = load_split(p)
    assert recs[0]["image"] == str((tmp_path / "im" / "a.png").resolve())
    p.write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(UserInputError):
        load_split(p)
    with pytest.raises(UserInputError):
        load_split(tmp_path / "missing.jsonl")

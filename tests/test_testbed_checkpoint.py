"""The shipped mini LLaVA loads like any LLaVA checkpoint and answers from the image."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "vpexport" / "testbed" / "checkpoints" / "mini-llava"
MINI = ROOT / "data" / "mini"


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(CKPT).eval()
    proc = AutoProcessor.from_pretrained(CKPT)
    meta = json.loads((CKPT / "vpexport_testbed.json").read_text())
    return model, proc, meta


def test_size_and_template(loaded):
    model, proc, meta = loaded
    size = sum(p.stat().st_size for p in CKPT.iterdir() if p.is_file())
    assert size <= 30 * 2**20
    tpl = meta["prompt_template"]
    assert tpl.count("<image>") == 1 and "{question}" in tpl and tpl.index("SYSTEM") < tpl.index("<image>")
    assert model.config.text_config.num_hidden_layers >= 8


def test_processor_expands_image_token(loaded):
    from PIL import Image

    from vpexport.testbed.model import visual_token_count

    model, proc, meta = loaded
    n = visual_token_count(model.config)
    assert n >= 144
    enc = proc(images=Image.new("L", (96, 96)), text=meta["prompt_template"].format(question="how many digits are there ?"),
               return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == n
    from vpexport.model.loading import image_features

    with pytest.importorskip("torch").no_grad():
        t = image_features(model, enc["pixel_values"])
    assert tuple(t.shape) == (n, model.config.text_config.hidden_size)


def test_answers_eval_samples(loaded):
    from vpexport.testbed.evaluate import generate_answers
    from vpexport.testbed.metrics import exact_match, load_split, token_f1

    model, proc, meta = loaded
    vqa = load_split(MINI / "vqa" / "eval.jsonl")[:12]
    preds = generate_answers(model, proc, vqa, meta["prompt_template"])
    assert sum(exact_match(p, r["answer"]) for p, r in zip(preds, vqa)) >= 9
    cap = load_split(MINI / "caption" / "eval.jsonl")[:6]
    preds = generate_answers(model, proc, cap, meta["prompt_template"])
    assert sum(token_f1(p, r["answer"]) for p, r in zip(preds, cap)) / len(cap) >= 0.7


def test_random_drop_reference_path(loaded):
    """keep=1.0 through the manual layer loop reproduces plain HF generation."""
    from vpexport.testbed.evaluate import generate_answers, random_drop_answers
    from vpexport.testbed.metrics import load_split

    model, proc, meta = loaded
    recs = load_split(MINI / "vqa" / "eval.jsonl")[:6]
    tpl = meta["prompt_template"]
    assert random_drop_answers(model, proc, recs, tpl, keep=1.0) == generate_answers(model, proc, recs, tpl)

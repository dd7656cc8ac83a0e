"""Load a LLaVA checkpoint from a local `save_pretrained` directory and turn prompts + images
into the model's static layout (right-padded text, image span at a fixed offset)."""

from __future__ import annotations

from pathlib import Path

from vpexport.arch.layout import IMAGE_PLACEHOLDER
from vpexport.errors import UserInputError

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def load_llava(path: str | Path, dtype: str = "float32"):
    """(model, processor); the model in eval mode with SDPA attention (never flash/flex: see research.md)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} has no config.json", field="model.path", fix="give a save_pretrained directory")
    _quiet_bars_in_logs()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=getattr(torch, DTYPES[dtype]), attn_implementation="sdpa"
        ).eval()
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"cannot load a LLaVA checkpoint from {path}: {str(e).splitlines()[0]}",
            field="model.path",
            fix="give a LlavaForConditionalGeneration save_pretrained directory with its processor files",
        ) from None
    processor.tokenizer.padding_side = "right"
    return model, processor


def _quiet_bars_in_logs() -> None:
    """transformers' weight-loading bar redraws with carriage returns; in a log file (stderr not a
    terminal) it is one long line, so it is turned off there (vpexport.progress prints plain lines)."""
    import sys

    from vpexport.progress import is_terminal

    if not is_terminal(sys.stderr):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def render_prompt(template: str, question: str) -> str:
    if IMAGE_PLACEHOLDER in question:
        raise UserInputError(
            f"the question must not contain {IMAGE_PLACEHOLDER}; the recipe's template places the image",
            field="--prompt",
            fix="pass only the question text",
        )
    return template.replace("{question}", question)


def encode(processor, template: str, questions: list[str], images: list, pad_to: int | None = None,
           check_words: bool = True):
    """input_ids / attention_mask (right-padded) and pixel_values, as torch tensors. `check_words`:
    warn (once) about question words the tokenizer does not know; off for internal probes."""
    prompts = [render_prompt(template, q) for q in questions]
    if check_words:
        _check_known(processor.tokenizer, questions)
    kw = {"padding": "max_length", "max_length": pad_to, "truncation": False} if pad_to else {"padding": True}
    enc = processor(text=prompts, images=images, return_tensors="pt", **kw)
    return enc["input_ids"], enc["attention_mask"], enc["pixel_values"]


def _check_known(tokenizer, questions: list[str]) -> None:
    """Warn once when a question has words the tokenizer reads as its unknown token."""
    from vpexport.runtime.unknown_words import unknown_words, warn_unknown

    if tokenizer.unk_token_id is None or not getattr(tokenizer, "is_fast", False):
        return  # offsets (to name the words) come only from fast tokenizers
    words = []
    for q in questions:
        enc = tokenizer(q, add_special_tokens=False, return_offsets_mapping=True)
        words += unknown_words(q, enc["input_ids"], enc["offset_mapping"], tokenizer.unk_token_id)
    warn_unknown(words, tokenizer.unk_token or "<unk>")


def prefix_length(input_ids, image_token_id: int) -> int:
    row = input_ids[0].tolist()
    if image_token_id not in row:
        raise UserInputError(
            "the prompt has no image token after tokenization",
            field="task.prompt",
            fix=f"put {IMAGE_PLACEHOLDER} in the template and use the checkpoint's own processor",
        )
    return row.index(image_token_id)


def image_features(model, pixel_values):
    """Projected visual tokens, (total tokens, text hidden), whatever transformers returns."""
    import torch

    cfg = model.config
    feats = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    if not torch.is_tensor(feats) and hasattr(feats, "pooler_output"):
        feats = feats.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)
    return feats.reshape(-1, feats.shape[-1])


def image_embeds(model, input_ids, pixel_values):
    """Text embeddings with the image tokens replaced by the projected visual tokens (as HF merges them)."""
    cfg = model.config
    emb = model.get_input_embeddings()(input_ids.clamp(max=cfg.text_config.vocab_size - 1))
    feats = image_features(model, pixel_values).to(emb.dtype)
    mask = (input_ids == cfg.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(mask, feats)

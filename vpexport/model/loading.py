"""Load a checkpoint of any registered family from a local `save_pretrained` directory and turn prompts + images
into the model's static layout (right-padded text, image span at a fixed offset)."""

from __future__ import annotations

from pathlib import Path

from vpexport.arch.layout import IMAGE_PLACEHOLDER
from vpexport.errors import UserInputError

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def load_model(path: str | Path, dtype: str = "float32", image_size=None, device=None, log=None):
    """(model, processor) from a local save_pretrained folder, by the family its config.json names
    (vpexport/families); the model in eval mode with SDPA attention (never flash/flex: see
    research.md). `image_size` (H, W): the static size of a dynamic-resolution family. `device`: a
    resolved `vpexport.model.device.Device` to move the model to (default: the CPU); `log` gets
    one line naming it."""
    from vpexport.families import load_checkpoint
    from vpexport.model.device import prepare

    _, model, processor = load_checkpoint(path, DTYPES[dtype], image_size)
    if device is not None:
        prepare(device, DTYPES[dtype])
        model = model.to(device.torch)
        if log is not None:
            log(f"[torch] {Path(path).name} in {dtype} on {device.describe()}")
    return model, processor


def model_device(model):
    """The torch.device a loaded model's weights are on."""
    return next(model.parameters()).device


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
    """Projected visual tokens, (total tokens, text hidden), as Hugging Face computes them."""
    from vpexport.families import family_for_model

    return family_for_model(model).hf_image_features(model, pixel_values)


def image_embeds(model, input_ids, pixel_values):
    """Text embeddings with the image tokens replaced by the projected visual tokens (as HF merges them)."""
    cfg = model.config
    emb = model.get_input_embeddings()(input_ids.clamp(max=cfg.text_config.vocab_size - 1))
    feats = image_features(model, pixel_values).to(emb.dtype)
    mask = (input_ids == cfg.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(mask, feats)

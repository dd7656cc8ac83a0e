"""Prompt layout: [prefix (system + user tag)][visual tokens][text (instruction + answer prefix)].

The spans are measured by tokenizing the recipe's prompt, never assumed. Static shapes
downstream use `prefix` and `visual` as constants and treat `text` as the padded/dynamic part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vpexport.errors import RecipeError

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptLayout:
    prefix: int
    visual: int
    text: int
    batch: int = 1

    @property
    def total(self) -> int:
        return self.prefix + self.visual + self.text

    def to_dict(self) -> dict:
        return asdict(self)


def check_template(template: str, field: str = "task.prompt") -> None:
    n = template.count(IMAGE_PLACEHOLDER)
    if n != 1:
        raise RecipeError(
            f"the prompt must contain the image placeholder {IMAGE_PLACEHOLDER} exactly once (found {n})",
            field=field,
            fix=f"write e.g. 'USER: {IMAGE_PLACEHOLDER}\\n{{question}} ASSISTANT:'",
        )
    if "{question}" not in template:
        raise RecipeError(
            "the prompt has no {question} slot", field=field, fix="put {question} where the question goes"
        )


def layout_from_tokenizer_file(
    tokenizer_json: str | Path, template: str, question: str, image_token_id: int, visual: int,
    image_text: str = IMAGE_PLACEHOLDER,
) -> PromptLayout:
    """Count prefix/text tokens with the `tokenizers` library only (no transformers, no torch).
    `image_text`: what the family's processor writes for the placeholder before expanding its one
    image token (the family's `image_text`)."""
    from tokenizers import Tokenizer

    check_template(template)
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(template.replace("{question}", question).replace(IMAGE_PLACEHOLDER, image_text)).ids
    if image_token_id not in ids:
        raise RecipeError(
            f"the tokenizer does not turn {IMAGE_PLACEHOLDER} into the image token id {image_token_id}",
            field="model.path",
            fix="use the checkpoint's own tokenizer, with <image> registered as a special token",
        )
    i = ids.index(image_token_id)
    return PromptLayout(prefix=i, visual=visual, text=len(ids) - i - 1)

"""Prompt tokenization with the `tokenizers` library, in the model's static layout.

As the model family's processor does: the template's `<image>` placeholder becomes the family's
image text (`image_text` in generation.json: `<image>` for LLaVA, `<|vision_start|><|image_pad|>
<|vision_end|>` for Qwen2-VL) with its image token repeated `visual_tokens` times; bos etc. come
from the tokenizer's post-processor. Text is right-padded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vpexport.errors import UserInputError
from vpexport.runtime.text_length import check_text_fits

IMAGE_PLACEHOLDER = "<image>"


def _cleanup(s: str) -> str:
    """transformers' `clean_up_tokenization` (used when the tokenizer asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s


class PromptTokenizer:
    def __init__(self, runtime_dir: str | Path, gen: dict):
        from tokenizers import Tokenizer

        runtime_dir = Path(runtime_dir)
        self.tok = Tokenizer.from_file(str(runtime_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.special = json.loads((runtime_dir / "special_tokens.json").read_text())
        self.gen = gen
        self.template = gen["template"]
        self.prefix, self.visual = int(gen["prefix"]), int(gen["visual_tokens"])
        self.image_token_id = int(gen["image_token_id"])
        self.pad_id = int(gen["pad_token_id"])
        self.image_text = gen.get("image_text", IMAGE_PLACEHOLDER)
        self.image_token = gen.get("image_token", IMAGE_PLACEHOLDER)
        added = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self._image_is_added_token = added.get(self.image_token) == self.image_token_id

    def render(self, question: str) -> str:
        if IMAGE_PLACEHOLDER in question:
            raise UserInputError(
                f"the question must not contain {IMAGE_PLACEHOLDER}; the recipe's template places the image",
                field="--prompt",
                fix="pass only the question text",
            )
        return self.template.replace("{question}", question)

    def encode_one(self, question: str) -> list[int]:
        p, n = self.prefix, self.visual
        text = self.render(question).replace(IMAGE_PLACEHOLDER, self.image_text)
        if self._image_is_added_token and text.count(self.image_token) == 1:
            # The tokenizer splits added tokens out before anything else, so one placeholder
            # tokenizes its neighbours exactly as n of them do; expanding the id afterwards skips
            # tokenizing n placeholders (~1.3 ms of the LLaVA-1.5 prompt's ~1.6 ms).
            ids = self.tok.encode(text, add_special_tokens=True).ids
            if ids.count(self.image_token_id) == 1:
                at = ids.index(self.image_token_id)
                ids = ids[:at] + [self.image_token_id] * n + ids[at + 1 :]
        else:
            ids = self.tok.encode(text.replace(self.image_token, self.image_token * n), add_special_tokens=True).ids
        if ids[p : p + n] != [self.image_token_id] * n or ids.count(self.image_token_id) != n:
            raise UserInputError(
                f"image tokens are not at positions [{p}, {p + n}) of the prompt",
                field="--prompt",
                fix="the question must not change the system prefix of the template",
            )
        return ids

    def encode(self, questions: list[str], pad_to_text=None, max_text: int | None = None):
        """(input_ids, attention_mask) int64, right-padded to prefix + visual + the text width:
        `pad_to_text` (an int, or a callable from the longest text length to the width, e.g.
        `TextLength.width`), or the longest text when None."""
        rows = [self.encode_one(q) for q in questions]
        self._check_known(questions)
        head = self.prefix + self.visual
        longest = max(len(r) - head for r in rows)
        if max_text is not None:
            check_text_fits(longest, max_text, "shorten the question, or re-export with export.text_length.max >= {longest}")
        if callable(pad_to_text):
            pad_to_text = pad_to_text(longest)
        width = head + (pad_to_text if pad_to_text is not None else longest)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def _check_known(self, questions: list[str]) -> None:
        from vpexport.runtime.unknown_words import unknown_words, warn_unknown

        unk = self.special.get("unk_token_id")
        if unk is None:
            return
        words = []
        for q in questions:
            enc = self.tok.encode(q, add_special_tokens=False)
            words += unknown_words(q, enc.ids, enc.offsets, int(unk))
        warn_unknown(words, self.special.get("unk_token") or "<unk>")

    def decode(self, tokens: list[int]) -> str:
        s = self.tok.decode(list(tokens), skip_special_tokens=True)
        if self.special.get("clean_up_tokenization_spaces"):
            s = _cleanup(s)
        return s.strip()

"""Word-level tokenizer for the testbed, wrapped as a `PreTrainedTokenizerFast`.

`<image>` is a special added token; bos is prepended by the post-processor; eos ends answers.
"""

from __future__ import annotations

from vpexport.testbed.data import COLS, ROWS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = (
    "SYSTEM USER ASSISTANT : . ? , read the digits in this image list reading order what digit is at where "
    "how many are there a yes no none describe"
).split()
WORDS += list(ROWS) + list(COLS) + [str(i) for i in range(10)]


def build_vocab(extra_words: list[str] | None = None, size: int | None = None) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for w in SPECIALS + WORDS + list(extra_words or []):
        vocab.setdefault(w, len(vocab))
    if size is not None:  # pad with filler words to an exact vocab size (synthetic stand-ins)
        i = 0
        while len(vocab) < size:
            vocab[f"w{i}"] = len(vocab)
            i += 1
    return vocab


def build_tokenizer(vocab: dict[str, int] | None = None, model_max_length: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or build_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast

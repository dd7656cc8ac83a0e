"""One warning per process when a question holds words the model's tokenizer does not know.

A word-level or small-vocabulary tokenizer maps such words to its unknown token (`<unk>`) without
complaint, and the model then answers a different question than the one asked. Both prompt paths
(the runtime's `tokenizers` tokenizer and the PyTorch path's Hugging Face tokenizer) report here.
"""

from __future__ import annotations

import sys

_warned = False


def unknown_words(question: str, ids: list[int], offsets: list[tuple[int, int]], unk_id: int | None) -> list[str]:
    """The words of `question` its tokenization (`ids`, character `offsets`) maps to `unk_id`."""
    if unk_id is None:
        return []
    return [question[a:b] for t, (a, b) in zip(ids, offsets) if t == unk_id and b > a]


def warn_unknown(words: list[str], unk_token: str = "<unk>", stream=None) -> bool:
    """Print the warning the first time there are unknown words; True when it printed."""
    global _warned
    if _warned or not words:
        return False
    _warned = True
    shown = ", ".join(repr(w) for w in dict.fromkeys(words))
    print(f"warning: the model's tokenizer does not know {shown} and reads each as {unk_token} "
          "(said once per run; the answer is to the question with that word unknown)",
          file=stream if stream is not None else sys.stderr, flush=True)
    return True

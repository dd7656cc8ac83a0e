"""Questions with words the tokenizer does not know: one warning naming them, on both prompt paths."""

from pathlib import Path

import pytest

import vpexport.runtime.unknown_words as U

MINI = Path(__file__).resolve().parents[1] / "vpexport" / "testbed" / "checkpoints" / "mini-llava"


@pytest.fixture(autouse=True)
def fresh():
    U._warned = False
    yield
    U._warned = False


def test_runtime_tokenizer_names_the_unknown_words_once(capsys):
    from vpexport.runtime.tokenizer import PromptTokenizer

    tok = PromptTokenizer.__new__(PromptTokenizer)  # only the tokenizer and special tokens are needed here
    from tokenizers import Tokenizer

    tok.tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    unk = tok.tok.token_to_id("<unk>")
    tok.special = {"unk_token_id": unk, "unk_token": "<unk>"}
    tok._check_known(["what digits are there?"])
    assert capsys.readouterr().err == ""
    tok._check_known(["what zorblax digits?", "what qwxv digits?"])
    err = capsys.readouterr().err
    assert err.startswith("warning: the model's tokenizer does not know 'zorblax', 'qwxv' and reads each as <unk>")
    tok._check_known(["zorblax again"])
    assert capsys.readouterr().err == ""  # once per run


def test_pytorch_path_warns_too(capsys):
    from transformers import AutoTokenizer

    from vpexport.model.loading import _check_known

    t = AutoTokenizer.from_pretrained(MINI)
    _check_known(t, ["what digits are there?"])
    assert capsys.readouterr().err == ""
    _check_known(t, ["what zorblax digits?"])
    assert "does not know 'zorblax'" in capsys.readouterr().err


def test_unknown_words_from_offsets():
    assert U.unknown_words("ab cd ef", [5, 3, 7], [(0, 2), (3, 5), (6, 8)], 3) == ["cd"]
    assert U.unknown_words("ab", [3], [(0, 2)], None) == []


def test_the_pipelines_own_prefix_probe_is_not_a_users_question(capsys):
    """Opening the PyTorch pipeline probes the prompt layout with a placeholder question; only the
    user's questions are checked."""
    from vpexport.methods import METHODS  # noqa: F401  (the table the pipeline's schedule reads)
    from vpexport.model.loading import load_model
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.pruning.schedule import Schedule

    model, processor = load_model(MINI, "float32")
    TorchPipeline(model, processor, "SYSTEM: read the digits. USER: <image>\n{question} ASSISTANT:", Schedule("none"), 4)
    assert "does not know" not in capsys.readouterr().err

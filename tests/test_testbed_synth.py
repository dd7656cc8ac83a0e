import json

import pytest

from vpexport.errors import UserInputError
from vpexport.testbed.synth import synth, synth_config


def test_unknown_arch():
    with pytest.raises(UserInputError) as e:
        synth_config("llava-9b")
    assert e.value.field == "--arch"


def test_full_config_is_exact():
    from vpexport.families import BUILTIN_ARCHS

    assert synth_config("llava-1.5-13b") == BUILTIN_ARCHS["llava-1.5-13b"].hf_config


def test_tiny_synth(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "syn"
    meta = synth("llava-1.5-7b", out, layers=2, hidden=64, vision_layers=2, dtype="fp32")
    assert meta["synthetic"] and "No accuracy or quality figure" in meta["quality"]
    assert "No quality figure" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 32064
    assert cfg["text_config"]["num_hidden_layers"] == 2 and cfg["text_config"]["hidden_size"] == 64
    assert cfg["vision_config"]["image_size"] == 336 and cfg["vision_config"]["patch_size"] == 14
    proc = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    enc = proc(images=Image.new("RGB", (64, 48)), text=meta["prompt_template"].format(question="what is it ?"),
               return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576
    import torch

    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == 32064


def test_cli_help_and_bad_arch():
    from click.testing import CliRunner

    from vpexport.cli import cli

    r = CliRunner().invoke(cli, ["testbed", "--help"])
    assert r.exit_code == 0 and "synth" in r.output and "train" in r.output
    r = CliRunner().invoke(cli, ["testbed", "synth", "--arch", "nope", "--out", "x"])
    assert isinstance(r.exception, UserInputError)


def test_missing_standin_message_gives_the_command_that_creates_it(tmp_path):
    """A recipe whose stand-in does not exist yet names the exact `testbed synth` command; running
    that command as printed makes the recipe usable."""
    import shlex
    import subprocess
    import sys

    from tests.artifact_helpers import cli

    rp = tmp_path / "syn.yaml"
    rp.write_text((
        "name: syn\nmodel:\n  path: standin\n  synth: {arch: llava-1.5-7b, layers: 2, hidden: 64, vision_layers: 1, seed: 3}\n"
        "task: {type: vqa, prompt: \"USER: <image>\\n{question} ASSISTANT:\", text_tokens: 12}\n"
        "pruning: {method: fastv, points: [{layer: 1, keep: 100}]}\n"))
    r = cli("plan", rp)
    assert r.returncode == 2 and "has not been created yet" in r.stderr
    cmd = r.stderr.split("or `")[-1].split("`")[0]
    assert cmd.startswith("vpexport testbed synth --arch llava-1.5-7b --out ")
    assert "--layers 2 --hidden 64 --vision-layers 1" in cmd and "--seed 3" in cmd and "--dtype fp32" in cmd
    made = subprocess.run([sys.executable, "-m", "vpexport", *shlex.split(cmd)[1:]], capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stderr[-1000:]
    assert (tmp_path / "standin" / "config.json").is_file()
    r = cli("plan", rp)
    assert r.returncode == 0, r.stderr[-1000:]


@pytest.mark.parametrize("arch", ["qwen2-vl-2b", "qwen2.5-vl-7b"])
def test_qwen_synth_loads_as_a_users_folder(tmp_path, arch):
    """A Qwen stand-in is a folder as a user has it (no combined processor): it loads through the
    family, answers in the Qwen chat layout, and keeps GQA / M-RoPE head size / the window mix."""
    import torch
    from PIL import Image

    from vpexport.families import load_checkpoint
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.pruning.schedule import Schedule

    out = tmp_path / "syn"
    meta = synth(arch, out, layers=2, hidden=256, vision_layers=2, dtype="fp32", image_size=(112, 112))
    assert meta["visual_tokens"] == 16 and "<image>" in meta["prompt_template"]
    cfg = json.loads((out / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    assert t["vocab_size"] == 151936 and t["num_hidden_layers"] == 2 and t["hidden_size"] == 256
    assert t["hidden_size"] // t["num_attention_heads"] == 128 or t.get("head_dim") == 128
    if arch.startswith("qwen2.5"):
        assert v["depth"] == 2 and v["fullatt_block_indexes"] == [1] and v["out_hidden_size"] == 256
    fam, model, proc = load_checkpoint(out, "float32", (112, 112))
    assert fam.name == arch.rsplit("-", 1)[0]
    pipe = TorchPipeline(model, proc, meta["prompt_template"], Schedule("none"), 3, (112, 112))
    with torch.no_grad():
        ans = pipe.answer([Image.new("RGB", (64, 48))], ["what is it ?"])
    # <|im_start|> system You are a helpful assistant . <|im_end|> <|im_start|> user <|vision_start|>
    assert pipe.prefix == 12
    assert len(ans[0].tokens) >= 1

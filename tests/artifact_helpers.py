"""Shared helpers of the artifact tests (export, runtime, validate, build, engine): a tiny
testbed-style checkpoint, a temporary recipe, an eval split, CLI and export calls, ORT sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "SYSTEM: read the digits. USER: <image>\n{question} ASSISTANT:"
QUESTIONS = ["what digit is at a b ?", "how many digits are there ?", "read the digits", "is there a 3 ?",
             "where is the 7 ?", "describe this image"]
# 8 decoder layers, 144 visual tokens (96 px / patch 8).
POINTS = {
    "fastv": ("[{layer: 2, keep: 72}]", 0),
    "himap": ("[{layer: 2, keep: 72}, {layer: 5, keep: 18}]", 0),
    "visipruner": ("[{layer: 3, keep: 10}, {layer: 6, keep: 0}]", 2),
    "dart": ("[{layer: 2, keep: 40}]", 0),
    "divprune": ("[{layer: 0, keep: 30}]", 0),
    "cdpruner": ("[{layer: 0, keep: 36}]", 0),
    "dart_projector": ("[{layer: 0, keep: 41}]", 0),
}


# --------------------------------------------------------------------------- helpers (shared)
def build_checkpoint(path: Path) -> Path:
    """The testbed's mini LLaVA (untrained) with a wider init so attention, hence TopK, is clear-cut."""
    from vpexport.testbed.model import build_mini, save_checkpoint

    model, _, proc = build_mini(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() == 2 and "embed" not in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.08)
    save_checkpoint(path, model, proc, {"template": TEMPLATE})
    return path


def checkpoint_and_eval(d: Path, n: int) -> tuple[Path, Path, Path]:
    """(folder, a build_checkpoint folder, an n-sample eval split) in `d`: the module fixtures' set-up."""
    return d, build_checkpoint(d / "ckpt"), make_eval(d / "data", n=n)


def make_eval(path: Path, n: int = 6, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.RandomState(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = rng.randint(70, 150, 2)
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "question": QUESTIONS[i % len(QUESTIONS)], "answer": "yes"})
    f = path / "eval.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def write_recipe(path: Path, ckpt: Path, method: str, eval_file: Path | None = None, mode: str = "padded",
                 text_max: int = 16, precision: str = "fp32", samples: int = 6, buckets=None) -> Path:
    pts, sink = POINTS[method]
    data = f"\n  data: {{eval: {eval_file}}}" if eval_file else ""
    sink_line = f"\n  sink_layers: {sink}" if sink else ""
    path.write_text(f"""name: {path.stem}
model: {{path: {ckpt}, dtype: float32}}
task:
  type: vqa{data}
  prompt: {json.dumps(TEMPLATE)}
  max_new_tokens: 5
pruning:
  method: {method}
  points: {pts}{sink_line}
export:
  precision: {precision}
  text_length: {{mode: {mode}, max: {text_max}{f", buckets: {list(buckets)}" if buckets else ""}}}
validate:
  samples: {samples}
""")
    return path


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "vpexport", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def export_py(recipe_path: Path, out: Path) -> dict:
    from vpexport.export.onnx_export import export_artifacts
    from vpexport.recipe import load_recipe

    r = load_recipe(recipe_path)
    return export_artifacts(r, out, r.schedule(), log=None)


def torch_pruned(ckpt: Path, recipe_path: Path):
    from vpexport.model.pipeline import TorchPipeline
    from vpexport.recipe import load_recipe

    r = load_recipe(recipe_path)
    return TorchPipeline.from_recipe(r, r.schedule())


def ort(path: Path):
    import onnxruntime as rt

    o = rt.SessionOptions()
    o.intra_op_num_threads = 1
    return rt.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def batch_inputs(pipe, text_lens=(7, 3, 5), text_max=16, seed=0):
    """Right-padded ids (padded to text_max) with the image span at [prefix, prefix+N), random pixels."""
    pm = pipe.pruned
    g = torch.Generator().manual_seed(seed)
    p, n = pm.prefix, pm.visual_tokens
    b = len(text_lens)
    ids, _, _ = pipe.encode([_img(0)] * 1, ["read the digits"])
    head = ids[0, :p]
    out = torch.zeros(b, p + n + text_max, dtype=torch.long)
    mask = torch.zeros_like(out)
    for j, t in enumerate(text_lens):
        out[j, :p] = head
        out[j, p : p + n] = pm.image_token_id
        out[j, p + n : p + n + t] = torch.randint(5, 40, (t,), generator=g)
        mask[j, : p + n + t] = 1
    px = torch.randn(b, 3, 96, 96, generator=g)
    return out, mask, px


def _img(seed):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (96, 96, 3), dtype=np.uint8))


QWEN_TEMPLATE = "<|im_start|>system read the digits.<|im_end|> <|im_start|>user <image>{question}<|im_end|> <|im_start|>assistant"
QWEN_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 288,
                 "<|vision_end|>": 289, "<|image_pad|>": 290, "<|video_pad|>": 291}


def build_qwen_checkpoint(path: Path, kind: str = "qwen2-vl", layers: int = 8) -> Path:
    """A random-weight tiny Qwen2-VL / Qwen2.5-VL saved as a user's folder would be: the model's
    save_pretrained, a tokenizer (tokenizer.json + config) and preprocessor_config.json of the PIL
    image processor; no combined processor (it needs torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    from tests.tiny import QWEN_VOCAB, tiny_qwen
    from vpexport.testbed.synth import qwen_synth_tokenizer

    fast = qwen_synth_tokenizer(QWEN_VOCAB, QWEN_SPECIALS)
    model = tiny_qwen(kind, layers=layers)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    Qwen2VLImageProcessorPil().save_pretrained(path)
    return path


def require_real_peer():
    """Skip unless OpenVINO GenAI and an optimum-intel exporter are here (the `peers` extra and
    `python -m vpexport.bench.peers setup`)."""
    import pytest

    from vpexport.bench import peers

    try:
        import openvino_genai  # noqa: F401
        import openvino_tokenizers  # noqa: F401
    except ImportError as e:
        pytest.skip(f"openvino-genai / openvino-tokenizers not importable ({e}): pip install 'vpexport[peers]'")
    try:
        exporter = peers.find_exporter()
    except peers.PeerUnavailable as e:
        pytest.skip(e.one_line())
    if exporter is None:
        pytest.skip("no optimum-intel exporter found: run `python -m vpexport.bench.peers setup` "
                    "or set VPEXPORT_OPTIMUM_CLI")

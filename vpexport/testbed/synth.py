"""Random-weight stand-ins with the exact LLaVA-1.5 architecture, for export and speed work only.

No quality figure may come from these: the weights are random and the vocabulary is synthetic.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from vpexport.errors import UserInputError

SYNTH_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DTYPES = ("fp32", "fp16", "bf16")


def synth_config(arch: str, layers: int | None = None, hidden: int | None = None,
                 vision_layers: int | None = None) -> dict:
    from vpexport.families import FAMILIES

    archs = FAMILIES["llava"].builtins
    if arch not in archs:
        # Qwen2-VL stand-ins need their own tokenizer and processor files: not made yet.
        raise UserInputError(f"no random-weight stand-in for architecture {arch!r}", field="--arch",
                             fix="use one of " + ", ".join(sorted(archs)))
    cfg = copy.deepcopy(archs[arch].hf_config)
    t = cfg["text_config"]
    if layers is not None:
        if layers < 1 or layers > t["num_hidden_layers"]:
            raise UserInputError(f"--layers must be 1..{t['num_hidden_layers']} for {arch} (got {layers})",
                                 field="--layers")
        t["num_hidden_layers"] = layers
    if hidden is not None:
        head_dim = t["hidden_size"] // t["num_attention_heads"]
        if hidden < 8 or hidden > t["hidden_size"] or hidden % 8:
            raise UserInputError(f"--hidden must be a multiple of 8 in 8..{t['hidden_size']} (got {hidden})",
                                 field="--hidden")
        heads = max(1, hidden // head_dim)
        while hidden % heads:
            heads -= 1
        t["intermediate_size"] = int(round(t["intermediate_size"] * hidden / t["hidden_size"] / 8)) * 8
        t["hidden_size"] = hidden
        t["num_attention_heads"] = t["num_key_value_heads"] = heads
    if vision_layers is not None:
        v = cfg["vision_config"]
        if vision_layers < 1 or vision_layers > v["num_hidden_layers"]:
            raise UserInputError(f"--vision-layers must be 1..{v['num_hidden_layers']} (got {vision_layers})",
                                 field="--vision-layers")
        v["num_hidden_layers"] = vision_layers
    return cfg


def synth_tokenizer(image_token_index: int):
    from vpexport.testbed.tokenizer import SPECIALS, WORDS, build_tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words = [w for w in SPECIALS if w not in vocab and w not in ("<image>", "<pad>")]
    from tokenizers import pre_tokenizers

    tpl_words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(SYNTH_TEMPLATE) if w != "<image>"]
    for w in words + WORDS + tpl_words + ["image", "describe", "question"]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < image_token_index:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    vocab["<image>"] = image_token_index
    vocab["<pad>"] = image_token_index + 1
    return build_tokenizer(vocab, model_max_length=4096)


def synth(arch: str, out: str | Path, layers=None, hidden=None, vision_layers=None, dtype: str = "fp16",
          seed: int = 0) -> dict:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vpexport.testbed.model import META_FILE, build_processor

    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}", field="--dtype", fix="use fp32, fp16 or bf16")
    raw = synth_config(arch, layers, hidden, vision_layers)
    tok = synth_tokenizer(raw["image_token_index"])
    t = raw["text_config"]
    t.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    raw = dict(raw)
    raw["image_token_id"] = raw.pop("image_token_index")
    raw["image_seq_length"] = (raw["vision_config"]["image_size"] // raw["vision_config"]["patch_size"]) ** 2
    cfg = LlavaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdt)  # build directly in the target dtype (a 7B model in fp32 needs 28 GB)
    try:
        model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    v = cfg.vision_config
    proc = build_processor(tok, v.image_size, v.patch_size, CLIP_MEAN, CLIP_STD)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "synthetic": True,
        "quality": "none: random weights and a synthetic vocabulary; for export and speed work only. "
                   "No accuracy or quality figure may be derived from this model.",
        "arch": arch,
        "prompt_template": SYNTH_TEMPLATE,
        "visual_tokens": (v.image_size // v.patch_size) ** 2,
        "dtype": dtype,
        "seed": seed,
        "overrides": {"layers": layers, "hidden": hidden, "vision_layers": vision_layers},
        "parameters": n_params,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    (out / "README.md").write_text(
        f"# Synthetic {arch} stand-in (random weights)\n\n"
        f"Made by `vpexport testbed synth --arch {arch}`"
        + (f" --layers {layers}" if layers else "") + (f" --hidden {hidden}" if hidden else "")
        + (f" --vision-layers {vision_layers}" if vision_layers else "")
        + f" --dtype {dtype} --seed {seed}`.\n\n"
        "**No quality figure comes from this model.** Its weights are random and its tokenizer is a small\n"
        "synthetic word list padded to the config's vocabulary; it exists so that export, shape and\n"
        "speed work can run on the exact LLaVA-1.5 architecture (CLIP ViT-L/14-336, 576 visual tokens)\n"
        "without downloading the real weights.\n"
    )
    return meta

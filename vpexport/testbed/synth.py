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
    from vpexport.families import BUILTIN_ARCHS

    if arch not in BUILTIN_ARCHS:
        raise UserInputError(f"unknown architecture {arch!r}", field="--arch",
                             fix="use one of " + ", ".join(sorted(BUILTIN_ARCHS)))
    cfg = copy.deepcopy(BUILTIN_ARCHS[arch].hf_config)
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
        # Keep the query/key-value grouping where the heads allow it (GQA in Qwen2-VL).
        groups = t["num_attention_heads"] // t.get("num_key_value_heads", t["num_attention_heads"])
        kv = heads // groups if heads % groups == 0 and heads >= groups else heads
        t["intermediate_size"] = int(round(t["intermediate_size"] * hidden / t["hidden_size"] / 8)) * 8
        t["hidden_size"] = hidden
        t["num_attention_heads"], t["num_key_value_heads"] = heads, kv
        if head_dim * heads != hidden:
            t["head_dim"] = head_dim  # M-RoPE's sections are fixed to the original head size
        v = cfg["vision_config"]
        if "out_hidden_size" in v:
            v["out_hidden_size"] = hidden  # Qwen2.5-VL: the merger writes the decoder's width
        elif "embed_dim" in v:
            v["hidden_size"] = hidden  # Qwen2-VL: the vision config's hidden_size is the merger's output
    if vision_layers is not None:
        v = cfg["vision_config"]
        key = "num_hidden_layers" if "num_hidden_layers" in v else "depth"
        if vision_layers < 1 or vision_layers > v[key]:
            raise UserInputError(f"--vision-layers must be 1..{v[key]} (got {vision_layers})", field="--vision-layers")
        v[key] = vision_layers
        if "fullatt_block_indexes" in v:
            # Qwen2.5-VL: keep the mix of windowed and full-attention blocks; the last kept block
            # attends fully, as the full tower's last block does.
            v["fullatt_block_indexes"] = sorted({i for i in v["fullatt_block_indexes"] if i < vision_layers - 1}
                                                | {vision_layers - 1})
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
          seed: int = 0, image_size=None, device: str = "cpu") -> dict:
    """Write a random-weight stand-in of built-in `arch` to `out` (save_pretrained layout, with its
    tokenizer and image-processor files); `image_size` (H, W): the visual-token count recorded for a
    dynamic-resolution family (default: the built-in's). `device`: where the weights are drawn
    (`vpexport.model.device` spelling; the same seed gives other weights on a GPU)."""
    import torch

    from vpexport.families import BUILTIN_ARCHS
    from vpexport.testbed.model import META_FILE

    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}", field="--dtype", fix="use fp32, fp16 or bf16")
    raw = synth_config(arch, layers, hidden, vision_layers)
    builtin = BUILTIN_ARCHS[arch]
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    from vpexport.model.device import resolve

    where = resolve(device, "--device")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdt)  # build directly in the target dtype (a 7B model in fp32 needs 28 GB)
    try:
        with torch.device(where.torch):
            if builtin.family == "llava":
                model, saved, template, tokens, what = _llava_standin(raw)
            else:
                model, saved, template, tokens, what = _qwen_standin(raw, builtin, image_size)
    finally:
        torch.set_default_dtype(prev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for obj in saved:
        obj.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "synthetic": True,
        "quality": "none: random weights and a synthetic vocabulary; for export and speed work only. "
                   "No accuracy or quality figure may be derived from this model.",
        "arch": arch,
        "prompt_template": template,
        "visual_tokens": tokens,
        "dtype": dtype,
        "seed": seed,
        "device": where.torch,
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
        f"speed work can run on the exact {what} architecture without downloading the real weights.\n"
    )
    return meta


def _llava_standin(raw: dict):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vpexport.testbed.model import build_processor

    tok = synth_tokenizer(raw["image_token_index"])
    t = raw["text_config"]
    t.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    raw = dict(raw)
    raw["image_token_id"] = raw.pop("image_token_index")
    raw["image_seq_length"] = (raw["vision_config"]["image_size"] // raw["vision_config"]["patch_size"]) ** 2
    cfg = LlavaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    v = cfg.vision_config
    proc = build_processor(tok, v.image_size, v.patch_size, CLIP_MEAN, CLIP_STD)
    return (model, [proc], SYNTH_TEMPLATE, (v.image_size // v.patch_size) ** 2,
            "LLaVA-1.5 (CLIP ViT-L/14-336, 576 visual tokens)")


# Qwen2-VL's chat layout with the default system prompt; `<image>` becomes the vision span.
QWEN_SYNTH_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                       "<image>{question}<|im_end|>\n<|im_start|>assistant\n")
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656}


def qwen_synth_tokenizer(vocab_size: int, special_ids: dict[str, int] | None = None):
    """Word-level tokenizer with Qwen2-VL's special tokens at their real ids (or `special_ids`, for
    tiny test vocabularies), padded with filler words to the config's vocabulary."""
    special_ids = special_ids or QWEN_SPECIAL_IDS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vpexport.testbed.tokenizer import WORDS

    specials = set(special_ids.values())
    free = (i for i in range(vocab_size) if i not in specials)
    tpl = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(QWEN_SYNTH_TEMPLATE.replace("<image>", " "))]
    vocab: dict[str, int] = {}
    for w in ["<unk>"] + WORDS + [w for w in tpl if not w.startswith("<|")] + ["image", "describe", "question"]:
        if w not in vocab:
            vocab[w] = next(free)
    for i, idx in enumerate(free):
        vocab[f"w{i}"] = idx
    vocab.update(special_ids)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": [t for t in special_ids if t != "<|endoftext|>"]})
    return fast


def _qwen_standin(raw: dict, builtin, image_size):
    from transformers import Qwen2VLImageProcessorPil

    from vpexport.families import family

    fam = family(builtin.family)
    tok = qwen_synth_tokenizer(raw["text_config"]["vocab_size"])
    t = raw["text_config"]
    t.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_cls = fam.model_class()
    cfg = model_cls.config_class.from_dict(raw)
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    h, w = fam.image_size(raw, image_size or builtin.image_size)
    tokens = (h // 28) * (w // 28)
    return (model, [tok, Qwen2VLImageProcessorPil()], QWEN_SYNTH_TEMPLATE, tokens,
            f"{fam.hf_class} ({h}x{w} px, {tokens} visual tokens)")

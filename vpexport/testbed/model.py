"""Construction of the mini LLaVA (CLIP ViT tower + projector + Llama) and its processor."""

from __future__ import annotations

import json
from pathlib import Path

from vpexport.testbed import data as D

PROMPT_TEMPLATE = "SYSTEM: read the digits. USER: <image>\n{question} ASSISTANT:"
META_FILE = "vpexport_testbed.json"

MINI = {
    "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "text": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4),
}


def build_image_processor(size: int, mean=None, std=None):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=mean or [0.5, 0.5, 0.5],
        image_std=std or [0.5, 0.5, 0.5],
    )


def build_processor(tokenizer, image_size: int, patch_size: int, mean=None, std=None):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(image_size, mean, std),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token="<image>",
    )


def mini_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=D.IMAGE_SIZE, patch_size=D.PATCH, num_channels=3, projection_dim=128,
                              **MINI["vision"])
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MINI["text"],
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(D.IMAGE_SIZE // D.PATCH) ** 2,
        tie_word_embeddings=False,
    )
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return cfg


def build_mini(seed: int = 0):
    """Fresh (untrained) mini LLaVA, its tokenizer and processor."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from vpexport.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = mini_config(tok)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    proc = build_processor(tok, D.IMAGE_SIZE, D.PATCH)
    return model, tok, proc


def save_checkpoint(out: str | Path, model, processor, meta: dict, dtype=None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    with open(out / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)


def visual_token_count(config) -> int:
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1

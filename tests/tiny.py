"""Tiny random-weight LLaVA models for each supported text backbone, and prompt builders."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2")
IMAGE_TOKEN = 63
VOCAB = 64


def tiny_llava(family: str = "llama", layers: int = 4, seed: int = 0, image_size: int = 48, patch: int = 8):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        Qwen2Config,
    )

    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    tc = text_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Larger-than-default init so attention is far from uniform and pruning choices are clear-cut.
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() == 2 and "embed" not in name:
                prm.normal_(0, 0.08)
    return model


def make_batch(model, text_lens: list[int], prefix: int = 5, seed: int = 0):
    """Right-padded input_ids / attention_mask with the image span at [prefix, prefix + N)."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    t = max(text_lens)
    b = len(text_lens)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (b, prefix + n + t), generator=g)
    ids[:, prefix : prefix + n] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    for j, tl in enumerate(text_lens):
        ids[j, prefix + n + tl :] = 0
        mask[j, prefix + n + tl :] = 0
    pixels = torch.randn(b, 3, vc.image_size, vc.image_size, generator=g)
    return ids, mask, pixels

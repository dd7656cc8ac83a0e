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


# Qwen2-VL / Qwen2.5-VL: M-RoPE sections of a head_dim 16 (sum 8 = hd / 2), vocab 300 with the
# vision special tokens at the top; 168x168 px = 12x12 patches = 6x6 merged tokens (N = 36, the
# LLaVA tiny's count, so the same schedules apply).
QWEN_KINDS = ("qwen2-vl", "qwen2.5-vl")
QWEN_IMAGE_TOKEN, QWEN_VOCAB = 290, 300
QWEN_TOKENS = dict(image_token_id=290, video_token_id=291, vision_start_token_id=288, vision_end_token_id=289)
QWEN_VISION = {
    "qwen2-vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
    "qwen2.5-vl": dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                       window_size=112, fullatt_block_indexes=[1]),
}


def tiny_qwen(kind: str = "qwen2-vl", layers: int = 4, seed: int = 0):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    config_cls, model_cls = {"qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                             "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[kind]
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=QWEN_VOCAB, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    vision = dict(QWEN_VISION[kind], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=text, vision_config=vision, **QWEN_TOKENS)).eval()
    with torch.no_grad():  # as tiny_llava: attention far from uniform, so pruning choices are clear-cut
        for name, prm in model.named_parameters():
            if prm.dim() >= 2 and "embed_tokens" not in name:
                prm.normal_(0, 0.08)
    return model


def make_qwen_batch(text_lens: list[int], image_size=(168, 168), prefix: int = 5, seed: int = 0):
    """Right-padded ids / mask with the image span at [prefix, prefix + N) and (B, 3, H, W) pixels."""
    h, w = image_size
    n = (h // 28) * (w // 28)
    g = torch.Generator().manual_seed(seed)
    t, b = max(text_lens), len(text_lens)
    ids = torch.randint(3, 280, (b, prefix + n + t), generator=g)
    ids[:, prefix : prefix + n] = QWEN_IMAGE_TOKEN
    mask = torch.ones_like(ids)
    for j, tl in enumerate(text_lens):
        ids[j, prefix + n + tl :] = 0
        mask[j, prefix + n + tl :] = 0
    return ids, mask, torch.randn(b, 3, h, w, generator=g)

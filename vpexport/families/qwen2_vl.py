"""Qwen2-VL and Qwen2.5-VL (transformers' `Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`): a ViT with 2-D rotary positions (window attention in 2.5)
and a 2x2 patch merger, and a Qwen2 decoder with multimodal RoPE (M-RoPE).

Static resolution: the recipe's `model.image_size: [H, W]` (multiples of patch x merge, 28 for
the released models) fixes the grid, so the visual count is static: N = (H/28) * (W/28).

M-RoPE in the static layout (as Hugging Face's `get_rope_index` for one image): the prefix
tokens sit at position i in all three channels (temporal, height, width); the visual token of
merged row r and column c at (p, p + r, p + c); the text after the image continues from
p + max(H/28, W/28), the same in every channel, and so do the generated tokens. The channels are
split over the head dimension by the config's `mrope_section`.

On this machine the combined `Qwen2VLProcessor` cannot be built (its video half needs
torchvision): the tokenizer and `Qwen2VLImageProcessorPil` load on their own and
`QwenProcessor` puts them together for still images at the fixed size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import RecipeError, UserInputError
from vpexport.families.base import Adapter, BuiltinArch, ModelFamily, flat_features

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


@dataclass(frozen=True)
class QwenVisionSpec:
    width: int  # the ViT's hidden size
    intermediate: int
    layers: int
    heads: int
    patch_size: int
    merge: int  # spatial_merge_size
    channels: int
    image_size: tuple[int, int]  # (H, W), static
    out_hidden: int  # the merger's output width (the decoder's)
    gated_mlp: bool  # Qwen2.5: SiLU-gated MLP (three matrices)
    window: int | None = None  # Qwen2.5: window size in pixels
    full_attention_layers: tuple[int, ...] = ()  # Qwen2.5: the blocks with full attention

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw) in patches."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def visual_tokens(self) -> int:
        return self.patches // (self.merge * self.merge)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size

    def summary(self) -> str:
        att = f", window {self.window}px" if self.window else ""
        return f"ViT {self.layers} layers ({self.image_size[0]}x{self.image_size[1]}px/{self.patch_size}{att})"

    def window_sizes(self) -> list[int]:
        """Patches per attention window (Qwen2.5): windows of window/patch merged-token units,
        cut at the grid's edges as Hugging Face's `get_window_index` cuts them."""
        gh, gw = (g // self.merge for g in self.grid)
        w = self.window // self.merge // self.patch_size
        rows = [min(w, gh - a) for a in range(0, gh, w)]
        cols = [min(w, gw - a) for a in range(0, gw, w)]
        return [r * c * self.merge * self.merge for r in rows for c in cols]

    def flops(self, text_hidden: int) -> dict[str, int]:
        """Per image, as the vision graph runs it (the still image's two temporal frames folded into
        one patch embedding): patch embedding, blocks, merger."""
        P, dv, mv = self.patches, self.width, self.intermediate
        patch_embed = 2 * P * self.channels * self.patch_size * self.patch_size * dv
        linear = 2 * P * dv * 3 * dv + 2 * P * dv * dv + (3 if self.gated_mlp else 2) * 2 * P * dv * mv
        full = 2 * 2 * P * P * dv
        windowed = sum(2 * 2 * s * s * dv for s in self.window_sizes()) if self.window else full
        n_full = len(self.full_attention_layers) if self.window else self.layers
        encoder = self.layers * linear + n_full * full + (self.layers - n_full) * windowed
        n, m = self.visual_tokens, dv * self.merge * self.merge
        return {"patch_embed": patch_embed, "encoder": encoder, "projector": 2 * n * m * m + 2 * n * m * text_hidden}

    def params(self, text_hidden: int) -> dict[str, int]:
        dv, mv, m = self.width, self.intermediate, self.width * self.merge * self.merge
        vision = 2 * self.channels * self.patch_size**2 * dv  # Conv3d over two temporal frames
        vision += self.layers * (4 * dv * dv + (3 if self.gated_mlp else 2) * dv * mv)
        return {"vision": vision, "projector": m * m + m * text_hidden}


def _qwen2_vl_2b() -> dict:
    """The public Qwen2-VL-2B-Instruct config.json contents (transformers' nested layout)."""
    return {
        "model_type": "qwen2_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": True,
        "text_config": {"model_type": "qwen2_vl_text", "hidden_size": 1536, "intermediate_size": 8960,
                        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6,
                        "tie_word_embeddings": True},
        "vision_config": {"model_type": "qwen2_vl", "depth": 32, "embed_dim": 1280, "hidden_size": 1536,
                          "num_heads": 16, "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"},
    }


def _qwen25_vl(hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool) -> dict:
    """The public Qwen2.5-VL-3B / 7B-Instruct config.json contents (transformers' nested layout)."""
    return {
        "model_type": "qwen2_5_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": tied,
        "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": hidden, "intermediate_size": inter,
                        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                        "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6,
                        "tie_word_embeddings": tied},
        "vision_config": {"model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "window_size": 112, "hidden_act": "silu",
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
    }


def _merged_grid(visual: int, grid) -> tuple[int, int]:
    """(rows, cols) of merged tokens from the vision graph's (t, h, w) patch grid and its token
    count (the merge factor is what divides one into the other)."""
    import math

    _, gh, gw = grid
    m = math.isqrt(gh * gw // visual) if visual else 0
    if not m or (gh // m) * (gw // m) != visual:
        raise ValueError(f"a {gh}x{gw} patch grid does not merge into {visual} tokens")
    return gh // m, gw // m


class QwenAdapter(Adapter):
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)


class Qwen2VLFamily(ModelFamily):
    name = "qwen2-vl"
    model_types = ("qwen2_vl",)
    text_families = ("qwen2_vl_text",)
    positions = "mrope"
    dynamic_resolution = True
    adapter_class = QwenAdapter
    image_text = VISION_START + IMAGE_PAD + VISION_END
    # `prompt_prefix_tokens`: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    # <|im_start|>user\n<|vision_start|>" with the Qwen2 tokenizer.
    builtins = {"qwen2-vl-2b": BuiltinArch("qwen2-vl-2b", "qwen2-vl", _qwen2_vl_2b(), prompt_prefix_tokens=15,
                                           image_size=(448, 448))}
    hf_class = "Qwen2VLForConditionalGeneration"

    # ---------------------------------------------------------------- torch-free
    def _vision(self, cfg: dict, image_size) -> QwenVisionSpec:
        v = cfg["vision_config"]
        dv = int(v["embed_dim"])
        return QwenVisionSpec(
            width=dv, intermediate=int(dv * v.get("mlp_ratio", 4)), layers=int(v["depth"]), heads=int(v["num_heads"]),
            patch_size=int(v.get("patch_size", 14)), merge=int(v.get("spatial_merge_size", 2)),
            channels=int(v.get("in_channels", 3)), image_size=image_size, out_hidden=int(v["hidden_size"]),
            gated_mlp=False)

    def spec(self, cfg: dict, name: str = "model", image_size=None):
        from vpexport.arch.spec import ArchSpec, text_spec

        if "vision_config" not in cfg:
            raise RecipeError(f"config.json has no 'vision_config': not a {self.hf_class} checkpoint",
                              field="model.path", fix=f"point it at a {self.hf_class} save_pretrained directory")
        size = self.image_size(cfg, image_size)
        return ArchSpec(name=name, family=self.name, text=text_spec(cfg, qkv_bias=True),
                        vision=self._vision(cfg, size), image_token_id=int(cfg["image_token_id"]))

    def image_size(self, cfg: dict, requested=None) -> tuple[int, int]:
        v = cfg["vision_config"]
        unit = int(v.get("patch_size", 14)) * int(v.get("spatial_merge_size", 2))
        if requested is None:
            raise RecipeError(f"the {self.name} family takes images at any resolution; the graphs need a fixed one",
                              field="model.image_size", fix=f"set model.image_size: [H, W], multiples of {unit} "
                              "(e.g. [448, 448])")
        h, w = (int(x) for x in requested)
        if h <= 0 or w <= 0 or h % unit or w % unit:
            raise RecipeError(f"model.image_size [{h}, {w}] is not a multiple of {unit} (patch x merge)",
                              field="model.image_size",
                              fix=f"use multiples of {unit}, e.g. [{max(unit, round(h / unit) * unit)}, "
                                  f"{max(unit, round(w / unit) * unit)}]")
        return h, w

    # ---------------------------------------------------------------- torch
    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def load(self, path: Path, dtype: str = "float32", image_size=None):
        import torch
        from transformers import AutoTokenizer

        from vpexport.families import quiet_bars_in_logs

        quiet_bars_in_logs()
        try:
            model = self.model_class().from_pretrained(path, dtype=getattr(torch, dtype),
                                                        attn_implementation="sdpa").eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = _image_processor(path)
        except (OSError, ValueError) as e:
            raise UserInputError(
                f"cannot load a {self.name} checkpoint from {path}: {str(e).splitlines()[0]}", field="model.path",
                fix=f"give a {self.hf_class} save_pretrained directory with preprocessor_config.json and the "
                    "tokenizer files",
            ) from None
        size = self.image_size(model.config.to_dict(), image_size)
        tokenizer.padding_side = "right"
        vc = model.config.vision_config
        n = (size[0] // vc.patch_size) * (size[1] // vc.patch_size) // vc.spatial_merge_size**2
        return model, QwenProcessor(tokenizer, image_processor, size, n, vc)

    def vision_graph(self, model, image_size=None):
        from vpexport.families.qwen_vision import QwenVisionGraph

        return QwenVisionGraph(model.model.visual, self.image_size(model.config.to_dict(), image_size))

    def head_positions(self, prefix: int, visual: int, grid=None):
        import torch

        rows, cols = _merged_grid(visual, grid)
        pos = torch.empty(prefix + visual, 3, dtype=torch.long)
        pos[:prefix] = torch.arange(prefix)[:, None]
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos[prefix:, 0] = prefix
        pos[prefix:, 1] = prefix + r.reshape(-1)
        pos[prefix:, 2] = prefix + c.reshape(-1)
        return pos

    def text_position_start(self, prefix: int, visual: int, grid=None) -> int:
        return prefix + max(_merged_grid(visual, grid))

    def hf_image_features(self, model, pixel_values):
        """`pixel_values` (B, 3, H, W) as the runtime feeds the vision graph; Hugging Face takes the
        processor's flattened patches and the grid."""
        import torch

        from vpexport.families.qwen_vision import hf_pixel_values

        vc = model.config.vision_config
        b, _, h, w = pixel_values.shape
        flat = hf_pixel_values(pixel_values, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        grid = torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]] * b, device=pixel_values.device)
        feats = model.model.get_image_features(pixel_values=flat, image_grid_thw=grid)
        return flat_features(feats)

    def preprocess_config(self, processor, image_size=None) -> dict:
        from vpexport.families.qwen_vision import preprocess_config

        return preprocess_config(processor.image_processor, processor.image_size)


class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    text_families = ("qwen2_5_vl_text",)
    builtins = {
        "qwen2.5-vl-3b": BuiltinArch("qwen2.5-vl-3b", "qwen2.5-vl", _qwen25_vl(2048, 11008, 36, 16, 2, True),
                                     prompt_prefix_tokens=15, image_size=(448, 448)),
        "qwen2.5-vl-7b": BuiltinArch("qwen2.5-vl-7b", "qwen2.5-vl", _qwen25_vl(3584, 18944, 28, 28, 4, False),
                                     prompt_prefix_tokens=15, image_size=(448, 448)),
    }
    hf_class = "Qwen2_5_VLForConditionalGeneration"

    def _vision(self, cfg: dict, image_size) -> QwenVisionSpec:
        v = cfg["vision_config"]
        return QwenVisionSpec(
            width=int(v["hidden_size"]), intermediate=int(v["intermediate_size"]), layers=int(v["depth"]),
            heads=int(v["num_heads"]), patch_size=int(v.get("patch_size", 14)),
            merge=int(v.get("spatial_merge_size", 2)), channels=int(v.get("in_channels", 3)), image_size=image_size,
            out_hidden=int(v["out_hidden_size"]), gated_mlp=True, window=int(v.get("window_size", 112)),
            full_attention_layers=tuple(int(i) for i in v.get("fullatt_block_indexes", ())))

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration


def _image_processor(path: Path):
    """The checkpoint's image processor without torchvision (its PIL backend)."""
    import warnings

    from transformers import Qwen2VLImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil.from_pretrained(path)


class QwenProcessor:
    """Tokenizer + image processor for still images at one fixed size, with the call shape of a
    transformers processor: `processor(text=..., images=..., return_tensors="pt", padding=...)`.

    The template's `<image>` becomes `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`
    (what Qwen2VLProcessor writes for one image of N merged tokens). pixel_values come back as
    (B, 3, H, W), the layout the vision graph takes: the image processor's flattened patches are
    put back into the image (`hf_pixel_values` is the inverse), so the pixels are its own.
    """

    def __init__(self, tokenizer, image_processor, image_size: tuple[int, int], tokens: int, vision_config):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_size, self.tokens = tuple(image_size), int(tokens)
        self.patch, self.temporal, self.merge = (vision_config.patch_size, vision_config.temporal_patch_size,
                                                 vision_config.spatial_merge_size)

    def expand(self, prompt: str) -> str:
        from vpexport.arch.layout import IMAGE_PLACEHOLDER

        return prompt.replace(IMAGE_PLACEHOLDER, VISION_START + IMAGE_PAD * self.tokens + VISION_END)

    def pixels(self, images):
        """(B, 3, H, W) float32 tensor. Every image is stretched to exactly H x W first (as the
        runtime's preprocessing does: Hugging Face's own resize keeps the aspect ratio and would give
        another grid), then the image processor rescales and normalizes it with a pixel budget that
        keeps that size."""
        from PIL import Image

        from vpexport.families.qwen_vision import exact_size_kwargs, image_from_patches

        h, w = self.image_size
        resample = Image.Resampling(int(getattr(self.image_processor.resample, "value", self.image_processor.resample)))
        images = [im.convert("RGB").resize((w, h), resample=resample) if im.size != (w, h) else im.convert("RGB")
                  for im in images]
        enc = self.image_processor(images=images, return_tensors="pt", **exact_size_kwargs(h, w))
        grid = enc["image_grid_thw"]
        if not bool((grid[:, 1] == h // self.patch).all() and (grid[:, 2] == w // self.patch).all()):
            raise UserInputError(f"the image processor resized to grid {grid[0].tolist()}, not {h}x{w}",
                                 field="model.image_size", fix="check preprocessor_config.json's min/max pixels")
        return image_from_patches(enc["pixel_values"], len(images), h, w, self.patch, self.temporal, self.merge)

    def __call__(self, text, images=None, return_tensors="pt", **kw):
        enc = self.tokenizer([self.expand(t) for t in text], return_tensors=return_tensors, **kw)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if images is not None:
            out["pixel_values"] = self.pixels(images)
        return out


"""LLaVA (transformers' `LlavaForConditionalGeneration`): a CLIP tower, a 2-layer projector and a
Llama / Mistral / Qwen2 decoder with 1-D RoPE.

The image size is the CLIP tower's own (`vision_config.image_size`); the visual tokens are its
patches (CLS dropped by the `default` select strategy), at positions prefix..prefix+N-1, the text
after them continues from prefix+N.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpexport.errors import RecipeError, UserInputError
from vpexport.families.base import BuiltinArch, ModelFamily, flat_features

@dataclass(frozen=True)
class ClipVisionSpec:
    hidden: int
    intermediate: int
    layers: int  # total layers in the tower
    heads: int
    image_size: int
    patch_size: int
    channels: int
    feature_layer: int  # LLaVA's vision_feature_layer (-2 = penultimate)
    select_strategy: str  # "default" drops CLS, "full" keeps it
    projector_layers: int = 2  # mlp2x_gelu

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_run(self) -> int:
        """Encoder layers actually evaluated to reach `feature_layer` (hidden_states[0] = embeddings)."""
        if self.feature_layer < 0:
            return self.layers + 1 + self.feature_layer
        return self.feature_layer

    @property
    def visual_tokens(self) -> int:
        return self.patches + (1 if self.select_strategy == "full" else 0)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def summary(self) -> str:
        return f"CLIP {self.layers} layers ({self.image_size}px/{self.patch_size})"

    def flops(self, text_hidden: int) -> dict[str, int]:
        """Per image: patch embedding, the encoder layers run (CLS included), the projector."""
        patches, dv, mv = self.patches, self.hidden, self.intermediate
        nv = patches + 1
        patch_embed = 2 * patches * (self.channels * self.patch_size * self.patch_size) * dv
        per_layer = 4 * 2 * nv * dv * dv + 2 * 2 * nv * nv * dv + 2 * 2 * nv * dv * mv
        n, d = self.visual_tokens, text_hidden
        return {"patch_embed": patch_embed, "encoder": self.layers_run * per_layer,
                "projector": 2 * n * dv * d + 2 * n * d * d}

    def params(self, text_hidden: int) -> dict[str, int]:
        """Weights only (biases and norms left out): the tower and the projector."""
        v, d = self, text_hidden
        vision = v.channels * v.patch_size**2 * v.hidden + (v.patches + 1) * v.hidden
        vision += v.layers * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate)
        return {"vision": vision, "projector": v.hidden * d + d * d}


_CLIP_L336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "model_type": "clip_vision_model",
    "projection_dim": 768,
}


def _llava15(hidden: int, inter: int, layers: int, heads: int) -> dict:
    """The public LLaVA-1.5 config.json contents."""
    return {
        "model_type": "llava",
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "vision_config": dict(_CLIP_L336),
        "text_config": {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
    }


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    text_families = ("llama", "mistral", "qwen2")
    positions = "rope"
    # `prompt_prefix_tokens`: the LLaVA-1.5 (Vicuna v1) system prompt + "USER: " with its tokenizer.
    builtins = {
        "llava-1.5-7b": BuiltinArch("llava-1.5-7b", "llava", _llava15(4096, 11008, 32, 32), prompt_prefix_tokens=35),
        "llava-1.5-13b": BuiltinArch("llava-1.5-13b", "llava", _llava15(5120, 13824, 40, 40), prompt_prefix_tokens=35),
    }

    # ---------------------------------------------------------------- torch-free
    def spec(self, cfg: dict, name: str = "model", image_size=None):
        from vpexport.arch.spec import ArchSpec, text_spec

        try:
            v = cfg["vision_config"]
        except KeyError:
            raise RecipeError("config.json has no 'vision_config': not a LLaVA-style checkpoint", field="model.path",
                              fix="point it at a LlavaForConditionalGeneration save_pretrained directory") from None
        self.image_size(cfg, image_size)
        feature_layer = cfg.get("vision_feature_layer", -2)
        if isinstance(feature_layer, list):
            raise RecipeError("multi-layer vision features are not supported", field="model.path",
                              fix="use a checkpoint with a single integer vision_feature_layer")
        vision = ClipVisionSpec(
            hidden=v["hidden_size"], intermediate=v["intermediate_size"], layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
            channels=v.get("num_channels", 3), feature_layer=feature_layer,
            select_strategy=cfg.get("vision_feature_select_strategy", "default"), projector_layers=2,
        )
        image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
        return ArchSpec(name=name, family=self.name, text=text_spec(cfg), vision=vision, image_token_id=int(image_token))

    def image_size(self, cfg: dict, requested=None) -> tuple[int, int]:
        s = int(cfg["vision_config"]["image_size"])
        if requested is not None and tuple(requested) != (s, s):
            raise RecipeError(f"model.image_size {list(requested)} differs from the CLIP tower's {s}x{s}",
                              field="model.image_size", fix=f"remove it (LLaVA's image size is fixed) or set [{s}, {s}]")
        return s, s

    # ---------------------------------------------------------------- torch
    def load(self, path: Path, dtype: str = "float32", image_size=None):
        """(model, processor); the model in eval mode with SDPA attention (never flash/flex: see research.md)."""
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from vpexport.families import quiet_bars_in_logs

        quiet_bars_in_logs()
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                path, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
            processor = AutoProcessor.from_pretrained(path)
            if getattr(processor, "image_processor", None) is not None:
                # The PIL backend, also where torchvision is installed: the artifacts' runtime
                # preprocessing reproduces PIL's resize, and torchvision's differs from it (up to
                # 2/255 per pixel, measured), which validation would report as a mismatch.
                from transformers import AutoImageProcessor

                processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError) as e:
            raise UserInputError(
                f"cannot load a LLaVA checkpoint from {path}: {str(e).splitlines()[0]}", field="model.path",
                fix="give a LlavaForConditionalGeneration save_pretrained directory with its processor files",
            ) from None
        self.image_size(model.config.to_dict(), image_size)
        processor.tokenizer.padding_side = "right"
        return model, processor

    def vision_graph(self, model, image_size=None):
        from vpexport.families.llava_vision import ClipVisionGraph

        self.image_size(model.config.to_dict(), image_size)
        return ClipVisionGraph(model)

    def head_positions(self, prefix: int, visual: int, grid=None):
        import torch

        return torch.arange(prefix + visual)

    def text_position_start(self, prefix: int, visual: int, grid=None) -> int:
        return prefix + visual

    def hf_image_features(self, model, pixel_values):
        cfg = model.config
        feats = model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return flat_features(feats)

    def preprocess_config(self, processor, image_size=None) -> dict:
        from vpexport.runtime.preprocess import processor_config

        return processor_config(processor.image_processor)

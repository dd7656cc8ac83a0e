"""Architecture numbers, read from a LLaVA `config.json` (or a built-in table) without torch.

Everything downstream (prune-schedule checks, FLOPs, KV bytes, static shapes) reads these
numbers; nothing else in the project knows how many layers or visual tokens a model has.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vpexport.errors import RecipeError


@dataclass(frozen=True)
class TextSpec:
    family: str  # text backbone model_type: llama | mistral | qwen2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool = False


@dataclass(frozen=True)
class VisionSpec:
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


@dataclass(frozen=True)
class ArchSpec:
    name: str
    text: TextSpec
    vision: VisionSpec
    image_token_id: int

    @property
    def visual_tokens(self) -> int:
        return self.vision.visual_tokens

    def to_dict(self) -> dict:
        return asdict(self) | {"visual_tokens": self.visual_tokens}

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model") -> "ArchSpec":
        """Build from a LlavaConfig as a dict (config.json contents or `config.to_dict()`)."""
        try:
            t = cfg["text_config"]
            v = cfg["vision_config"]
        except KeyError as e:
            raise RecipeError(
                f"config.json has no {e.args[0]!r}: not a LLaVA-style checkpoint",
                field="model.path",
                fix="point it at a LlavaForConditionalGeneration save_pretrained directory",
            ) from None
        heads = t["num_attention_heads"]
        hidden = t["hidden_size"]
        head_dim = t.get("head_dim") or hidden // heads
        family = t.get("model_type", "llama")
        feature_layer = cfg.get("vision_feature_layer", -2)
        if isinstance(feature_layer, list):
            raise RecipeError(
                "multi-layer vision features are not supported",
                field="model.path",
                fix="use a checkpoint with a single integer vision_feature_layer",
            )
        text = TextSpec(
            family=family,
            hidden=hidden,
            intermediate=t["intermediate_size"],
            layers=t["num_hidden_layers"],
            heads=heads,
            kv_heads=t.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab=t["vocab_size"],
            qkv_bias=family == "qwen2" or bool(t.get("attention_bias", False)),
        )
        vision = VisionSpec(
            hidden=v["hidden_size"],
            intermediate=v["intermediate_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            channels=v.get("num_channels", 3),
            feature_layer=feature_layer,
            select_strategy=cfg.get("vision_feature_select_strategy", "default"),
            projector_layers=2,
        )
        image_token = cfg.get("image_token_id", cfg.get("image_token_index"))
        return cls(name=name, text=text, vision=vision, image_token_id=int(image_token))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ArchSpec":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise RecipeError(
                f"no config.json in {path}",
                field="model.path",
                fix="give a directory written by save_pretrained (it holds config.json)",
            )
        return cls.from_hf_config(json.loads(cfg_file.read_text()), name=path.name)

"""Architecture numbers, read from a `config.json` (or a built-in table) without torch.

Everything downstream (prune-schedule checks, FLOPs, KV bytes, static shapes) reads these
numbers; nothing else in the project knows how many layers or visual tokens a model has. The
vision part is the family's own spec (vpexport/families): it knows its visual-token count, its
FLOPs and parameters for the static image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TextSpec:
    family: str  # text backbone model_type: llama | mistral | qwen2 | qwen2_vl_text | ...
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool = False


def text_spec(cfg: dict, qkv_bias: bool | None = None) -> TextSpec:
    """The decoder's numbers from a multimodal config: its `text_config`, or (older checkpoints) the
    top level. `qkv_bias`: the family's own rule where it has one."""
    t = cfg.get("text_config") or cfg
    # A missing key raises KeyError: the recipe loader names the file and the key.
    heads = t["num_attention_heads"]
    hidden = t["hidden_size"]
    family = t.get("model_type", "llama")
    return TextSpec(
        family=family, hidden=hidden, intermediate=t["intermediate_size"], layers=t["num_hidden_layers"],
        heads=heads, kv_heads=t.get("num_key_value_heads") or heads, head_dim=t.get("head_dim") or hidden // heads,
        vocab=t["vocab_size"],
        qkv_bias=qkv_bias if qkv_bias is not None else family == "qwen2" or bool(t.get("attention_bias", False)),
    )


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str  # the model family (vpexport/families)
    text: TextSpec
    vision: Any  # the family's vision spec: visual_tokens, image_hw, summary(), flops(d), params(d)
    image_token_id: int

    @property
    def visual_tokens(self) -> int:
        return self.vision.visual_tokens

    def to_dict(self) -> dict:
        d = asdict(self) | {"visual_tokens": self.visual_tokens}
        d["vision"]["summary"] = self.vision.summary()
        return d

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model", image_size=None) -> "ArchSpec":
        """From config.json contents (or `config.to_dict()`), by the family its model_type names."""
        from vpexport.families import family_for_config

        return family_for_config(cfg).spec(cfg, name, image_size)

    @classmethod
    def from_dir(cls, path: str | Path, image_size=None) -> "ArchSpec":
        from vpexport.families import read_config

        path = Path(path)
        return cls.from_hf_config(read_config(path), name=path.name, image_size=image_size)

"""Built-in architectures for weight-free planning (`vpexport plan`) and `testbed synth` stand-ins.

The configs are the public LLaVA-1.5 ones. `prompt_prefix_tokens` is the length of the
LLaVA-1.5 (Vicuna v1) system prompt with its tokenizer, used only when no tokenizer is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpexport.arch.spec import ArchSpec

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


@dataclass(frozen=True)
class BuiltinArch:
    name: str
    hf_config: dict
    prompt_prefix_tokens: int  # system prompt + "USER: " before the image, LLaVA-1.5 template

    def spec(self) -> ArchSpec:
        return ArchSpec.from_hf_config(self.hf_config, name=self.name)


BUILTIN_ARCHS: dict[str, BuiltinArch] = {
    "llava-1.5-7b": BuiltinArch("llava-1.5-7b", _llava15(4096, 11008, 32, 32), prompt_prefix_tokens=35),
    "llava-1.5-13b": BuiltinArch("llava-1.5-13b", _llava15(5120, 13824, 40, 40), prompt_prefix_tokens=35),
}

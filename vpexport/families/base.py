"""What a model family is: everything the pipeline needs to know about one kind of checkpoint.

A family (vpexport/families/<name>.py, registered once in vpexport/families/__init__.py) holds:
the numbers read from its `config.json` (`spec`, torch-free, for planning and FLOPs), loading a
`save_pretrained` folder (`load`), where the loaded model keeps its decoder parts (`adapter`), the
vision graph for the static image size (`vision_graph`), the decoder's positions for the static
prompt layout (`start_positions`, `text_position_start`: 1-D RoPE or M-RoPE), the Hugging Face
reference path for the image features (`hf_image_features`), the runtime's preprocessing
(`preprocess_config`), the built-in architectures for weight-free plans and random-weight stand-ins
(`builtins`) and its validation tolerances.

The rest of the pipeline asks the family and never a model class: the rewritten decoder
(vpexport/model/pruned.py) is the same for every family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class Tolerances:
    """Elementwise |a - b| <= atol + rtol * |b|; or, when `rel_l2` is set (reduced-precision
    runtimes, where single elements near zero carry no precision), per sample
    ||a - b||_2 <= rel_l2 * ||b||_2."""

    atol: float
    rtol: float
    rel_l2: float | None = None


# Logits compared after the same ops in another runtime, by precision.
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(atol=1e-4, rtol=1e-3),
    "fp16": Tolerances(atol=5e-2, rtol=5e-2),
    # bf16 keeps 8 significant bits (unit roundoff 2^-9); errors compound over the layers.
    "bf16": Tolerances(atol=1e-1, rtol=1e-1, rel_l2=5e-2),
}


@dataclass(frozen=True)
class BuiltinArch:
    """A public architecture by name: its config.json contents, for `vpexport plan` without weights
    and for `vpexport testbed synth` stand-ins."""

    name: str
    family: str
    hf_config: dict
    prompt_prefix_tokens: int  # tokens before the image in the family's default prompt, with its tokenizer
    image_size: tuple[int, int] | None = None  # the static image size of a dynamic-resolution family

    def spec(self, image_size=None):
        from vpexport.families import family

        return family(self.family).spec(self.hf_config, self.name, image_size or self.image_size)


class Adapter:
    """Where a loaded model keeps its decoder parts (weights are shared, never copied)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def embed_tokens(self):
        return self.language_model.embed_tokens

    @property
    def final_norm(self):
        return self.language_model.norm

    @property
    def rotary_emb(self):
        return self.language_model.rotary_emb

    @property
    def lm_head(self):
        return self.model.lm_head

    def attention_parts(self, layer):
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    def text_config(self):
        return self.config.text_config

    def sliding_window(self) -> int | None:
        """The attention window of the text backbone, None when attention is full. Qwen2-style configs
        carry a `sliding_window` size even when `use_sliding_window` is off; the flag decides."""
        tc = self.text_config()
        if getattr(tc, "use_sliding_window", True) is False:
            return None
        return getattr(tc, "sliding_window", None)

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.config, "image_token_id", None) or self.config.image_token_index)


class ModelFamily(ABC):
    name: ClassVar[str]  # the recipe- and manifest-facing name
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values this family loads
    text_families: ClassVar[tuple[str, ...]]  # text backbones (text_config.model_type) it supports
    positions: ClassVar[str]  # "rope" (1-D) or "mrope" (temporal / height / width channels)
    # The image size is fixed by the architecture (False) or by the recipe's model.image_size (True).
    dynamic_resolution: ClassVar[bool] = False
    tolerances: ClassVar[dict[str, Tolerances]] = DEFAULT_TOLERANCES
    # What the processor writes for the template's <image> before expanding its image token N times.
    image_text: ClassVar[str] = "<image>"
    adapter_class: ClassVar[type[Adapter]] = Adapter
    builtins: ClassVar[dict[str, BuiltinArch]] = {}

    # ---------------------------------------------------------------- torch-free
    @abstractmethod
    def spec(self, cfg: dict, name: str = "model", image_size=None):
        """ArchSpec from config.json contents; `image_size` (H, W) where the family needs one."""

    @abstractmethod
    def image_size(self, cfg: dict, requested=None) -> tuple[int, int]:
        """The static (H, W) the graphs are built for: the architecture's own, or the recipe's
        `model.image_size` (`requested`), checked against what the architecture allows."""

    # ---------------------------------------------------------------- torch
    @abstractmethod
    def load(self, path: Path, dtype: str, image_size=None):
        """(model in eval mode, processor) from a local save_pretrained folder."""

    def adapter(self, model) -> Adapter:
        return self.adapter_class(model)

    @abstractmethod
    def vision_graph(self, model, image_size=None):
        """nn.Module: (B, 3, H, W) normalized pixels -> (B, N, text hidden) visual tokens."""

    def visual_tokens(self, model, image_size=None) -> int:
        return self.vision_graph(model, image_size).tokens

    @abstractmethod
    def head_positions(self, prefix: int, visual: int, grid=None):
        """Positions of the static [prefix][visual] span, a LongTensor: (prefix + visual,) for 1-D
        RoPE, (prefix + visual, 3) for M-RoPE; `grid` the vision graph's (t, h, w) patch grid."""

    @abstractmethod
    def text_position_start(self, prefix: int, visual: int, grid=None) -> int:
        """The position of the first text token after the image (text and generated tokens continue
        from it one by one, the same in every position channel)."""

    @abstractmethod
    def hf_image_features(self, model, pixel_values):
        """(B * N, text hidden): Hugging Face's own image features for the processor's pixel_values
        (the reference the vision graph is validated against)."""

    @abstractmethod
    def preprocess_config(self, processor, image_size=None) -> dict:
        """The runtime's numpy preprocessing (vpexport/runtime/preprocess.py) for this processor."""


def synth_archs() -> list[str]:
    from vpexport.families import FAMILIES

    return sorted(a for f in FAMILIES.values() for a in f.builtins)


def flat_features(feats):
    """(total tokens, d) from whatever a Hugging Face `get_image_features` returns: a tensor, a list
    or tuple of per-image tensors, or an output object with `pooler_output`."""
    import torch

    if not torch.is_tensor(feats) and hasattr(feats, "pooler_output"):
        feats = feats.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)
    return feats.reshape(-1, feats.shape[-1])

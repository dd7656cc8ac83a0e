"""Per-architecture adapters: the only place that knows where a model family keeps its parts.

An adapter resolves, for a loaded Hugging Face model: the decoder layers and their attention /
MLP submodules, the embedding, final norm, rotary embedding, lm_head, the vision tower and
projector, the image token, and the numerical tolerances to validate against. The rewritten
model (vpexport/model/pruned.py) reads the weights through it and never copies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vpexport.errors import UserInputError


@dataclass(frozen=True)
class Tolerances:
    """Elementwise |a - b| <= atol + rtol * |b|; or, when `rel_l2` is set (reduced-precision
    runtimes, where single elements near zero carry no precision), per sample
    ||a - b||_2 <= rel_l2 * ||b||_2."""

    atol: float
    rtol: float
    rel_l2: float | None = None


class Adapter:
    """Base adapter: LLaVA-style models whose text backbone is a Llama-like decoder."""

    model_types: ClassVar[tuple[str, ...]] = ()
    text_families: ClassVar[tuple[str, ...]] = ()
    # Validation tolerances by precision (logits compared after the same ops in another runtime).
    tolerances: ClassVar[dict[str, Tolerances]] = {
        "fp32": Tolerances(atol=1e-4, rtol=1e-3),
        "fp16": Tolerances(atol=5e-2, rtol=5e-2),
        # bf16 keeps 8 significant bits (unit roundoff 2^-9); errors compound over the layers.
        "bf16": Tolerances(atol=1e-1, rtol=1e-1, rel_l2=5e-2),
    }

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # --- text decoder ---
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
        tc = self.text_config()
        if tc.model_type == "qwen2" and not getattr(tc, "use_sliding_window", False):
            return None
        return getattr(tc, "sliding_window", None)

    # --- vision ---
    @property
    def vision_model(self):
        vt = self.model.model.vision_tower
        return getattr(vt, "vision_model", vt)

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    def vision_feature_layer(self) -> int:
        return self.config.vision_feature_layer

    def drops_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.config, "image_token_id", None) or self.config.image_token_index)


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    text_families = ("llama", "mistral", "qwen2")


# The adapter table: every supported family is registered here once.
ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter,)


def supported() -> list[str]:
    return [f"{mt}/{tf}" for a in ADAPTERS for mt in a.model_types for tf in a.text_families]


def adapter_for(model) -> Adapter:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    tf = getattr(getattr(cfg, "text_config", None), "model_type", None)
    for cls in ADAPTERS:
        if mt in cls.model_types and tf in cls.text_families:
            return cls(model)
    raise UserInputError(
        f"no adapter for model_type={mt!r} with text backbone {tf!r}",
        field="model.path",
        fix=f"supported: {', '.join(supported())}",
    )

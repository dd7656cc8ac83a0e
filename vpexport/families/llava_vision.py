"""LLaVA's vision graph (torch): the CLIP tower up to `vision_feature_layer` and the projector."""

from __future__ import annotations

import torch
from torch import nn


class ClipVisionGraph(nn.Module):
    """(B, 3, S, S) normalized pixels -> (B, N, text hidden). Layers after `vision_feature_layer`
    are not evaluated; the CLS token is dropped by the `default` select strategy."""

    grid = None  # positions do not depend on the image layout (1-D RoPE)

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        vt = model.model.vision_tower
        self.vision = getattr(vt, "vision_model", vt)
        self.projector = model.model.multi_modal_projector
        vfl = cfg.vision_feature_layer
        n_layers = len(self.vision.encoder.layers)
        self.layers_run = n_layers + 1 + vfl if vfl < 0 else vfl
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        vc = cfg.vision_config
        self.tokens = (vc.image_size // vc.patch_size) ** 2 + (0 if self.drop_cls else 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))
        for layer in vm.encoder.layers[: self.layers_run]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        if self.drop_cls:
            h = h[:, 1:]
        return self.projector(h)

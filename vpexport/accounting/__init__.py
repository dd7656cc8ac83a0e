"""FLOPs and memory accounting from ArchSpec + Schedule + PromptLayout (pure Python, no torch)."""

from vpexport.accounting.flops import (
    decode_step_flops,
    decoder_layer_flops,
    paper_flops,
    paper_layer_flops,
    prefill_flops,
    scoring_flops,
    vision_flops,
)
from vpexport.accounting.memory import dtype_bytes, kv_cache_bytes, weight_bytes, weight_params

__all__ = [
    "decode_step_flops",
    "decoder_layer_flops",
    "paper_flops",
    "paper_layer_flops",
    "prefill_flops",
    "scoring_flops",
    "vision_flops",
    "dtype_bytes",
    "kv_cache_bytes",
    "weight_bytes",
    "weight_params",
]

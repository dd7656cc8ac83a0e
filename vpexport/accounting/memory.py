"""KV-cache (and weight) memory accounting. Pure Python (no torch).

KV cache per decoder layer l: 2 (K and V) * KV_heads * head_dim * n_l * bytes(dtype) * batch,
with n_l = prefix + visual_l + text (+ generated tokens): layers after a prune point cache only
the kept visual tokens, so the pruned cache is smaller for every decode step.
"""

from __future__ import annotations

from vpexport.arch.layout import PromptLayout
from vpexport.arch.spec import ArchSpec
from vpexport.pruning.schedule import Schedule

DTYPE_BYTES = {
    "float32": 4, "fp32": 4,
    "float16": 2, "fp16": 2,
    "bfloat16": 2, "bf16": 2,
    "int8": 1, "fp8": 1,
}  # fmt: skip


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}") from None


def kv_cache_bytes(
    arch: ArchSpec, schedule: Schedule | None, layout: PromptLayout, dtype: str = "float16", generated: int = 0
) -> dict:
    """KV-cache bytes after prefill (+ `generated` decoded tokens), dense vs pruned, per layer."""
    t, L, b = arch.text, arch.text.layers, layout.batch
    per_token = 2 * t.kv_heads * t.head_dim * dtype_bytes(dtype) * b
    vis = (schedule or Schedule("none")).visual_per_layer(L, layout.visual)
    ns = [layout.prefix + v + layout.text + generated for v in vis]
    dense_n = layout.prefix + layout.visual + layout.text + generated
    per_layer = [n * per_token for n in ns]
    dense, pruned = L * dense_n * per_token, sum(per_layer)
    return {
        "dtype": dtype,
        "generated": generated,
        "kv_len_per_layer": ns,
        "per_layer_bytes": per_layer,
        "dense_bytes": dense,
        "pruned_bytes": pruned,
        "ratio": pruned / dense,
    }


def weight_params(arch: ArchSpec) -> dict[str, int]:
    """Parameter counts (weights only, biases and norms ignored except where noted)."""
    t = arch.text
    qd, kvd = t.heads * t.head_dim, t.kv_heads * t.head_dim
    decoder = t.layers * (t.hidden * qd * 2 + t.hidden * kvd * 2 + 3 * t.hidden * t.intermediate)
    embed = 2 * t.vocab * t.hidden  # input embeddings + lm_head (counted untied)
    v = arch.vision.params(t.hidden)
    return {"decoder": decoder, "embeddings": embed, "vision": v["vision"], "projector": v["projector"],
            "total": decoder + embed + v["vision"] + v["projector"]}  # fmt: skip


def weight_bytes(arch: ArchSpec, dtype: str = "float16") -> int:
    return weight_params(arch)["total"] * dtype_bytes(dtype)


def prefill_transient_bytes(arch: ArchSpec, layout: PromptLayout, dtype: str = "float32") -> int:
    """Peak temporary bytes of one sample's unpruned PyTorch prefill (the widest layer's working
    set), for sizing a batch to a device's memory: attention scores (f32, the scoring rules read
    them, plus their softmax), the MLP's gate / up / product, and a few hidden-state copies."""
    t, seq, b = arch.text, layout.total, dtype_bytes(dtype)
    scores = 2 * t.heads * seq * seq * 4
    mlp = 3 * seq * t.intermediate * b
    hidden = 8 * seq * t.hidden * b
    return scores + mlp + hidden

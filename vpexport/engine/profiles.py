"""TensorRT optimization profiles from `runtime/generation.json`. Pure Python, no TensorRT.

The exporter (vpexport/export/onnx_export.py) names its dynamic axes:

  every graph   axis 0 `batch`                          -> 1 .. batch_max
  prefill       input_ids / attention_mask axis 1 `sequence` (text mode dynamic only):
                L = prefix + visual + T, T in 1 .. text_length.max (with buckets: T from the
                smallest bucket, opt at the smallest bucket)
  decode        text_mask axis 1 `text_total`: the caches' text slots C = T + steps, steps =
                max_new_tokens - 1 for a request (one step of headroom is added)
                past.{i}.key / value axis 2 `past_len.{i}`: kv_static_len[i] + C

Each axis gets (min, opt, max); opt is a sensible middle (batch: (max + 1) // 2; lengths: the
middle of the text range and half of the new tokens), where TensorRT tunes its tactics.
A symbol this module does not know raises ArtifactError: a range is never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vpexport.errors import ArtifactError

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class LengthSpec:
    batch_max: int
    prefix: int
    visual: int
    text_mode: str  # "padded" | "dynamic"
    text_max: int
    max_new_tokens: int
    kv_static_len: tuple[int, ...]  # per decoder layer: prefix + visual tokens kept at that layer
    text_buckets: tuple[int, ...] | None = None  # the text widths the runtime pads to (dynamic mode)

    @classmethod
    def from_generation(cls, gen: dict, where: str = "runtime/generation.json") -> "LengthSpec":
        from vpexport.runtime.text_length import TextLength

        tl = TextLength.from_generation(gen, where)  # the one reader of text_length (mode, max, buckets)
        try:
            spec = cls(
                batch_max=int(gen["batch_max"]),
                prefix=int(gen["prefix"]),
                visual=int(gen["visual_tokens"]),
                text_mode=tl.mode,
                text_max=tl.max,
                text_buckets=tl.buckets,
                max_new_tokens=int(gen["max_new_tokens"]),
                kv_static_len=tuple(int(x) for x in gen["kv_static_len"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{where} lacks the shape information for engine profiles ({type(e).__name__}: {e})",
                field="artifacts",
                fix="re-run `vpexport export RECIPE`",
            ) from None
        if min(spec.batch_max, spec.text_max, spec.max_new_tokens) < 1:
            raise ArtifactError(f"{where}: batch_max, text_length.max and max_new_tokens must be >= 1", field="artifacts", fix="re-run `vpexport export RECIPE`")
        return spec

    # ---- the ranges
    def batch(self) -> Range:
        return (1, max(1, (self.batch_max + 1) // 2), self.batch_max)

    def text(self) -> Range:
        """Tokens after the image (T)."""
        if self.text_mode == "padded":
            return (self.text_max,) * 3
        if self.text_buckets:  # requests run at a bucket: tune for the smallest (short questions)
            return (self.text_buckets[0], self.text_buckets[0], self.text_max)
        return (1, max(1, (self.text_max + 1) // 2), self.text_max)

    def sequence(self) -> Range:
        """Prefill sequence length L = prefix + visual + T."""
        base = self.prefix + self.visual
        return tuple(base + t for t in self.text())  # type: ignore[return-value]

    def text_total(self) -> Range:
        """Decode cache text slots C = T + steps, steps = 1 .. max_new_tokens (one of headroom)."""
        tmin, topt, tmax = self.text()
        return (tmin + 1, topt + max(1, self.max_new_tokens // 2), tmax + self.max_new_tokens)

    def past_len(self, layer: int) -> Range:
        if not 0 <= layer < len(self.kv_static_len):
            raise ArtifactError(
                f"past_len.{layer}: generation.json lists {len(self.kv_static_len)} layers",
                field="artifacts",
                fix="re-run `vpexport export RECIPE`",
            )
        s = self.kv_static_len[layer]
        return tuple(s + x for x in self.text_total())  # type: ignore[return-value]

    def symbol(self, sym: str) -> Range | None:
        if sym == "batch":
            return self.batch()
        if sym == "sequence":
            return self.sequence()
        if sym == "text_total":
            return self.text_total()
        m = re.fullmatch(r"past_len\.(\d+)", sym)
        if m:
            return self.past_len(int(m.group(1)))
        return None


def _is_dynamic(d) -> bool:
    return not (isinstance(d, int) and d > 0)


def _fallback_symbol(segment: str, name: str, axis: int) -> str | None:
    """The role of an axis exported without a symbolic name (dim_param lost, or -1 from TensorRT)."""
    if axis == 0:
        return "batch"
    if segment == "prefill" and name in ("input_ids", "attention_mask") and axis == 1:
        return "sequence"
    if segment == "decode" and name == "text_mask" and axis == 1:
        return "text_total"
    m = re.fullmatch(r"past\.(\d+)\.(key|value)", name)
    if segment == "decode" and m and axis == 2:
        return f"past_len.{m.group(1)}"
    return None


def compute_profile(segment: str, inputs, spec: LengthSpec) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for every input with a dynamic axis.

    `inputs`: [{"name", "shape"}] (as in the manifest's export.graphs) or {name: shape}; a shape
    lists ints for static axes and a symbol string / None / -1 for dynamic ones.
    """
    items = inputs.items() if isinstance(inputs, dict) else [(i["name"], i["shape"]) for i in inputs]
    out: dict[str, dict[str, list[int]]] = {}
    for name, shape in items:
        if shape is None:
            raise ArtifactError(f"{segment}.onnx input {name} has no shape", field="artifacts", fix="re-run `vpexport export RECIPE`")
        if not any(_is_dynamic(d) for d in shape):
            continue
        mins: list[int] = []
        opts: list[int] = []
        maxs: list[int] = []
        for axis, d in enumerate(shape):
            if not _is_dynamic(d):
                for side in (mins, opts, maxs):
                    side.append(d)
                continue
            sym = d if isinstance(d, str) and d else _fallback_symbol(segment, name, axis)
            r = spec.symbol(sym) if sym else None
            if r is None:
                fb = _fallback_symbol(segment, name, axis)
                r = spec.symbol(fb) if fb else None
            if r is None:
                raise ArtifactError(
                    f"{segment}.onnx input {name} axis {axis} is dynamic ({d!r}) and has no known range",
                    field="artifacts",
                    fix="re-export with vpexport export (axes batch, sequence, text_total, past_len.i)",
                )
            lo, mid, hi = r
            mins.append(lo)
            opts.append(mid)
            maxs.append(hi)
        out[name] = {"min": mins, "opt": opts, "max": maxs}
    return out


def check_within(profile: dict, shapes: dict, where: str = "engine") -> str | None:
    """None if every shape is inside its profile's [min, max], else a one-line reason."""
    for name, shape in shapes.items():
        p = profile.get(name)
        if p is None:
            continue
        for axis, (v, lo, hi) in enumerate(zip(shape, p["min"], p["max"])):
            if not lo <= v <= hi:
                return f"{where}: input {name} axis {axis} is {v}, outside the engine's profile range {lo}..{hi}"
    return None

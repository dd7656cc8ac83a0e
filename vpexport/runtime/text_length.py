"""The text part's length: what the graphs are run at, from `generation.json: text_length` (no torch).

    mode padded             the graphs' text axis is static: every request is padded to `max`
    mode dynamic            the text axis is dynamic: a batch runs at its longest text
    mode dynamic + buckets  padded up to the smallest bucket that holds the longest text (`max`
                            is always the last bucket)

Buckets exist for the runtimes that compile per input shape (OpenVINO here, TensorRT profiles):
a few fixed shapes compile once each and are reused, while padding a short question to `max`
would run the whole prompt's padding through every layer. On the LLaVA-1.5-scale stand-in a
typical question is 7-10 tokens; padded to 48 that is about a fifth more prefill work in the
layers after the last prune point, where text dominates the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpexport.errors import ArtifactError, UserInputError


def text_length_meta(section) -> dict:
    """`generation.json` / manifest form of the recipe's `export.text_length`."""
    meta = {"mode": section.mode, "max": int(section.max)}
    widths = section.widths()
    if widths is not None:
        meta["buckets"] = widths
    return meta


@dataclass(frozen=True)
class TextLength:
    mode: str  # "padded" | "dynamic"
    max: int
    buckets: tuple[int, ...] | None = None  # increasing, ending at max; dynamic mode only

    @classmethod
    def from_generation(cls, gen: dict, where: str = "runtime/generation.json") -> "TextLength":
        try:
            tl = gen["text_length"]
            mode, mx = str(tl["mode"]), int(tl["max"])
            buckets = tuple(int(b) for b in tl["buckets"]) if tl.get("buckets") is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: text_length is incomplete ({type(e).__name__}: {e})", field="artifacts",
                                fix="re-run `vpexport export RECIPE`") from None
        if mode not in ("padded", "dynamic"):
            raise ArtifactError(f"{where}: unknown text_length.mode {mode!r}", field="artifacts",
                                fix="re-run `vpexport export RECIPE`")
        if buckets is not None and (mode != "dynamic" or not buckets or list(buckets) != sorted(set(buckets))
                                    or buckets[0] < 1 or buckets[-1] != mx):
            raise ArtifactError(f"{where}: text_length.buckets {list(buckets)} is not an increasing list ending at "
                                f"max {mx} in dynamic mode", field="artifacts", fix="re-run `vpexport export RECIPE`")
        return cls(mode, mx, buckets)

    def width(self, longest: int) -> int:
        """The text length a batch whose longest text is `longest` tokens runs at (longest <= max)."""
        if self.mode == "padded":
            return self.max
        if self.buckets is None:
            return longest
        return next(b for b in self.buckets if b >= longest)

    def widths(self) -> tuple[int, ...]:
        """Every text length the graphs can be run at with a static shape (all of 1..max without buckets)."""
        if self.mode == "padded":
            return (self.max,)
        return self.buckets if self.buckets is not None else tuple(range(1, self.max + 1))


def check_text_fits(longest: int, text_max: int, fix: str) -> None:
    """UserInputError (exit 2) when a prompt's text after the image is longer than the graphs take."""
    if longest > text_max:
        raise UserInputError(f"the prompt has {longest} tokens after the image, more than export.text_length.max ({text_max})",
                             field="--prompt", fix=fix.format(longest=longest))

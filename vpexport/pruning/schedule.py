"""Prune schedules: an ordered list of prune points with static keep-budgets.

Convention (all methods): a prune point at layer K scores visual tokens with what layer K-1
computed (its attention, or its value contributions) and hands only the kept tokens to layer K.
So K >= 1, and segment boundaries are exactly the prune layers. The rules a point can name are
the registered methods' rules (vpexport/methods).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vpexport.errors import ScheduleError

@dataclass(frozen=True)
class PrunePoint:
    layer: int
    keep: int
    rule: str


@dataclass(frozen=True)
class Segment:
    start: int  # first decoder layer (inclusive)
    end: int  # last decoder layer (exclusive)
    visual_tokens: int


@dataclass(frozen=True)
class Schedule:
    method: str
    points: tuple[PrunePoint, ...] = ()
    sink_layers: int = 0  # VisiPruner shallow stage: layers [0, sink_layers) hide visual keys from text queries
    seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def check(self, num_layers: int, visual_tokens: int, where: str = "pruning.points") -> None:
        """Raise ScheduleError naming the first bad field."""
        from vpexport.methods import RULES  # the table imports this module

        prev_layer, prev_keep = 0, visual_tokens
        for i, p in enumerate(self.points):
            f = f"{where}[{i}]"
            if p.rule not in RULES:
                raise ScheduleError(f"unknown rule {p.rule!r}", field=f"{f}.rule", fix=f"use one of {sorted(RULES)}")
            pre = RULES[p.rule].pre_llm
            if pre and p.layer != 0:
                raise ScheduleError(
                    f"rule {p.rule} prunes before the decoder, at layer 0 (got {p.layer})",
                    field=f"{f}.layer",
                    fix="set layer: 0",
                )
            if not pre and not 1 <= p.layer < num_layers:
                raise ScheduleError(
                    f"layer {p.layer} is out of range for a {num_layers}-layer decoder",
                    field=f"{f}.layer",
                    fix=f"choose 1..{num_layers - 1} (a point at layer K scores with layer K-1)",
                )
            if p.layer <= prev_layer and i > 0:
                raise ScheduleError(
                    f"layer {p.layer} does not come after the previous point's layer {prev_layer}",
                    field=f"{f}.layer",
                    fix="list prune points in strictly increasing layer order",
                )
            if RULES[p.rule].kind == "drop":
                if p.keep != 0:
                    raise ScheduleError(f"{p.rule} must keep 0 tokens", field=f"{f}.keep", fix="set keep: 0")
            elif p.keep <= 0:
                raise ScheduleError(
                    f"keep={p.keep} must be positive",
                    field=f"{f}.keep",
                    fix="use rule drop_all with keep 0 to drop all visual tokens, or keep >= 1",
                )
            if p.keep > prev_keep:
                raise ScheduleError(
                    f"keep={p.keep} is more than the {prev_keep} visual tokens present at layer {p.layer}",
                    field=f"{f}.keep",
                    fix=f"keep at most {prev_keep}",
                )
            if prev_keep == 0:
                raise ScheduleError(
                    "no visual tokens are left to prune here", field=f"{f}", fix="remove points after a drop_all"
                )
            prev_layer, prev_keep = p.layer, p.keep
        if not 0 <= self.sink_layers < num_layers:
            raise ScheduleError(
                f"sink_layers={self.sink_layers} out of range",
                field="pruning.sink_layers",
                fix=f"use 0..{num_layers - 1}",
            )
        scored = [p for p in self.points if not RULES[p.rule].pre_llm]
        if scored and self.sink_layers >= scored[0].layer:
            # The first in-decoder point scores with layer K-1, which must see the visual tokens unmasked.
            raise ScheduleError(
                "the shallow sink stage must end before the layer that scores the first prune point",
                field="pruning.sink_layers",
                fix=f"use at most {scored[0].layer - 1}",
            )

    def visual_per_layer(self, num_layers: int, visual_tokens: int) -> list[int]:
        counts, n, pts = [], visual_tokens, {p.layer: p.keep for p in self.points}
        for layer in range(num_layers):
            n = pts.get(layer, n)
            counts.append(n)
        return counts

    def segments(self, num_layers: int, visual_tokens: int) -> list[Segment]:
        """The decoder's runs of layers with a static visual-token count (a point at layer 0, before
        the decoder, leaves no layer with the full count)."""
        bounds = [0] + [p.layer for p in self.points] + [num_layers]
        keeps = [visual_tokens] + [p.keep for p in self.points]
        return [Segment(bounds[i], bounds[i + 1], keeps[i]) for i in range(len(keeps)) if bounds[i] < bounds[i + 1]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [asdict(p) for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(
            method=d["method"],
            points=tuple(PrunePoint(**p) for p in d.get("points", [])),
            sink_layers=d.get("sink_layers", 0),
            seed=d.get("seed", 0),
            meta=d.get("meta", {}),
        )

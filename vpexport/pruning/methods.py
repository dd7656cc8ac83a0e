"""The pruning-method table: every method is registered here once.

Recipe validation, `--help`, `vpexport plan`, calibration and the docs all read METHODS.
A method fixes the scoring rule of each prune point; a recipe supplies layers and budgets
(or asks calibration to find them). Published defaults are given for a 32-layer LLaVA-1.5
decoder with 576 visual tokens and are scaled by depth and token count for other models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vpexport.pruning.schedule import PrunePoint, Schedule

REF_LAYERS = 32
REF_VISUAL = 576


def _layer(k: int, num_layers: int) -> int:
    return max(1, min(num_layers - 1, round(k * num_layers / REF_LAYERS)))


def _keep(k: int, visual: int) -> int:
    return max(1, round(k * visual / REF_VISUAL))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    rules: tuple[str, ...]  # the rule of each prune point, in order
    uses_sink: bool  # whether `sink_layers` is meaningful
    default: Callable[[int, int, str], Schedule]  # (num_layers, visual_tokens, task) -> published default
    reference: str

    def schedule(self, points: list[tuple[int, int]], sink_layers: int = 0, seed: int = 0, meta=None) -> Schedule:
        """Build a schedule from (layer, keep) pairs; the rules come from this table."""
        return Schedule(
            method=self.name,
            points=tuple(PrunePoint(layer=l, keep=k, rule=r) for (l, k), r in zip(points, self.rules)),
            sink_layers=sink_layers,
            seed=seed,
            meta=meta or {},
        )


def _fastv_default(layers: int, visual: int, task: str) -> Schedule:
    return METHODS["fastv"].schedule([(_layer(3, layers), _keep(288, visual))], meta={"published": "FastV K=3 R=50%"})


def _himap_default(layers: int, visual: int, task: str) -> Schedule:
    k2 = 8 if task == "vqa" else 15
    k1l, k2l = _layer(2, layers), _layer(k2, layers)
    if k2l <= k1l:
        k2l = min(layers - 1, k1l + 1)
    return METHODS["himap"].schedule(
        [(k1l, _keep(288, visual)), (k2l, _keep(72, visual))],
        meta={"published": f"HiMAP K1=2 keep 288, K2={k2} keep 72 ({task})"},
    )


def _visipruner_default(layers: int, visual: int, task: str) -> Schedule:
    fusion, exit_ = _layer(9, layers), _layer(24, layers)
    if exit_ <= fusion:
        exit_ = min(layers - 1, fusion + 1)
    return METHODS["visipruner"].schedule(
        [(fusion, _keep(10, visual)), (exit_, 0)],
        sink_layers=min(_layer(6, layers), fusion - 1),
        meta={"published": "VisiPruner 7B layout: sink < 6, ~10 fusion tokens, exit ~24 (static form)"},
    )


def _single_default(name: str, k: int, keep: int) -> Callable[[int, int, str], Schedule]:
    def f(layers: int, visual: int, task: str) -> Schedule:
        return METHODS[name].schedule([(_layer(k, layers), _keep(keep, visual))], meta={"published": f"K={k} keep {keep}/576"})

    return f


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("none", "no pruning (the dense baseline)", (), False, lambda l, v, t: Schedule("none"), "-"),
        MethodSpec(
            "fastv",
            "one point; rank visual tokens by the last token's attention at layer K-1",
            ("last_token_attention",),
            False,
            _fastv_default,
            "FastV (Chen et al., 2024)",
        ),
        MethodSpec(
            "himap",
            "two points; text->visual attention at K1, visual->visual attention at K2",
            ("text_attention", "visual_attention"),
            False,
            _himap_default,
            "HiMAP, 'Lifting the Veil' (seed 002)",
        ),
        MethodSpec(
            "visipruner",
            "shallow sink stage, fusion-layer keep-k by value contribution, exit layer drops all",
            ("value_contribution", "drop_all"),
            True,
            _visipruner_default,
            "VisiPruner (seeds 000, 001), static form",
        ),
        MethodSpec(
            "random", "one point; a fixed random subset (baseline)", ("random",), False, _single_default("random", 2, 144), "-"
        ),
        MethodSpec(
            "uniform",
            "one point; a spatially strided subset (baseline)",
            ("uniform",),
            False,
            _single_default("uniform", 2, 144),
            "-",
        ),
    ]
}

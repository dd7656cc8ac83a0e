"""The pruning-method table: every method is registered here once.

Recipe validation, `--help`, `vpexport plan`, calibration, the model rewrite, the FLOPs accounting
and the docs all read METHODS (and RULES, the rules of its methods). Adding a method is a module
with its `Method` subclass (vpexport/methods/base.py says what it holds) and one line below.
"""

from __future__ import annotations

from vpexport.methods.base import Method, Rule
from vpexport.methods.baselines import NoPruning, Random, Uniform
from vpexport.methods.cdpruner import CDPruner
from vpexport.methods.dart import DART, DARTProjector
from vpexport.methods.divprune import DivPrune, DivPruneExit
from vpexport.methods.fastv import FastV
from vpexport.methods.himap import HiMAP
from vpexport.methods.visipruner import VisiPruner

METHODS: dict[str, Method] = {m.name: m for m in (
    NoPruning(),
    FastV(),
    HiMAP(),
    VisiPruner(),
    DART(),
    DARTProjector(),
    DivPrune(),
    DivPruneExit(),
    CDPruner(),
    Random(),
    Uniform(),
)}

RULES: dict[str, Rule] = {r.name: r for m in METHODS.values() for r in m.rules}


def auto_candidates() -> list[str]:
    """The methods `pruning.method: auto` calibrates and compares, in table order."""
    return [name for name, m in METHODS.items() if not m.baseline]


def baseline_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.baseline]


def scoring_rules() -> list[str]:
    """Rules that score from layer K-1's tensors (calibration records their scores per layer)."""
    return [name for name, r in RULES.items() if r.kind == "score"]

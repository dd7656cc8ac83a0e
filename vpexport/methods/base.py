"""What a pruning method is: its prune points' rules, its published default, its calibration grid.

A **rule** decides which visual tokens one prune point keeps. A point at layer K reads what layer
K-1 computed (its attention, its values); it hands only the kept tokens to layer K, so K >= 1 and
the segment boundaries are exactly the prune layers. A pre-LLM rule (`pre_llm`) instead reads the
projector's output and its point sits at layer 0, before the decoder. A rule is one of three kinds:

    score   (`ScoreRule`) a (B, n) score per visual token, computed inside the graph from layer
            K-1's tensors; the point keeps the top `keep` (TopK + Gather, static k)
    fixed   (`FixedRule`) an index set fixed when the model is built (the baselines), no scoring
    drop    (`DropAll`) drops every remaining visual token (keep 0)

Each rule states the FLOPs its scoring adds (`flops`, counted by the accounting); a score rule
also a plain per-sample reference of its maths (`reference`, what the tests compare the graphs' kept indices
with).

A **method** is an ordered tuple of rules (one per prune point), its published default schedule,
the options its recipe section takes, and the coarse grid calibration searches. Methods are
registered once, in `vpexport/methods/__init__.py`.

Everything torch-related is imported inside the functions: recipes are validated from this table
before any weights (or torch) load.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from vpexport.pruning.schedule import PrunePoint, Schedule

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vpexport.accounting.flops import TextSpec

# Published defaults are given for a 32-layer LLaVA-1.5 decoder with 576 visual tokens and are
# scaled by depth and token count for other models.
REF_LAYERS = 32
REF_VISUAL = 576


def scaled_layer(k: int, num_layers: int) -> int:
    return max(1, min(num_layers - 1, round(k * num_layers / REF_LAYERS)))


def scaled_keep(k: int, visual: int) -> int:
    return max(1, round(k * visual / REF_VISUAL))


# --------------------------------------------------------------------------- tensors a rule reads
@dataclass
class ScoreInputs:
    """Layer K-1's tensors for a point at K. q (B, H, L, hd) and k, v (B, H, L, hd) after RoPE with
    the KV heads repeated; `allowed` (B, 1, L, L) the boolean attention mask; `key_valid` (B, L);
    `last_idx` (B,) each sample's last valid position; the visual span is [p, p + n). `h_out`
    (B, L, d) is layer K-1's output (the hidden state entering layer K) and `final_norm` the
    decoder's final norm, for rules that compare hidden states."""

    q: "torch.Tensor | None"
    k: "torch.Tensor"
    v: "torch.Tensor | None"
    allowed: "torch.Tensor | None"
    key_valid: "torch.Tensor"
    last_idx: "torch.Tensor"
    p: int
    n: int
    h_out: "torch.Tensor | None" = None
    final_norm: Any = None


@dataclass
class ReferenceInputs:
    """One sample's layer K-1, for the plain references: `probs` (H, L, L) the full attention
    probabilities, `k` and `v` (H, L, hd) its post-RoPE keys and values, `hidden` (L, d) its output
    after the decoder's final norm, `last` the last position, `text_valid` one flag per text token,
    `keep` the point's budget."""

    probs: "torch.Tensor"
    v: "torch.Tensor"
    p: int
    n: int
    last: int
    text_valid: list
    k: "torch.Tensor | None" = None
    hidden: "torch.Tensor | None" = None
    keep: int = 0
    features: "torch.Tensor | None" = None  # (n, d) the projector's output, for pre-LLM rules
    sequence: "torch.Tensor | None" = None  # (L, d) the valid embedded sequence entering layer 0 (pre-LLM rules)


def attention_probs(q_rows, k, allowed_rows):
    """softmax(q_rows k^T / sqrt(hd)) over the allowed keys, in f32. Only the query rows a rule
    needs are passed, so the layer's own attention stays one fused computation."""
    import torch

    scale = 1.0 / math.sqrt(q_rows.shape[-1])
    logits = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed_rows, torch.finfo(logits.dtype).min)
    return torch.softmax(logits.float(), dim=-1)


def gather_rows(x, idx):
    """x (B, H|1, L, D), idx (B, R) -> (B, H|1, R, D)."""
    import torch

    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))


# --------------------------------------------------------------------------- rules
class Rule:
    """What every rule states; a rule is a `ScoreRule`, a `FixedRule` or `DropAll` (its `kind`)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str]  # score | fixed | drop
    # A rule whose choice depends on the budget itself (a greedy selection rather than a ranking)
    # returns a 0/1 score with exactly `keep` ones; calibration then scores it per candidate
    # instead of once per layer.
    keep_dependent: ClassVar[bool] = False
    # A pre-LLM rule scores the projector's output (the visual tokens entering decoder layer 0):
    # its point sits at layer 0, reads `ScoreInputs.h_out` as those features and nothing else.
    pre_llm: ClassVar[bool] = False

    def flops(self, t: "TextSpec", n: int, text: int, visual_in: int, keep: int = 0) -> int:
        """Extra FLOPs of this point's scoring per sample: `n` tokens at layer K-1, `text` text
        tokens, `visual_in` visual tokens present, `keep` the point's budget (for a greedy
        selection whose cost grows with it)."""
        return 0


class ScoreRule(Rule, ABC):
    kind = "score"

    @abstractmethod
    def score(self, x: ScoreInputs, keep: int) -> "torch.Tensor":
        """(B, n) importance of each visual token present (the point keeps the `keep` highest)."""

    @abstractmethod
    def reference(self, x: ReferenceInputs) -> "torch.Tensor":
        """(n,) the same scores as `score`, written plainly for one sample (the tests compare the
        kept indices of the two)."""


class FixedRule(Rule, ABC):
    kind = "fixed"

    @abstractmethod
    def fixed_indices(self, n: int, keep: int, seed: int) -> "torch.Tensor":
        """The `keep` indices (of `n` visual tokens) this point keeps, whatever the input."""


class DropAll(Rule):
    name = "drop_all"
    summary = "drop every remaining visual token (keep must be 0; VisiPruner exit)"
    kind = "drop"


# --------------------------------------------------------------------------- methods
class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = "-"
    rules: ClassVar[tuple[Rule, ...]] = ()  # the rule of each prune point, in order
    uses_sink: ClassVar[bool] = False  # whether `sink_layers` (VisiPruner's shallow stage) applies
    # Baselines are never chosen by `method: auto` and are not calibrated (their points are given),
    # but the calibration report measures their published defaults next to the chosen schedule.
    baseline: ClassVar[bool] = False
    # Whether the calibration report re-runs the calibrator at this method's published FLOPs
    # (the equal-FLOPs rows).
    compared_at_equal_flops: ClassVar[bool] = False
    # The method's own recipe keys under `pruning:` besides method / points / seed / calibrate,
    # as pydantic field definitions {name: (type, Field(...))}; the recipe schema builds the
    # method's options model from them (vpexport/recipe/schema.py, MethodOptions).
    options: ClassVar[dict[str, tuple]] = {}

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def schedule(self, points: Iterable[tuple[int, int]], sink_layers: int = 0, seed: int = 0, meta=None) -> Schedule:
        """A schedule from (layer, keep) pairs; the rules come from this method."""
        return Schedule(
            method=self.name,
            points=tuple(PrunePoint(layer=l, keep=k, rule=r.name) for (l, k), r in zip(points, self.rules)),
            sink_layers=sink_layers,
            seed=seed,
            meta=meta or {},
        )

    @abstractmethod
    def default(self, layers: int, visual: int, task: str) -> Schedule:
        """The published default, scaled to a decoder of `layers` layers and `visual` tokens."""

    def coarse(self, search: Any) -> Iterable[tuple[list[tuple[int, int]], int]]:
        """Calibration's coarse grid: (points, sink_layers) pairs. `search` offers L, N, `keeps(hi,
        extra)` (the geometric keep grid plus analysis seeds) and `seeds` (the analysis results)."""
        return ()

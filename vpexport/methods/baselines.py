"""The baselines: no pruning, and the index-only subsets (a fixed random one, a spatially strided
one). They are not chosen by `method: auto` and not calibrated; the calibration report measures
their published defaults next to the chosen schedule."""

from __future__ import annotations

import math

from vpexport.methods.base import FixedRule, Method, scaled_keep, scaled_layer
from vpexport.pruning.schedule import Schedule


class NoPruning(Method):
    name = "none"
    summary = "no pruning (the dense baseline)"
    baseline = True

    def default(self, layers, visual, task):
        return Schedule("none")


class RandomSubset(FixedRule):
    name = "random"
    summary = "a fixed random subset drawn once from the schedule seed (baseline)"

    def fixed_indices(self, n, keep, seed):
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g)[:keep].sort().values


class StridedSubset(FixedRule):
    name = "uniform"
    summary = "a spatially strided subset (baseline)"

    def fixed_indices(self, n, keep, seed):
        """A 2-D lattice when `keep` is a square and the tokens form a square grid."""
        import torch

        g, r = int(math.isqrt(n)), int(math.isqrt(keep))
        if g * g == n and r * r == keep:
            step = g / r
            coords = [int(step * (i + 0.5)) for i in range(r)]
            return torch.tensor([y * g + x for y in coords for x in coords], dtype=torch.long)
        step = n / keep
        return torch.tensor([int(step * (i + 0.5)) for i in range(keep)], dtype=torch.long)


class _OnePoint(Method):
    baseline = True
    layer, keep = 2, 144  # the published-default stand-in: K=2, keep 144/576

    def default(self, layers, visual, task):
        return self.schedule([(scaled_layer(self.layer, layers), scaled_keep(self.keep, visual))],
                             meta={"published": f"K={self.layer} keep {self.keep}/576"})


class Random(_OnePoint):
    name = "random"
    summary = "one point; a fixed random subset (baseline)"
    rules = (RandomSubset(),)


class Uniform(_OnePoint):
    name = "uniform"
    summary = "one point; a spatially strided subset (baseline)"
    rules = (StridedSubset(),)

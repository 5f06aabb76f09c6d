"""Random eviction, seeded: the baseline every compression paper reports (e.g. H2O, Zhang et
al., 2023, Table 2; Oren et al., 2024). Each step draws a pseudo-random number for every
candidate from (seed, layer, position, step), in integers so that any run, batch or backend
draws the same; the lowest leaves, one choice per layer."""

from dataclasses import dataclass
from typing import ClassVar

from msrnn.policies import Policy, register

M = 2 ** 24 - 3                   # draws below 2^24: exact in float32, no ties from rounding


@register("random", "seeded random eviction: the baseline every paper reports")
@dataclass(frozen=True, repr=False)
class RandomEvict(Policy):
    size: int
    seed: int = 0
    accepts: ClassVar[frozenset] = frozenset({"size", "sinks"})

    def score(self, c):
        p = c.pos[:, :1].clamp(min=0)                   # [B, 1, S]: the layer's candidates
        x = (self.seed * 1_000_003 + c.layer * 7_919 + p * 104_729 + c.t * 15_485_863) % M
        for k in (12_345, 67_890):
            x = (x * x + k) % M
        return x

"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
rank a oneshot prompt by the attention of its last `observation` queries (the observation
window), max-pooled over `kernel` neighbouring positions so that a kept token keeps its
context; decode as TOVA, per KV head."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn.functional as F

from msrnn.policies import TOVA, register


@register("snapkv", "SnapKV: a oneshot prompt ranked by its last 8 queries, pooled; TOVA-head")
@dataclass(frozen=True, repr=False)
class SnapKV(TOVA):
    observation: int = field(default=8, kw_only=True)    # the window (the command line's
    per_head: bool = field(default=True, kw_only=True)   # --observe does not override it)
    kernel: int = 5
    accepts: ClassVar[frozenset] = frozenset({"size", "sinks"})
    prompt_as_step: ClassVar[bool] = False               # a prompt is ranked otherwise

    def score(self, c):
        if not c.prompt:
            return c.a                                   # a decoding step: TOVA
        B, n, S = c.a.shape
        pooled = F.max_pool1d(c.by_position(c.a).reshape(B * n, 1, S), self.kernel, 1,
                              self.kernel // 2)          # over neighbours in time
        return c.to_slots(pooled.view(B, n, S))

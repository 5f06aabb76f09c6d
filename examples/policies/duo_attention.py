"""DuoAttention-style heads (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads"): the `retrieval` (layer, KV head) pairs keep
`size` states chosen by attention (TOVA per KV head); every other head is a streaming head: the
first `sinks` tokens and a recent window, `window` states in all. The registered pattern
(KV head 0 of each of SmolLM2-135M's 30 layers, which have 3) is an example, not a learned one."""

from dataclasses import dataclass, field

import torch

from msrnn.policies import TOVA, register


@register("duo", "DuoAttention-style: KV head 0 keeps k by attention, heads 1-2 4 sinks + "
          "a window of 64 (SmolLM2-135M)", kv_heads=3, retrieval=tuple((l, 0) for l in range(30)))
@dataclass(frozen=True, repr=False)
class DuoAttention(TOVA):
    sinks: int = 4
    per_head: bool = field(default=True, kw_only=True)
    window: int = 64
    kv_heads: int = 3
    retrieval: tuple = ()                               # ((layer, KV head), ...)

    def budget(self, layer, layers):
        return tuple(self.size if (layer, h) in self.retrieval else self.window
                     for h in range(self.kv_heads))

    def score(self, c):
        retrieval = torch.tensor([(c.layer, h) in self.retrieval for h in c.heads],
                                 device=c.a.device)[:, None]            # [Hkv, 1]
        return torch.where(retrieval, c.a, c.pos.to(c.a.dtype))        # streaming: the oldest

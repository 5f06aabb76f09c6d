"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention
Sinks"): the first 4 tokens (attention sinks) and a window over the last k - 4, with positions
numbered within the cache. A preset: Window+4 (msrnn.policies.Sinks) to run with positions
'cache' (`--positions cache`, or model.init_state(..., positions=StreamingLLM.positions))."""

from dataclasses import dataclass
from typing import ClassVar

from msrnn.policies import Sinks, register


@register("streaming-llm", "StreamingLLM: 4 sinks and a window (run with --positions cache)")
@dataclass(frozen=True, repr=False)
class StreamingLLM(Sinks):
    sinks: int = 4
    positions: ClassVar[str] = "cache"                  # the scheme the paper uses

"""msrnn's decoder split across the ranks of a tensor-parallel group, by KV head.

The multi-state shards naturally: a KV head's states and the query heads that read them live on
one rank. Rank r of N holds a contiguous range of the KV heads (uneven splits allowed: the first
n_kv % N ranks hold one more), their query heads, and a contiguous range of the MLP's hidden
units. Then

    q, k, v  = x W_qkv[rows of my heads]          column-parallel: nothing crosses ranks
    o        = attention over my heads' states    my part of the multi-state, on my rank
    y        = sum over ranks of o W_o[my cols]   row-parallel: one all-reduce (RowLinear)
    MLP      = the same: gate/up by rows, down by columns, one all-reduce

and the embedding, the norms and the LM head are replicated, so every rank ends a step with the
same logits. A layer-wise policy's score is reduced across ranks by the multi-state itself
(msrnn.group.mean, through Shape.group). Each rank reads only its rows and columns from the
safetensors files (msrnn.load(..., tp=N) with a `Plan`): no rank holds the whole model.
"""

from dataclasses import dataclass, replace

from . import group as groups
from .config import Config
from .model import Linear, Transformer, linear


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous range [start, stop) of n things over `world` ranks; the first
    n % world ranks take one more."""
    small, extra = divmod(n, world)
    start = rank * small + min(rank, extra)
    return start, start + small + (rank < extra)


@dataclass(frozen=True)
class Plan:
    """What rank `rank` of `world` holds of a model `cfg`: KV heads kv[0]..kv[1]-1 (and query
    heads group * kv[0] .. group * kv[1] - 1), hidden units hidden[0]..hidden[1]-1."""

    cfg: Config
    rank: int
    world: int

    def __post_init__(self):
        if not 1 <= self.world <= self.cfg.n_kv_heads:
            raise ValueError(f"tensor parallelism over {self.world} ranks: this model has "
                             f"{self.cfg.n_kv_heads} KV heads, and each rank needs at least one; "
                             f"use at most {self.cfg.n_kv_heads} ranks")

    @property
    def kv(self) -> tuple[int, int]:
        return split(self.cfg.n_kv_heads, self.world, self.rank)

    @property
    def hidden(self) -> tuple[int, int]:
        return split(self.cfg.hidden_dim, self.world, self.rank)

    def local(self) -> Config:
        """The shape of this rank's part: its heads and hidden units, the rest unchanged."""
        (a, b), (c, d) = self.kv, self.hidden
        return replace(self.cfg, n_kv_heads=b - a, n_heads=(b - a) * self.cfg.group,
                       hidden_dim=d - c)

    def part(self, hf_name: str):
        """Which part of a checkpoint tensor this rank reads: (dim, start, stop), rows (dim 0) or
        columns (dim 1); None: the whole tensor (replicated)."""
        D, G = self.cfg.head_dim, self.cfg.group
        (a, b), hidden = self.kv, self.hidden
        heads = {"q_proj": (G * a * D, G * b * D), "k_proj": (a * D, b * D),
                 "v_proj": (a * D, b * D), "o_proj": (G * a * D, G * b * D),
                 "gate_proj": hidden, "up_proj": hidden, "down_proj": hidden}
        module = hf_name.split(".")[-2]
        if not hf_name.startswith("model.layers.") or module not in heads:
            return None                                  # norms, embedding, LM head: all
        return (1 if module in ("o_proj", "down_proj") else 0, *heads[module])


class RowLinear(Linear):
    """A row-parallel projection: this rank's columns of W [out, in_local] times its part of the
    input, summed over the ranks (one all-reduce): y = sum_r x_r W_r^T."""

    def __init__(self, n_in: int, n_out: int, group):
        super().__init__(n_in, n_out)
        self.group = group

    def forward(self, x):
        return groups.total(linear(x, self.weight), self.group)


class Sharded(Transformer, groups.EndsGroup):
    """This rank's part of the decoder (`plan`): the local heads and hidden units, o and down
    projections row-parallel. Its multi-states hold the local KV heads and know the group, so a
    layer-wise policy's score is summed over every rank's heads (Shape.group). `close()` or a
    `with` block ends the group, if msrnn.load made it (msrnn.group.EndsGroup)."""

    def __init__(self, plan: Plan, group):
        cfg = plan.local()
        super().__init__(cfg)
        self.plan, self.group = plan, group
        for block in self.blocks:
            block.attn.wo = RowLinear(cfg.n_heads * cfg.head_dim, cfg.dim, group)
            block.mlp.w2 = RowLinear(cfg.hidden_dim, cfg.dim, group)

    @property
    def shape(self):
        return replace(super().shape, group=self.group)


def plan(cfg: Config, tp: int, device) -> tuple[Plan, object]:
    """(this process's Plan, its group) for `tp` ranks: the group made or joined (group.setup)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer (the number of ranks), got {tp!r}")
    Plan(cfg, 0, tp)                                     # checked before any process waits
    g = groups.setup(tp, device)
    return Plan(cfg, groups.rank(g), tp), g

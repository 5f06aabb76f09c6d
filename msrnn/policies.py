"""Compression policies: which state leaves a full multi-state (Oren et al., 2024, Sec. 3-4).

A bounded multi-state holds at most k states per layer. At step t the candidates are the k kept
states plus the new token, C = H_{t-1} ∪ {t}; the query attends over all of C, and then, if
|C| > k, the policy evicts one candidate e (the new token may be the one):

    H_t = C \\ {e},    e = argmin_{j in C} score(j)

A policy is just that score, computed from what it sees of the candidates (`Candidates`). The
multi-state (state.py) does the rest the same way for every policy: positions below `sinks` are
never evicted, empty slots are filled before anything is evicted, and ties go to the oldest.

A policy that needs memory of its own (H2O's accumulated attention) names per-state buffers in
`memory`; the multi-state keeps one value per state in each, starts it at 0 when the state
enters, and hands them to `observe` (update them) and `score` (read them) at every step.

To add a policy, subclass `Policy` and write `score` (and, if it remembers, `memory` and
`observe`); register a command-line name in REGISTRY. See docs/policies.md.
"""

from dataclasses import dataclass

import torch


@dataclass
class Candidates:
    """What a policy sees of one layer's candidates at one step, one entry per slot S.

    a       [B, n, S]       this step's attention to each candidate, averaged over the query heads
                            that share the choice: n = Hkv (a KV head's query group, per_head) or
                            n = 1 (all query heads of the layer)
    a_sum   [B, n, S]       attention summed over the queries of this call: a itself for a step,
                            the column sums over all prompt queries for a `oneshot` prompt
    pos     [B, Hkv, S]     each candidate's absolute position (-1: an empty slot)
    t       [] or [B, 1, 1] the current position (the new token's; a prompt's last)
    keys    [B, Hkv, S, D]  the candidates' keys (after RoPE) and values
    values  [B, Hkv, S, D]
    memory  {name: [B, Hkv, S]}  the policy's own per-state memory (see Policy.memory)
    """

    a: torch.Tensor
    a_sum: torch.Tensor
    pos: torch.Tensor
    t: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    memory: dict


class Policy:
    """Evict the candidate with the lowest score once the multi-state holds more than `size`."""

    size: int | None = None   # k, the multi-state size (None: unbounded)
    sinks: int = 0            # positions < sinks are never evicted ("Window+i", TOVA+i)
    per_head = False          # True: each KV head evicts on its own; False: one choice per layer
    memory: tuple = ()        # names of per-state buffers the multi-state keeps for this policy

    def __init__(self, size: int, sinks: int = 0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"multi-state size must be a positive integer, got {size!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        if sinks >= size:
            raise ValueError(f"size {size} must be larger than sinks {sinks}: the first {sinks} "
                             f"tokens are always kept, so use --size > {sinks} or fewer sinks")
        self.size, self.sinks = size, sinks

    @property
    def bounded(self) -> bool:
        """Whether the multi-state has a size at all (every policy but Full)."""
        return self.size is not None

    def observe(self, c: Candidates):
        """Update the policy's memory (c.memory) from this step's attention; called at every
        step, before `score`, whether or not anything is evicted."""

    def score(self, c: Candidates) -> torch.Tensor:
        """Scores broadcastable to c.pos, [B, n, S]: the lowest leaves."""
        raise NotImplementedError

    def visible(self, q_pos, k_pos):
        """Which keys a query at q_pos still sees, if the policy decides that from positions
        alone (Window, Sinks): then a whole prompt can run as one masked parallel pass. None for
        policies that must look at attention."""
        return None

    def __repr__(self):
        args = [str(self.size)] + ([f"sinks={self.sinks}"] if self.sinks else [])
        return f"{type(self).__name__}({', '.join(args)})"


class Full(Policy):
    """The topline: nothing is evicted; the multi-state grows with the sequence (a transformer)."""

    def __init__(self):
        pass

    def __repr__(self):
        return "Full()"


class Window(Policy):
    """Evict the oldest position (a sliding window over the last k tokens).

    score(j) = pos_j. Window(k) attends to the current token and the k before it, so it equals a
    Mistral sliding window of k + 1. With sinks = i the first i positions stay ("Window+i").
    """

    def score(self, c):
        return c.pos

    def visible(self, q_pos, k_pos):
        """The first `sinks` positions and the last size - sinks before the query (the query
        itself included)."""
        return (k_pos < self.sinks) | (k_pos >= q_pos - (self.size - self.sinks))


class Sinks(Window):
    """Window+i (StreamingLLM): keep the first `sinks` tokens and a window over the rest."""

    def __init__(self, size: int, sinks: int = 4):
        super().__init__(size, sinks)


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the k//2 most recent candidates, and evict
    among the others the one with the lowest accumulated attention

        A_j = sum over steps s >= j of mean_h a^s_h(j)

    the mean over the KV head's query group (per_head=True, the default) or over all heads of
    the layer (per_head=False: "H2O-layer", one choice shared by the layer). A_j is the policy's
    own memory, "acc": 0 when j enters, this step's attention added at every step."""

    memory = ("acc",)

    def __init__(self, size: int, per_head: bool = True):
        super().__init__(size)
        self.per_head = per_head

    def observe(self, c):
        c.memory["acc"] += c.a_sum

    def score(self, c):
        recent = c.pos > c.t - self.size // 2         # the new token is one of the k//2 recent
        return c.memory["acc"].masked_fill(recent, torch.inf)

    def __repr__(self):
        return f"H2O({self.size}{'' if self.per_head else ', per_head=False'})"


class TOVA(Policy):
    """Token Omission Via Attention (the paper's policy): evict the candidate the current query
    attends to least,  e = argmin_j mean_h a_h(j),  averaged over all query heads (one choice per
    layer, the paper's best variant) or, with per_head=True, per KV head over its query group."""

    def __init__(self, size: int, per_head: bool = False, sinks: int = 0):
        super().__init__(size, sinks)
        self.per_head = per_head

    def score(self, c):
        return c.a

    def __repr__(self):
        extra = (", per_head=True" if self.per_head else "") + (
            f", sinks={self.sinks}" if self.sinks else "")
        return f"TOVA({self.size}{extra})"


class KeyNorm(Policy):
    """Key-norm eviction (Devoto et al., 2024): keys with a small L2 norm draw attention, so evict
    the candidate whose key has the largest norm,  e = argmax_j ||K_j||,  per KV head (each
    head has its own keys). It never looks at attention."""

    per_head = True

    def score(self, c):
        return -c.keys.to(torch.promote_types(c.keys.dtype, torch.float32)).norm(dim=-1)


# One registry of command-line names: the CLI, its help, the scripts and the tests read it.
# name -> (make(size, sinks), description); `sinks` is None unless the user gave --sinks.
REGISTRY = {
    "full": (lambda size, sinks: Full(), "no eviction: the unbounded transformer"),
    "window": (lambda size, sinks: Window(size, sinks or 0), "the last k tokens"),
    "sinks": (lambda size, sinks: Sinks(size, 4 if sinks is None else sinks),
              "Window+i: the first i tokens (--sinks, default 4) and the last k - i"),
    "h2o": (lambda size, sinks: H2O(size), "H2O, per KV head: recent half + heavy hitters"),
    "h2o-layer": (lambda size, sinks: H2O(size, per_head=False), "H2O, one choice per layer"),
    "tova": (lambda size, sinks: TOVA(size, sinks=sinks or 0),
             "TOVA, one choice per layer (the paper's); --sinks gives TOVA+i"),
    "tova-head": (lambda size, sinks: TOVA(size, per_head=True, sinks=sinks or 0),
                  "TOVA per KV head"),
    "keynorm": (lambda size, sinks: KeyNorm(size, sinks or 0),
                "evict the largest key norm (Devoto et al., 2024)"),
}
NAMES = tuple(REGISTRY)


def from_name(name: str, size: int | None = None, sinks: int | None = None) -> Policy:
    """A policy from its command-line name (REGISTRY). `sinks`: the first tokens never evicted
    (the sinks policy's i, default 4; TOVA+i; Window+i)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(NAMES)}")
    if name == "full":
        if sinks:
            raise ValueError("the full policy keeps every token; --sinks means nothing to it")
        return Full()
    if size is None:
        raise ValueError(f"policy {name!r} needs a multi-state size (--size)")
    if sinks is not None and name.startswith("h2o"):
        raise ValueError(f"policy {name!r} has no sinks (it keeps the recent half and heavy "
                         f"hitters); drop --sinks or use sinks, tova or window")
    return REGISTRY[name][0](size, sinks)


def describe() -> str:
    """The registry as help text: 'name: description' lines."""
    return "\n".join(f"  {name:10s} {text}" for name, (_, text) in REGISTRY.items())

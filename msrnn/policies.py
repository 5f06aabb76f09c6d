"""Compression policies: which state leaves a full multi-state (Oren et al., 2024, Sec. 3-4).

A bounded multi-state holds at most k states per layer. At step t the candidates are the k kept
states plus the new token, C = H_{t-1} ∪ {t}; the query attends over all of C, and then, if
|C| > k, the policy evicts one candidate e (the new token may be the one):

    H_t = C \\ {e},    e = argmin_{j in C} score(j)

A policy is just that score. It sees, for every candidate slot,

    a    [B, H_kv, S] or [B, 1, S]  this step's attention to the candidate, averaged over the query
                                    heads that share the choice (a KV head's group, or the layer)
    acc  same shape, or None        a_ summed over every step since the candidate entered (H2O)
    pos  [B, H_kv, S]               the candidate's absolute position (-1: an empty slot)
    t    int or 0-dim tensor        the current position

and returns scores of `a`'s shape (or broadcastable to pos): the lowest leaves. The multi-state
(`state.py`) does the rest the same way for every policy: positions below `sinks` are never
evicted, empty slots are filled before anything is evicted, and ties go to the oldest position.

To add a policy, subclass `Policy`, set `size` and write `score`; see docs/policies.md.
"""

import torch


class Policy:
    """Evict the candidate with the lowest score once the multi-state holds more than `size`."""

    size: int | None = None   # k, the multi-state size (None: unbounded)
    sinks: int = 0            # positions < sinks are never evicted ("Window+i", TOVA+i)
    per_head = False          # True: each KV head evicts on its own; False: one choice per layer
    accumulates = False       # True: the state keeps acc, attention summed over steps (H2O)

    def __init__(self, size: int, sinks: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"multi-state size must be a positive integer, got {size!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        if sinks >= size:
            raise ValueError(f"size {size} must be larger than sinks {sinks}: the first {sinks} "
                             f"tokens are always kept, so use --size > {sinks} or fewer sinks")
        self.size, self.sinks = size, sinks

    def score(self, a, acc, pos, t):
        raise NotImplementedError

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

    def score(self, a, acc, pos, t):
        return pos

    def visible(self, q_pos, k_pos):
        """Which keys a query sees under this policy, without stepping: the first `sinks`
        positions and the last size - sinks before the query (the query itself included)."""
        return (k_pos < self.sinks) | (k_pos >= q_pos - (self.size - self.sinks))


class Sinks(Window):
    """Window+i (StreamingLLM): keep the first `sinks` tokens and a window over the rest."""

    def __init__(self, size: int, sinks: int = 4):
        super().__init__(size, sinks)


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the k//2 most recent candidates, and evict
    among the others the one with the lowest accumulated attention

        A_j = sum over steps s >= j of mean_h a^s_h(j)

    (mean over the KV head's query group; with layerwise=True over all heads, shared)."""

    accumulates = True

    def __init__(self, size: int, layerwise: bool = False):
        super().__init__(size)
        self.per_head = not layerwise

    def score(self, a, acc, pos, t):
        recent = pos > t - self.size // 2            # the new token is one of the k//2 recent
        return acc.masked_fill(recent, torch.inf)

    def __repr__(self):
        return f"H2O({self.size}{'' if self.per_head else ', layerwise=True'})"


class TOVA(Policy):
    """Token Omission Via Attention (the paper's policy): evict the candidate the current query
    attends to least,  e = argmin_j mean_h a_h(j),  averaged over all query heads (one choice per
    layer, the paper's best variant) or, with headwise=True, per KV head over its query group."""

    def __init__(self, size: int, headwise: bool = False, sinks: int = 0):
        super().__init__(size, sinks)
        self.per_head = headwise

    def score(self, a, acc, pos, t):
        return a

    def __repr__(self):
        extra = (", headwise=True" if self.per_head else "") + (
            f", sinks={self.sinks}" if self.sinks else "")
        return f"TOVA({self.size}{extra})"


NAMES = ("full", "window", "sinks", "h2o", "h2o-layer", "tova", "tova-head")


def from_name(name: str, size: int | None = None, sinks: int | None = None) -> Policy:
    """A policy from its command-line name: full, window, sinks, h2o, h2o-layer, tova, tova-head.
    `sinks` is the sinks policy's i (default 4)."""
    if name == "full":
        return Full()
    if name not in NAMES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(NAMES)}")
    if size is None:
        raise ValueError(f"policy {name!r} needs a multi-state size (--size)")
    return {
        "window": lambda: Window(size),
        "sinks": lambda: Sinks(size, sinks=4 if sinks is None else sinks),
        "h2o": lambda: H2O(size),
        "h2o-layer": lambda: H2O(size, layerwise=True),
        "tova": lambda: TOVA(size),
        "tova-head": lambda: TOVA(size, headwise=True),
    }[name]()

"""Which rotary position a kept state's key takes: the position schemes (docs/design.md,
"Positions"), and how far each lets a multi-state run.

RoPE rotates a query and a key by angles proportional to their positions, so attention sees
positions only through their difference. A transformer keeps each key at its absolute position,
and a checkpoint was trained on differences below its range (max_position_embeddings). A
bounded multi-state holds only k + 1 candidates, so it may number them afresh at every step:

    original     each key keeps its absolute position p (what the paper authors' main code
                 does). Past the range the model sees differences it was never trained on.
    cache        StreamingLLM (Xiao et al., 2024): the candidates C = H ∪ {t}, in ascending
                 order of p, take positions 0, 1, ..., |C| - 1, and the query |C| - 1.
    compressed   an opt-in flag, for LLaMA only, on a side branch of the authors' repository
                 (`position_encoding_compression`, September 2024) that was never merged: with
                 p_1 < p_2 < ... the positions of C, d_1 = p_1 and d_i = p_i - p_{i-1}; each
                 gap becomes ceil(φ(d_i)), φ(d) = d for d <= 10 and 10 + ln(ln(d - 10 + e))
                 above; the positions are the running sums and the query takes the last.

Each is computed per layer, and per KV head (a per-head policy's heads keep different tokens).
Full keeps every position, so `cache` and `compressed` number it 0, 1, ... = `original`.

How it is computed, once for both backends (attention.step calls `Rotation`): a renumbered
multi-state stores its keys un-rotated (each backend hands over keys rotated at their absolute
position; R(p)^-1 undoes that exactly, with the same cos and sin), and at each step rotates the
k + 1 keys, and the query, to the scheme's positions with the backend's own RoPE. The rotations
compose, R(a) R(b) = R(a + b), for the default, linear and llama3 frequency rules.
"""

import math
from enum import Enum

import torch

from .policies import largest


class Scheme(str, Enum):
    """The position schemes (a str: "cache" == Scheme.CACHE)."""

    ORIGINAL = "original"
    CACHE = "cache"
    COMPRESSED = "compressed"

    @classmethod
    def of(cls, name) -> "Scheme":
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown position scheme {name!r}: use "
                             f"{', '.join(repr(s.value) for s in cls)}") from None


NAMES = [s.value for s in Scheme]


def rotate(x, cos, sin):
    """RoPE in Hugging Face's rotate-half layout: x [..., D] rotated by the angles whose cos and
    sin are given ([..., D], each angle twice): x cos + rotate_half(x) sin, with
    rotate_half([x1, x2]) = [-x2, x1]. sin -> -sin rotates back."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


def gap(d):
    """ceil(φ(d)) for gaps d (LongTensor or int >= 0): φ(d) = d for d <= 10, and
    10 + ln(ln(d - 10 + e)) above (the compression of a gap between kept positions)."""
    if not torch.is_tensor(d):
        return d if d <= 10 else math.ceil(10 + math.log(math.log(d - 10 + math.e)))
    wide = d.double()
    big = (10 + torch.log(torch.log((wide - 10).clamp(min=0) + math.e))).ceil()
    return torch.where(d <= 10, wide, big).long()


def renumber(pos, scheme: Scheme):
    """The scheme's rotary positions of the candidates at absolute positions pos [B, Hkv, S]
    (-1: an empty slot, which gets 0): (keys [B, Hkv, S], query [B, Hkv]), the query taking the
    newest candidate's. Slots are in no order, so sort, number, and put back."""
    ordered, order = pos.sort(-1)                              # empty slots (-1) first
    real = ordered >= 0
    if scheme is Scheme.CACHE:
        numbers = real.cumsum(-1) - 1                          # 0 .. |C| - 1 over the real ones
    else:                                                      # compressed gaps, summed
        before = torch.cat([torch.zeros_like(ordered[..., :1]), ordered[..., :-1]], -1)
        d = torch.where(real, ordered - before.clamp(min=0), 0)    # d_1 = p_1 - 0
        numbers = gap(d).cumsum(-1)
    keys = torch.zeros_like(pos).scatter(-1, order, numbers.clamp(min=0))
    return keys, numbers[..., -1]


class Rotation:
    """How a renumbered multi-state (cache, compressed) rotates: keys stored at position 0 and
    turned, at each step, to the positions `renumber` gives. `rope(positions)` -> (cos, sin)
    [*positions.shape, D] is the backend's own RoPE, the one its q and k arrived rotated by.

    `fixed` (bool [B], or None): rows whose keys stay at their absolute positions, unturned: Full
    rows beside renumbered ones (Full keeps every state, which any scheme numbers 0, 1, ..., so
    its row is exactly Full's own run, not its run turned there and back)."""

    def __init__(self, scheme: Scheme, rope, fixed=None):
        self.scheme, self.rope, self.fixed = scheme, rope, fixed

    def positions(self, pos):
        """The rotary positions of candidates at absolute positions pos [B, Hkv, S]: (keys
        [B, Hkv, S], query [B, Hkv])."""
        return renumber(pos, self.scheme)

    def to(self, x, positions):
        """R(positions) x."""
        cos, sin = self.rope(positions)
        return self.unless_fixed(x, rotate(x, cos, sin))

    def back(self, x, positions):
        """R(positions)^-1 x: a query or key rotated at `positions` back to position 0."""
        cos, sin = self.rope(positions)
        return self.unless_fixed(x, rotate(x, cos, -sin))

    def unless_fixed(self, x, turned):
        """`turned` in every row but the fixed ones, which keep x (x [B, ...])."""
        if self.fixed is None:
            return turned
        return torch.where(self.fixed.view(-1, *[1] * (x.dim() - 1)), x, turned)


def reach(policy, scheme: Scheme, end: int, layers: int | None = None) -> int:
    """The largest rotary position a multi-state under `policy` can use by the time it has seen
    `end` tokens one step at a time. original, and Full under any scheme: end - 1. cache: at
    most k (|C| <= k + 1). compressed: each of the k + 1 numbers is a gap ceil(φ(d)) <= d with
    d <= end - 1, and φ grows with d, so at most min(end - 1, (k + 1) ceil(φ(end - 1))). k is
    the largest budget of any layer or KV head of a model with `layers` layers (Policy.budget;
    the nominal size when `layers` is not given)."""
    if scheme is Scheme.ORIGINAL or not policy.bounded:
        return end - 1
    k = largest(policy, layers)
    if scheme is Scheme.CACHE:
        return min(end - 1, k)
    return min(end - 1, (k + 1) * gap(max(end - 1, 0)))


def check_range(policy, scheme, limit: int, end: int, parallel: int = 0,
                allow_past_range: bool = False, what: str | None = None,
                layers: int | None = None):
    """Refuse, in one line, a run whose rotary positions would pass the model's range `limit`:
    `end` tokens in all, the first `parallel` of them in one pass (a pass numbers its tokens by
    their absolute positions, whatever the scheme). `allow_past_range`: run anyway. `policy`
    may be a list (one per row of a batch): each is checked."""
    if isinstance(policy, (list, tuple)):
        for i, p in enumerate(policy):
            if p not in policy[:i]:
                check_range(p, scheme, limit, end, parallel, allow_past_range, what, layers)
        return
    scheme = Scheme.of(scheme)
    if allow_past_range or max(parallel, reach(policy, scheme, end, layers) + 1) <= limit:
        return
    what = what or f"{end} tokens"
    head = f"{what} reach position {end - 1}, past the model's range of {limit} positions " \
           f"(max_position_embeddings)"
    if not policy.bounded:
        raise ValueError(f"{head}: Full keeps every state at its absolute position under any "
                         f"scheme; use a bounded policy with positions 'cache' or 'compressed' "
                         f"(--positions), or allow_past_range=True (--past-range) to run the "
                         f"absolute positions anyway")
    if parallel > limit:
        raise ValueError(f"{head}: a {parallel}-token prompt in one pass (oneshot) numbers its "
                         f"tokens by their absolute positions under any scheme; use prompt mode "
                         f"'sequential', a shorter prompt, or allow_past_range=True (--past-range)")
    if scheme is Scheme.ORIGINAL:
        raise ValueError(f"{head}: with positions 'original' each key keeps its absolute "
                         f"position; use positions 'cache' or 'compressed' (--positions), or "
                         f"allow_past_range=True (--past-range) to run them anyway")
    raise ValueError(f"{head}: {scheme.value} positions of {policy} may reach "
                     f"{reach(policy, scheme, end, layers)}; use positions 'cache', a smaller size, or "
                     f"allow_past_range=True (--past-range)")

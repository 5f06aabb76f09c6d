"""The multi-state H_t: the key-value cache read as an RNN's hidden state.

For layer l, H^l_t is a set of at most k states, one per kept token; a state is that token's
absolute position p, its key K_p (already rotated by RoPE at p, never re-rotated) and its value V_p,
per KV head. It lives in preallocated slots:

    k, v  [B, H_kv, S, D]   keys after RoPE, values
    pos   [B, H_kv, S]      the position each slot holds; -1 marks an empty slot
    acc   [B, H_kv, S]      attention summed over the steps since the state entered (H2O only)

A bounded policy of size k gets S = k + 1 slots: k states and one free slot for the incoming token.
Eviction only marks a slot empty (pos = -1) and the next token is written into it, so a step
never copies, gathers or re-sorts the cache. Slots are therefore in no particular order;
`positions()` sorts them for reading.
"""

import torch

from .policies import Full, Policy


def static(*buffers):
    """On CUDA, tell torch.compile that these buffers keep their address from step to step, so
    that a step compiled with CUDA graphs ("reduce-overhead") updates them in place instead of
    copying them in and out of its own memory every step."""
    for x in buffers:
        if x is not None and x.is_cuda:
            torch._dynamo.mark_static_address(x)


class LayerState:
    """H^l, one layer's multi-state, with the two operations of a step:
    insert (C = H_{t-1} ∪ {t}) and evict (H_t = C \\ {e})."""

    def __init__(self, policy: Policy, batch: int, n_kv: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.policy = policy
        self.k = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, n_kv, slots), -1, dtype=torch.long, device=device)
        # Accumulated attention is summed in at least float32, whatever the model's dtype.
        acc_dtype = torch.promote_types(dtype, torch.float32)
        self.acc = (torch.zeros(batch, n_kv, slots, dtype=acc_dtype, device=device)
                    if policy.accumulates else None)
        static(self.k, self.v, self.pos, self.acc)

    def insert(self, k, v, t):
        """C = H_{t-1} ∪ {t}: write the new token's key and value [B, H_kv, D] into a free slot.

        The free slot is the first empty one (pos = -1 is the smallest position, and argmin
        returns the first minimum). One always exists: a step evicts before it returns."""
        slot = self.pos.argmin(-1, keepdim=True)                  # [B, H_kv, 1]
        row = slot[..., None].expand(-1, -1, -1, k.shape[-1])     # [B, H_kv, 1, D]
        self.k.scatter_(2, row, k[:, :, None])
        self.v.scatter_(2, row, v[:, :, None])
        self.pos.scatter_(2, slot, t.expand_as(slot) if torch.is_tensor(t) else
                          torch.full_like(slot, t))
        if self.acc is not None:
            self.acc.scatter_(2, slot, 0.0)

    def evict(self, probs, t):
        """H_t = C \\ {e}: given this step's attention probs [B, H_kv, G, S] (G query heads per
        KV head), let the policy score the candidates and empty the slot of the lowest."""
        if self.policy.size is None:                              # Full: nothing leaves
            return
        a = self.average(probs)
        if self.acc is not None:
            self.acc += a
        key = self.priority(a, self.acc, self.pos, t)
        lowest = key == key.amin(-1, keepdim=True)
        # Among the lowest, the oldest position leaves (empty slots, at -1, come first).
        oldest = torch.where(lowest, self.pos, torch.iinfo(torch.long).max)
        victim = oldest.argmin(-1, keepdim=True)                  # [B, H_kv, 1]
        self.pos.scatter_(2, victim, -1)

    def average(self, probs):
        """Attention per candidate, averaged over the query heads that share the eviction:
        [B, H_kv, ..., S] over a KV head's group, or [B, 1, ..., S] over the whole layer."""
        if self.policy.per_head:
            return probs.mean(2)
        return probs.mean((1, 2)).unsqueeze(1)

    def priority(self, a, acc, pos, t):
        """The policy's scores [B, H_kv, S], with the rules every policy shares: positions below
        `sinks` are never evicted, and an empty slot is always the first to be 'evicted'."""
        p = self.policy
        score = p.score(a, acc, pos, t).to(a.dtype).expand(pos.shape)
        score = score.masked_fill(pos < p.sinks, torch.inf)
        return score.masked_fill(pos < 0, -torch.inf)

    def keep_best(self, k, v, pos, probs):
        """Compress a whole prompt at once (DESIGN.md, `oneshot`): from T candidates with keys and
        values [B, H_kv, T, D] at positions pos [T] and causal attention probs [B, H_kv, G, T, T],
        keep the min(T, size) ranked best by the policy from the last prompt token's attention
        row (H2O: from column sums over all prompt queries), in slots 0, 1, ... by position."""
        B, n_kv, T, D = k.shape
        probs = probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs
        pos = pos.expand(B, n_kv, T)
        a = self.average(probs[..., -1, :])                      # the last query's attention
        acc = self.average(probs.sum(-2)) if self.acc is not None else None  # column sums
        key = self.priority(a, acc, pos, int(pos[0, 0, -1]))
        # Best first: highest score, then (ties) the newest; two stable sorts give that order.
        by_age = pos.argsort(dim=-1, descending=True, stable=True)
        order = by_age.gather(-1, key.gather(-1, by_age).argsort(dim=-1, descending=True,
                                                                 stable=True))
        kept = order[..., : min(T, self.policy.size)].sort(-1).values  # [B, H_kv, n] by position
        n = kept.shape[-1]
        self.k[:, :, :n] = k.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.v[:, :, :n] = v.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.pos[:, :, :n] = pos.gather(-1, kept)
        if acc is not None:
            self.acc[:, :, :n] = acc.expand(B, n_kv, T).gather(-1, kept)

    def append(self, k, v, start: int):
        """Full's multi-state grows in order: write T new states [B, H_kv, T, D] at slots
        start .. start+T-1 (= their positions, since nothing was ever evicted)."""
        T = k.shape[2]
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        self.pos[:, :, start:start + T] = torch.arange(start, start + T, device=k.device)

    def grow(self, slots: int):
        """Reallocate with more slots, keeping the states (Full only)."""
        n = self.pos.shape[-1]
        for name in ("k", "v", "pos"):
            old = getattr(self, name)
            new = torch.full((*old.shape[:2], slots, *old.shape[3:]),
                             -1 if name == "pos" else 0, dtype=old.dtype, device=old.device)
            new[:, :, :n] = old
            setattr(self, name, new)
        static(self.k, self.v, self.pos)


class MultiState:
    """H_t for the whole model: one LayerState per layer, plus the position of the next token.

    Bounded policies hold k + 1 slots per layer for the whole run. Full (the unbounded
    transformer) starts with `capacity` slots (default 256) and doubles them whenever the next
    tokens would not fit, up to the model's max_position_embeddings; pass the final length as
    `capacity` to allocate once (msrnn.generate does)."""

    def __init__(self, cfg, policy: Policy, batch_size: int, dtype, device, capacity=None):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an msrnn.policies.Policy, got {policy!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg, self.policy, self.batch_size = cfg, policy, batch_size
        self.length = 0                                   # tokens seen = position of the next
        self.t = torch.zeros((), dtype=torch.long, device=device)   # the same, as a tensor
        static(self.t)
        if policy.size is not None:
            slots = policy.size + 1
        else:
            slots = min(capacity or 256, cfg.max_positions)
        self.layers = [LayerState(policy, batch_size, cfg.n_kv_heads, slots, cfg.head_dim,
                                  dtype, device) for _ in range(cfg.n_layers)]

    @property
    def slots(self) -> int:
        return self.layers[0].pos.shape[-1]

    def reserve(self, n: int):
        """Make room for n more tokens: check the positions exist and, for Full, grow the slots."""
        end = self.length + n
        if end > self.cfg.max_positions:
            raise ValueError(f"position {end - 1} is past the model's range: it was trained for "
                             f"{self.cfg.max_positions} positions (max_position_embeddings); "
                             f"use a shorter prompt or fewer new tokens")
        if isinstance(self.policy, Full) and end > self.slots:
            slots = min(max(2 * self.slots, end), self.cfg.max_positions)
            for layer in self.layers:
                layer.grow(slots)

    def positions(self, layer: int) -> torch.Tensor:
        """The absolute positions layer `layer` keeps: LongTensor [B, H_kv, n], ascending."""
        pos = self.layers[layer].pos
        n = self.length if self.policy.size is None else min(self.length, self.policy.size)
        return pos.sort(-1).values[..., pos.shape[-1] - n:]

    def nbytes(self) -> int:
        """Bytes held by the multi-state's buffers (keys, values, positions, scores)."""
        return sum(x.numel() * x.element_size() for layer in self.layers
                   for x in (layer.k, layer.v, layer.pos, layer.acc) if x is not None)

    def __repr__(self):
        return (f"MultiState({self.policy}, batch={self.batch_size}, layers={len(self.layers)}, "
                f"slots={self.slots}, t={self.length})")

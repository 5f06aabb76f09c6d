"""The multi-state H_t: the key-value cache read as an RNN's hidden state.

For layer l, H^l_t is a set of at most k states, one per kept token; a state is that token's
absolute position p, its key K_p (already rotated by RoPE at p, never re-rotated) and its value V_p,
per KV head. It lives in preallocated slots:

    keys, values  [B, Hkv, S, D]   keys after RoPE, values
    pos           [B, Hkv, S]      the position each slot holds; -1 marks an empty slot
    memory        {name: [B, Hkv, S]}  per-state memory the policy asked for (H2O's sums)

A bounded policy of size k gets S = k + 1 slots: k states and one free slot for the incoming token.
Eviction only marks a slot empty (pos = -1) and the next token is written into it, so a step
never copies, gathers or re-sorts the cache. Slots are therefore in no particular order;
`positions()` sorts them for reading.

Positions `t` may be one for the whole batch (a 0-dim tensor or an int) or one per row
([B, 1, 1]); the latter lets rows of one batch sit at different positions (msrnn.hf, padding).
"""

import torch

from .policies import Candidates, Policy


def static(*buffers):
    """On CUDA, tell torch.compile that these buffers keep their address from step to step, so
    that a step compiled with CUDA graphs ("reduce-overhead") updates them in place instead of
    copying them in and out of its own memory every step."""
    for x in buffers:
        if x.is_cuda:
            torch._dynamo.mark_static_address(x)


class LayerState:
    """H^l, one layer's multi-state, with the two operations of a step:
    insert (C = H_{t-1} ∪ {t}) and evict (H_t = C \\ {e})."""

    def __init__(self, policy: Policy, batch: int, n_kv: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.policy = policy
        self.keys = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, n_kv, slots), -1, dtype=torch.long, device=device)
        # A policy's memory is kept in at least float32, whatever the model's dtype.
        mem_dtype = torch.promote_types(dtype, torch.float32)
        self.memory = {name: torch.zeros(batch, n_kv, slots, dtype=mem_dtype, device=device)
                       for name in policy.memory}
        static(self.keys, self.values, self.pos, *self.memory.values())

    def insert(self, k, v, t):
        """C = H_{t-1} ∪ {t}: write the new token's key and value [B, Hkv, D] into a free slot.

        The free slot is the first empty one (pos = -1 is the smallest position, and argmin
        returns the first minimum). One always exists: a step evicts before it returns.
        The writes are indexed assignments (index_put_), which torch.compile performs in place;
        a scatter_ here made it copy every layer's whole key and value buffers each step."""
        B, Hkv, _ = self.pos.shape
        slot = self.pos.argmin(-1)                                # [B, Hkv]
        rows = torch.arange(B, device=slot.device)[:, None].expand(B, Hkv)
        heads = torch.arange(Hkv, device=slot.device).expand(B, Hkv)
        self.keys[rows, heads, slot] = k
        self.values[rows, heads, slot] = v
        t = torch.as_tensor(t, device=slot.device)
        self.pos[rows, heads, slot] = t.reshape(-1, 1).expand(B, Hkv) if t.dim() else t
        for m in self.memory.values():
            m[rows, heads, slot] = 0.0

    def evict(self, probs, t):
        """H_t = C \\ {e}: given this step's attention probs [B, Hkv, G, S] (G query heads per
        KV head), let the policy score the candidates and empty the slot of the lowest."""
        if not self.policy.bounded:                               # Full: nothing leaves
            return
        a = self.average(probs)
        c = Candidates(a, a, self.pos, torch.as_tensor(t, device=a.device), self.keys,
                       self.values, self.memory)
        self.policy.observe(c)
        key = self.priority(c)
        lowest = key == key.amin(-1, keepdim=True)
        # Among the lowest, the oldest position leaves (empty slots, at -1, come first).
        oldest = torch.where(lowest, self.pos, torch.iinfo(torch.long).max)
        victim = oldest.argmin(-1)                                # [B, Hkv]
        B, Hkv = victim.shape
        rows = torch.arange(B, device=victim.device)[:, None].expand(B, Hkv)
        self.pos[rows, torch.arange(Hkv, device=victim.device).expand(B, Hkv), victim] = -1

    def average(self, probs):
        """Attention per candidate, averaged over the query heads that share the eviction:
        [B, Hkv, G, S] -> [B, Hkv, S] over a KV head's group, or [B, 1, S] over the layer."""
        if self.policy.per_head:
            return probs.mean(2)
        return probs.mean((1, 2)).unsqueeze(1)

    def priority(self, c: Candidates):
        """The policy's scores [B, Hkv, S], with the rules every policy shares: positions below
        `sinks` are never evicted, and an empty slot is always the first to be 'evicted'."""
        score = self.policy.score(c).to(c.a.dtype).expand(c.pos.shape)
        score = score.masked_fill(c.pos < self.policy.sinks, torch.inf)
        return score.masked_fill(c.pos < 0, -torch.inf)

    def keep_best(self, keys, values, pos, last, total=None):
        """Compress a whole prompt at once (docs/design.md, `oneshot`): from T candidates with
        keys and values [B, Hkv, T, D] at positions pos ([T], or [B, 1, T] with -1 for padding),
        keep the min(T, size) ranked best by the policy from the last query's attention
        last [B, Hkv, G, T] (and, for a policy with memory, the column sums of the prompt's
        attention total [B, Hkv, G, T]), in slots 0, 1, ... by position."""
        B, n_kv, T, D = keys.shape
        pos = pos.expand(B, n_kv, T)
        a = self.average(last.float() if last.dtype in (torch.float16, torch.bfloat16) else last)
        a_sum = self.average(total.to(a.dtype)) if total is not None else a
        memory = {name: torch.zeros(B, n_kv, T, dtype=m.dtype, device=m.device)
                  for name, m in self.memory.items()}
        c = Candidates(a, a_sum, pos, pos.amax(-1, keepdim=True), keys, values, memory)
        self.policy.observe(c)
        key = self.priority(c)
        # Best first: highest score, then (ties) the newest; two stable sorts give that order.
        by_age = pos.argsort(dim=-1, descending=True, stable=True)
        order = by_age.gather(-1, key.gather(-1, by_age).argsort(dim=-1, descending=True,
                                                                 stable=True))
        kept = order[..., : min(T, self.policy.size)].sort(-1).values  # [B, Hkv, n] by position
        n = kept.shape[-1]
        self.keys[:, :, :n] = keys.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.values[:, :, :n] = values.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.pos[:, :, :n] = pos.gather(-1, kept)
        for name, m in self.memory.items():
            m[:, :, :n] = memory[name].gather(-1, kept)

    def append(self, keys, values, start: int):
        """Full's multi-state grows in order: write T new states [B, Hkv, T, D] at slots
        start .. start+T-1 (= their positions, since nothing was ever evicted)."""
        T = keys.shape[2]
        self.keys[:, :, start:start + T] = keys
        self.values[:, :, start:start + T] = values
        self.pos[:, :, start:start + T] = torch.arange(start, start + T, device=keys.device)

    def grow(self, slots: int):
        """Reallocate with more slots, keeping the states (Full only)."""
        n = self.pos.shape[-1]
        for name in ("keys", "values", "pos"):
            old = getattr(self, name)
            new = torch.full((*old.shape[:2], slots, *old.shape[3:]),
                             -1 if name == "pos" else 0, dtype=old.dtype, device=old.device)
            new[:, :, :n] = old
            setattr(self, name, new)
        static(self.keys, self.values, self.pos)


class MultiState:
    """H_t for the whole model: one LayerState per layer, plus the position of the next token.

    Bounded policies hold k + 1 slots per layer for the whole run. Full (the unbounded
    transformer) starts with `capacity` slots (default 256) and doubles them whenever the next
    tokens would not fit, up to the model's range; pass the final length as `capacity` to
    allocate once (msrnn.generate does).

    A multi-state belongs to the model that made it (`model.init_state`): `owner` records the
    shape, dtype, device and range it was made for, and the model refuses any other."""

    def __init__(self, cfg, policy: Policy, batch_size: int, dtype, device, capacity=None):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an msrnn.policies.Policy, got {policy!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if policy.bounded and policy.size >= cfg.max_positions:
            raise ValueError(f"multi-state size {policy.size} is not smaller than the model's "
                             f"range of {cfg.max_positions} positions: it would never evict; use "
                             f"a smaller size or the full policy")
        self.cfg, self.policy, self.batch_size = cfg, policy, batch_size
        self.owner = owner_of(cfg, dtype, device)
        # Tokens seen = the position of the next token: per row in `t` (rows of a ragged batch
        # differ), and the most of any row in `_length` (for ranges and Full's slots).
        self._length = 0
        self.t = torch.zeros(batch_size, dtype=torch.long, device=device)
        static(self.t)
        slots = policy.size + 1 if policy.bounded else min(capacity or 256, cfg.max_positions)
        self.layers = [LayerState(policy, batch_size, cfg.n_kv_heads, slots, cfg.head_dim,
                                  dtype, device) for _ in range(cfg.n_layers)]

    @property
    def length(self) -> int:
        """Tokens seen so far: the position of the next token (the furthest row's)."""
        return self._length

    def advance(self, n: int):
        """n more tokens seen: the count and the step's position tensor `t` move together."""
        self._length += n
        self.t += n

    def reserve(self, n: int):
        """Make room for n more tokens: check the positions exist and, for Full, grow the slots."""
        end = self._length + n
        if end > self.cfg.max_positions:
            raise ValueError(f"position {end - 1} is past the model's range: it was trained for "
                             f"{self.cfg.max_positions} positions (max_position_embeddings); "
                             f"use a shorter prompt or fewer new tokens")
        if not self.policy.bounded and end > self.slots:
            slots = min(max(2 * self.slots, end), self.cfg.max_positions)
            for layer in self.layers:
                layer.grow(slots)

    @property
    def slots(self) -> int:
        return self.layers[0].pos.shape[-1]

    def positions(self, layer: int) -> torch.Tensor:
        """The absolute positions layer `layer` keeps: LongTensor [B, Hkv, n], ascending. In a
        ragged batch a row that keeps fewer than n states starts with -1s."""
        pos = self.layers[layer].pos
        n = min(self._length, self.policy.size) if self.policy.bounded else self._length
        return pos.sort(-1).values[..., pos.shape[-1] - n:]

    def set_row(self, b: int, other: "MultiState"):
        """Make row b of this multi-state a copy of the batch-1 multi-state `other` (a prompt
        run on its own: how a ragged batch is filled, one prompt at a time)."""
        n = other.slots if self.policy.bounded else other.length
        self.reserve(max(0, other.length - self._length))
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys[b, :, :n] = theirs.keys[0, :, :n]
            mine.values[b, :, :n] = theirs.values[0, :, :n]
            mine.pos[b] = -1
            mine.pos[b, :, :n] = theirs.pos[0, :, :n]
            for name, m in mine.memory.items():
                m[b, :, :n] = theirs.memory[name][0, :, :n]
        self.t[b] = other.t[0]
        self._length = max(self._length, other.length)

    def select(self, rows):
        """Keep only the given rows (a LongTensor of row indices): rows that finished stop
        costing work. The buffers are new tensors (a compiled step compiles once more)."""
        rows = torch.as_tensor(rows, device=self.t.device)
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.pos = layer.pos[rows]
            layer.memory = {name: m[rows] for name, m in layer.memory.items()}
            static(layer.keys, layer.values, layer.pos, *layer.memory.values())
        self.t = self.t[rows]
        static(self.t)
        self.batch_size = len(rows)
        return self

    def fake(self, position: int, spread: int = 0):
        """For benchmarks: make this multi-state look as it would at `position`, its slots filled
        with random keys and values (a step's cost depends only on the shapes). spread > 0: a
        ragged batch, row b that many tokens behind row 0 times b / B."""
        self.reserve(position - self._length)
        for b in range(self.batch_size):
            at = position - spread * b // self.batch_size              # row b's position
            n = min(at, self.policy.size) if self.policy.bounded else at
            for layer in self.layers:
                layer.keys[b, :, :n].normal_()
                layer.values[b, :, :n].normal_()
                layer.pos[b, :, :n] = torch.arange(at - n, at, device=layer.pos.device)
            self.t[b] = at
        self._length = position
        return self

    def nbytes(self) -> int:
        """Bytes held by the multi-state's buffers (keys, values, positions, policy memory)."""
        return sum(x.numel() * x.element_size() for layer in self.layers
                   for x in (layer.keys, layer.values, layer.pos, *layer.memory.values()))

    def __repr__(self):
        return (f"MultiState({self.policy}, batch={self.batch_size}, layers={len(self.layers)}, "
                f"slots={self.slots}, t={self._length})")


def owner_of(cfg, dtype, device) -> dict:
    """What a multi-state must match to be used by a model."""
    return {"layers": cfg.n_layers, "kv heads": cfg.n_kv_heads, "head dim": cfg.head_dim,
            "range": cfg.max_positions, "dtype": dtype, "device": torch.device(device)}

"""The multi-state H_t: the key-value cache read as an RNN's hidden state.

For layer l, H^l_t is a set of at most k states, one per kept token; a state is that token's
absolute position p, its key K_p and its value V_p, per KV head. Under the `original` position
scheme a key is stored rotated by RoPE at p and never re-rotated; a renumbered multi-state
(`cache`, `compressed`: positions.py) stores it un-rotated and rotates it at each step. It lives in
preallocated slots:

    keys, values  [B, Hkv, S, D]   keys (see above), values
    pos           [B, Hkv, S]      the position each slot holds; -1 marks an empty slot
    memory        {name: [B, Hkv, S]}  per-state memory the policy asked for (H2O's sums)

A bounded policy of size k gets S = k + 1 slots: k states and one free slot for the incoming token.
Each layer gets its own budget's (`Policy.budget`: PyramidKV's differ by layer); where a layer's
KV heads have budgets of their own (DuoAttention), S = the largest + 1, and a head evicts as soon
as it holds more than its own budget, so its extra slots stay empty.
Eviction only marks a slot empty (pos = -1) and the next token is written into it, so a step
never copies, gathers or re-sorts the cache (under `cache` and `compressed` positions it also
sorts the slots' positions and rotates the k + 1 keys afresh, into a copy, to renumber them; the
cache stays where it is). Slots are therefore in no particular order; `positions()` sorts them
for reading.

Positions `t` may be one for the whole batch (a 0-dim tensor or an int) or one per row
([B, 1, 1]); the latter lets rows of one batch sit at different positions (msrnn.hf, padding).
"""

from dataclasses import dataclass, fields

import torch

from . import group as groups
from .policies import Candidates, Policy, budgets, check_fits
from .positions import Rotation, Scheme, check_range


def static(*buffers):
    """On CUDA, tell torch.compile that these buffers keep their address from step to step, so
    that a step compiled with CUDA graphs ("reduce-overhead") updates them in place instead of
    copying them in and out of its own memory every step."""
    for x in buffers:
        if x.is_cuda:
            torch._dynamo.mark_static_address(x)


def per_row(policy, batch: int) -> tuple:
    """One policy per row: `policy` for every row, or a list of `batch` policies (a sweep's
    configurations as the rows of one batch)."""
    if not isinstance(policy, (list, tuple)):
        return (policy,) * batch
    if len(policy) != batch:
        raise ValueError(f"{len(policy)} policies for a batch of {batch} rows: give one policy "
                         f"per row, or one policy for all of them")
    return tuple(policy)


def runs(policies) -> list:
    """[(rows, policy)]: the rows in maximal runs of neighbours that share one policy, each a
    slice. A run's tensors are views (x[rows]), so its policy scores its rows at once and its
    memory updates land in the multi-state's own buffers."""
    out, start = [], 0
    for b in range(1, len(policies) + 1):
        if b == len(policies) or policies[b] != policies[start]:
            out.append((slice(start, b), policies[start]))
            start = b
    return out


class LayerState:
    """H^l, one layer's multi-state, with the two operations of a step:
    insert (C = H_{t-1} ∪ {t}) and evict (H_t = C \\ {e}).

    `policy`: one for every row, or one per row (a list): rows of one batch may each evict by
    their own policy and keep their own budget, in slots of the largest; a Full row beside
    bounded ones keeps every token in slots that never run out (MultiState checks)."""

    def __init__(self, policy, batch: int, n_kv: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device, rotation: Rotation | None = None, group=None,
                 layer: int = 0, budget=None, heads=None):
        policies = per_row(policy, batch)
        self.runs = runs(policies)         # [(rows, policy)]: neighbours that share a policy
        self.bounded = any(p.bounded for p in policies)
        self.rotation = rotation    # None: keys stay at their absolute positions (positions.py)
        self.group = group          # tensor parallel: the ranks holding the layer's other heads
        self.layer = layer          # the index the policy sees (Candidates.layer)
        self.heads = tuple(range(n_kv) if heads is None else heads)   # KV heads, in the layer
        # Each row's budget per KV head, and where any keeps fewer than slots - 1, the limit
        # [B, Hkv, 1] that `evict` enforces row by row and head by head (row_budgets).
        self.budgets, self.limit = row_budgets(policies, budget, slots, n_kv, device)
        self.keys = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, n_kv, slots), -1, dtype=torch.long, device=device)
        # A policy's memory is kept in at least float32, whatever the model's dtype; rows of
        # other policies leave a buffer at 0.
        mem_dtype = torch.promote_types(dtype, torch.float32)
        names = dict.fromkeys(name for _, p in self.runs for name in p.memory)
        self.memory = {name: torch.zeros(batch, n_kv, slots, dtype=mem_dtype, device=device)
                       for name in names}
        static(self.keys, self.values, self.pos, *self.memory.values())

    @property
    def policy(self):
        """The policy of every row (None where rows differ)."""
        return self.runs[0][1] if len(self.runs) == 1 else None

    def each(self, row: int = 0) -> tuple:
        """Each KV head's budget in row `row` (Full: its slots)."""
        return tuple(self.pos.shape[-1] if b is None else b for b in self.budgets[row])

    def insert(self, k, v, t):
        """C = H_{t-1} ∪ {t}: write the new token's key K_t and value V_t (k, v [B, Hkv, D]; k is
        not the size) into a free slot.

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
        KV head), let each row's policy score its candidates and empty the slot of the lowest."""
        if not self.bounded:                                      # Full: nothing leaves
            return
        t = torch.as_tensor(t, device=probs.device)

        def seen(rows, policy):                       # what a run's policy sees of this step
            a = average(probs[rows], policy, self.group)
            return Candidates(a, a, self.pos[rows], t[rows] if t.dim() else t, self.keys[rows],
                              self.values[rows], memory(self.memory, rows, policy), self.layer,
                              self.heads)

        key = rank(self.runs, seen, probs.dtype)
        if self.limit is not None:   # a head over its own budget evicts, though a slot is empty
            over = (self.pos >= 0).sum(-1, keepdim=True) > self.limit          # [B, Hkv, 1]
            key = key.masked_fill((self.pos < 0) & over, torch.inf)
        lowest = key == key.amin(-1, keepdim=True)
        # Among the lowest, the oldest position leaves (empty slots, at -1, come first).
        oldest = torch.where(lowest, self.pos, torch.iinfo(torch.long).max)
        victim = oldest.argmin(-1)                                # [B, Hkv]
        B, Hkv = victim.shape
        rows = torch.arange(B, device=victim.device)[:, None].expand(B, Hkv)
        self.pos[rows, torch.arange(Hkv, device=victim.device).expand(B, Hkv), victim] = -1

    def keep_best(self, keys, values, pos, last: dict, total=None):
        """Compress a whole prompt at once (docs/design.md, `oneshot`): from T candidates with
        keys and values [B, Hkv, T, D] at positions pos [B, 1, T] (-1: padding), keep the
        min(T, size) ranked best by each row's policy from what it reads: the attention row of
        its observation window last[ω] [B, Hkv, G, T] and the column sums of the prompt's
        attention total [B, Hkv, G, T] (absent where no policy reads them), in slots 0, 1, ...
        by position; a row or KV head with a budget of its own keeps min(T, its budget), its
        other slots empty."""
        B, n_kv, T, D = keys.shape
        pos = pos.expand(B, n_kv, T)
        wide = torch.promote_types(keys.dtype, torch.float32)
        memory_ = {name: torch.zeros(B, n_kv, T, dtype=m.dtype, device=m.device)
                   for name, m in self.memory.items()}

        def seen(rows, policy):                       # what a run's policy sees of the prompt
            row = last.get(policy.observation)
            a = average(row[rows].to(wide), policy, self.group) if row is not None else None
            a_sum = average(total[rows].to(wide), policy, self.group) if total is not None else a
            return Candidates(a, a_sum, pos[rows], pos[rows].amax(-1, keepdim=True),
                              keys[rows], values[rows], memory(memory_, rows, policy),
                              self.layer, self.heads, prompt=True)

        key = rank(self.runs, seen, wide)
        n = min(T, self.pos.shape[-1] - 1)                  # the largest budget of the layer
        kept, dropped = best(key, pos, n, self.limit)
        self.keys[:, :, :n] = keys.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.values[:, :, :n] = values.gather(2, kept[..., None].expand(-1, -1, -1, D))
        self.pos[:, :, :n] = pos.gather(-1, kept).masked_fill(dropped, -1)
        for name, m in self.memory.items():
            m[:, :, :n] = memory_[name].gather(-1, kept)

    def append(self, keys, values, pos, start: int):
        """Full's multi-state grows in order: write T new states [B, Hkv, T, D] at positions
        pos [B, T] (-1: padding) into slots start .. start+T-1, which nothing has used yet."""
        T = keys.shape[2]
        self.keys[:, :, start:start + T] = keys
        self.values[:, :, start:start + T] = values
        self.pos[:, :, start:start + T] = pos[:, None]

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

    def select(self, rows):
        """Keep the given rows (a LongTensor of row indices, repeats allowed: beam search)."""
        self.keys, self.values, self.pos = self.keys[rows], self.values[rows], self.pos[rows]
        self.memory = {name: m[rows] for name, m in self.memory.items()}
        policies = [p for r, p in self.runs for _ in range(r.start, r.stop)]
        self.runs = runs([policies[int(b)] for b in rows])
        self.budgets = tuple(self.budgets[int(b)] for b in rows)
        if self.limit is not None:
            self.limit = self.limit[rows]
        static(self.keys, self.values, self.pos, *self.memory.values())


def rank(runs, seen, dtype):
    """The key [B, Hkv, S] each slot is evicted by (lowest first), run by run: `seen(rows,
    policy)` is what the run's policy sees (Candidates); it observes, then scores."""
    keys = []
    for rows, policy in runs:
        c = seen(rows, policy)
        policy.observe(c)
        keys.append(priority(c, policy, dtype))
    return keys[0] if len(keys) == 1 else torch.cat(keys)


def best(key, pos, n: int, limit=None):
    """A oneshot prompt's kept candidates: (indices [B, Hkv, n] in order of position, which of
    them are dropped), the n best by key [B, Hkv, T] (highest first; ties: the newest by pos),
    a row or head with a limit [B, Hkv, 1] keeping only its own budget's best (the rest are
    dropped: index T - 1, marked)."""
    T = key.shape[-1]
    # Best first: highest score, then (ties) the newest; two stable sorts give that order.
    by_age = pos.argsort(dim=-1, descending=True, stable=True)
    order = by_age.gather(-1, key.gather(-1, by_age).argsort(dim=-1, descending=True,
                                                             stable=True))
    dropped = torch.arange(n, device=key.device) >= (n if limit is None else limit)
    return order[..., :n].masked_fill(dropped, T).sort(-1).values.clamp(max=T - 1), dropped


def row_budgets(policies, budget, slots: int, n_kv: int, device) -> tuple:
    """(each row's budget per KV head, the limit [B, Hkv, 1] or None): `budget` is one per row
    (a list) or one for all (Policy.budget: an int, or a tuple with one per KV head, this
    rank's; None: the policy's size). A Full row beside bounded ones never evicts: its budget
    is every slot but the free one. A limit exists where any row or head keeps fewer than
    slots - 1 (a plain bounded layer fills its k + 1 slots and evicts one, no limit needed)."""
    budget = budget if isinstance(budget, list) else [budget] * len(policies)
    bounded, each = any(p.bounded for p in policies), []
    for p, b in zip(policies, budget):
        b = p.size if b is None else b
        if b is None and bounded:
            b = slots - 1
        each.append(b if isinstance(b, tuple) else (b,) * n_kv)
    if bounded and any(b != slots - 1 for row in each for b in row):
        return tuple(each), torch.tensor(each, device=device).view(len(each), n_kv, 1)
    return tuple(each), None


def average(probs, policy, group=None):
    """Attention per candidate, averaged over the query heads that share the eviction:
    [B, Hkv, G, S] -> [B, Hkv, S] over a KV head's group, or [B, 1, S] over the layer
    (sharded by KV head, msrnn.tp: over the heads of every rank, the same on each)."""
    if policy.per_head:
        return probs.mean(2)
    return groups.mean(probs, (1, 2), group).unsqueeze(1)   # every rank's heads


def priority(c: Candidates, policy, dtype):
    """The policy's scores [B, Hkv, S], with the rules every policy shares: positions below
    `sinks` are never evicted, and an empty slot is always the first to be 'evicted' (a Full
    row beside bounded ones: only empty slots are)."""
    if not policy.bounded:
        score = torch.full(c.pos.shape, torch.inf, dtype=dtype, device=c.pos.device)
    else:
        score = policy.score(c).to(dtype).expand(c.pos.shape)
        score = score.masked_fill(c.pos < policy.sinks, torch.inf)
    return score.masked_fill(c.pos < 0, -torch.inf)


def memory(buffers: dict, rows: slice, policy) -> dict:
    """The rows' views of the memory buffers `policy` keeps (Policy.memory)."""
    return {name: buffers[name][rows] for name in policy.memory}


@dataclass(frozen=True)
class Shape:
    """What a multi-state is made for, and what a model must match to use it."""

    layers: int
    kv_heads: int
    head_dim: int
    positions: int            # the model's range (max_position_embeddings)
    dtype: torch.dtype
    device: torch.device
    group: object = None      # tensor parallel: the ranks sharing the model (kv_heads: this one's)

    def differences(self, other: "Shape") -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)} (this model: {getattr(other, f.name)})"
                         for f in fields(self) if getattr(self, f.name) != getattr(other, f.name))


def mine(budget, heads: range) -> tuple:
    """(a layer's budget for this rank's KV heads `heads`, its slots: the largest + 1)."""
    if isinstance(budget, tuple):
        budget = budget[heads.start:heads.stop]
    return budget, (max(budget) if isinstance(budget, tuple) else budget) + 1


class MultiState:
    """H_t for the whole model: one LayerState per layer, plus the position of the next token.

    Bounded policies hold k + 1 slots per layer for the whole run. Full (the unbounded
    transformer) starts with `capacity` slots (default 256; a bounded policy ignores it) and
    doubles them whenever the next tokens would not fit, up to the model's range; pass the final
    length as `capacity` to allocate once (msrnn.generate does).

    `positions`: the scheme that numbers the states for RoPE ("original", "cache",
    "compressed"; positions.py), with `rope` the model's RoPE (positions -> cos, sin), which
    the renumbering schemes rotate by. Positions past the model's range are refused (`reserve`)
    unless `allow_past_range`.

    A multi-state belongs to the model that made it (`model.init_state`, or a transformers
    model's MultiStateCache): `shape` records what it was made for, and `check` (below) refuses
    any other model, and token ids that model cannot read. `model` is that backend (set by
    init_state), which `save` names in the file (msrnn.statefile)."""

    def __init__(self, shape: Shape, policy, batch_size: int, capacity=None,
                 positions="original", allow_past_range: bool = False, rope=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # One policy for every row, or one per row (a sweep's configurations as rows).
        self.policies = per_row(policy, batch_size)
        check_policy(self.policies, shape)
        kinds = unique(self.policies)
        self.policy = kinds[0] if len(kinds) == 1 else self.policies
        self.bounded = any(p.bounded for p in kinds)
        full = check_rows(self.policies, capacity)
        self.shape, self.batch_size = shape, batch_size
        self.room = capacity if self.bounded and full else None     # what Full rows can hold
        self.model = None                                  # the backend that made it
        # The position scheme (positions.py). Full keeps every position, which any scheme
        # numbers 0, 1, ...: its keys stay at their absolute positions (Rotation.fixed).
        self.scheme, self.allow_past_range = Scheme.of(positions), bool(allow_past_range)
        self.rotation = None
        if self.scheme is not Scheme.ORIGINAL and self.bounded:
            if rope is None:
                raise ValueError(f"positions {self.scheme.value!r} rotate keys by the model's "
                                 f"RoPE: make the multi-state with model.init_state")
            fixed = torch.tensor([not p.bounded for p in self.policies], device=shape.device)
            self.rotation = Rotation(self.scheme, rope, fixed if full else None)
        # Tokens seen = the position of the next token: per row in `t` (rows of a ragged batch
        # differ), and the most of any row in `_length` (for ranges and Full's slots).
        self._length = 0
        self.t = torch.zeros(batch_size, dtype=torch.long, device=shape.device)
        static(self.t)
        self.layers = layer_states(shape, self.policies, batch_size, capacity, self.rotation)

    @property
    def length(self) -> int:
        """Tokens seen so far (the paper's t after step t): the position of the next token (the
        furthest row's)."""
        return self._length

    def advance(self, n: int):
        """n more tokens seen: the count and the step's position tensor `t` move together."""
        self._length += n
        self.t += n

    def reserve(self, n: int, parallel: bool = False):
        """Make room for n more tokens (`parallel`: in one pass): check that their rotary
        positions stay in the model's range under this multi-state's scheme (positions.py) and,
        for Full, grow the slots (the one place Full's multi-state grows, for either backend)."""
        end = self._length + n
        check_range(self.policy, self.scheme, self.shape.positions, end,
                    end if parallel else 0, self.allow_past_range, layers=self.shape.layers)
        if self.room is not None and end > self.room:
            raise ValueError(f"{end} tokens do not fit the Full rows of this multi-state, made "
                             f"with capacity={self.room} beside bounded rows; make it with "
                             f"capacity >= {end}")
        if not self.bounded and end > self.slots:
            slots = max(2 * self.slots, end)
            if not self.allow_past_range:
                slots = min(slots, self.shape.positions)
            for layer in self.layers:
                layer.grow(slots)

    @property
    def slots(self) -> int:
        """Slots per layer (the most of any layer, where budgets differ by layer)."""
        return max(layer.pos.shape[-1] for layer in self.layers)

    def total_budget(self, row: int = 0) -> int:
        """The most states row `row` holds, summed over its layers and KV heads: the memory a
        budget costs (Full: its slots)."""
        return sum(sum(layer.each(row)) for layer in self.layers)

    def positions(self, layer: int) -> torch.Tensor:
        """The absolute positions layer `layer` keeps: LongTensor [B, Hkv, n], ascending. In a
        ragged (or padded) batch a row that keeps fewer than n states starts with -1s. After t
        tokens a bounded layer keeps n = min(t, k): k + 1 slots, one emptied per step
        (docs/msrnn.md, g(t))."""
        pos = self.layers[layer].pos.sort(-1).values
        n = int((pos >= 0).sum(-1).max()) if pos.numel() else 0
        return pos[..., pos.shape[-1] - n:]

    def set_rows(self, start: int, other: "MultiState"):
        """Make rows start, start+1, ... a copy of `other`'s rows (a multi-state of the same
        scheme and, row by row, the same policies): how a ragged batch is filled, one prompt at
        a time, and how configurations that shared one prompt pass become one batch."""
        copy_rows(self, start, other)

    def select(self, rows):
        """Keep only the given rows (a LongTensor of row indices): rows that finished stop
        costing work; with repeats, beams follow their parents. The buffers are new tensors (a
        compiled step compiles once more)."""
        rows = torch.as_tensor(rows, device=self.t.device)
        for layer in self.layers:
            layer.select(rows)
        self.policies = tuple(self.policies[int(b)] for b in rows)
        if self.rotation is not None and self.rotation.fixed is not None:
            self.rotation.fixed = self.rotation.fixed[rows]         # every layer's rotation
        kinds = unique(self.policies)
        self.policy = kinds[0] if len(kinds) == 1 else self.policies
        self.t = self.t[rows]
        static(self.t)
        self.batch_size = len(rows)
        return self

    def resume(self, length: int, t):
        """The count of a multi-state read back from a file (msrnn.statefile): `length` tokens
        seen, each row at its position t [B]. Its slots hold the states already."""
        self._length = length
        self.t.copy_(t)

    def save(self, path: str, session: dict | None = None):
        """Write this multi-state to `path` (safetensors, atomically; msrnn.statefile)."""
        from . import statefile
        statefile.save(self, path, session)

    @classmethod
    def load(cls, path: str, model) -> "MultiState":
        """A saved multi-state, in `model` (either backend), ready to continue bit for bit."""
        from . import statefile
        return statefile.load(path, model)

    def nbytes(self) -> int:
        """Bytes held by the multi-state's buffers (keys, values, positions, policy memory)."""
        return sum(x.numel() * x.element_size() for layer in self.layers
                   for x in (layer.keys, layer.values, layer.pos, *layer.memory.values()))

    def __repr__(self):
        policy = self.policy if isinstance(self.policy, Policy) else list(self.policy)
        return (f"MultiState({policy}, batch={self.batch_size}, layers={len(self.layers)}, "
                f"slots={self.slots}, t={self._length}, positions={self.scheme.value!r})")


def check_rows(policies, capacity) -> list:
    """The rows that hold Full beside bounded ones (they need a `capacity`: their slots cannot
    grow)."""
    full = [b for b, p in enumerate(policies) if not p.bounded]
    if full and len(full) < len(policies) and capacity is None:
        raise ValueError(f"row{'s' * (len(full) > 1)} {', '.join(map(str, full))} keep every "
                         f"token (Full) beside bounded rows, in slots that cannot grow: give "
                         f"capacity= (the most tokens a row will see)")
    return full


def layer_states(shape: Shape, policies, batch: int, capacity, rotation) -> list:
    """One LayerState per layer, with each row's budget (Policy.budget, checked by
    check_policy); under tensor parallelism a per-head budget's part for this rank's heads
    (group.heads). A layer's slots are its largest budget's + 1; Full alone starts with
    `capacity` and grows (MultiState.reserve), Full beside bounded rows holds `capacity` + 1
    for good."""
    heads, n_kv = groups.heads(shape.kv_heads, shape.group, shape.device)
    kinds = unique(policies)
    table = [budgets(p, shape.layers, n_kv) for p in kinds]
    rows = [table[kinds.index(p)] for p in policies]                        # [B][layer]
    bounded, out = any(p.bounded for p in kinds), []
    for layer in range(shape.layers):
        parts = [mine(r[layer], heads) if r else (None, (capacity or 0) + 1) for r in rows]
        slots = max(n for _, n in parts) if bounded else capacity or min(256, shape.positions)
        out.append(LayerState(policies, batch, shape.kv_heads, slots, shape.head_dim,
                              shape.dtype, shape.device, rotation, shape.group, layer,
                              [b for b, _ in parts], heads))
    return out


def copy_rows(state: MultiState, start: int, other: MultiState):
    """MultiState.set_rows: `other`'s rows into `state`'s rows start, start+1, ..."""
    r = slice(start, start + other.batch_size)
    if other.scheme is not state.scheme:
        raise ValueError(f"rows {start}.. have positions {state.scheme.value!r}, the "
                         f"multi-state copied into them {other.scheme.value!r}; use one scheme")
    if other.policies != state.policies[r]:
        raise ValueError(f"rows {start}.. have policies {list(state.policies[r])}, the "
                         f"multi-state copied into them {list(other.policies)}; use the rows' "
                         f"policies")
    state.reserve(max(0, other.length - state.length))
    for ours, theirs in zip(state.layers, other.layers):
        n = theirs.pos.shape[-1] if theirs.bounded else other.length
        ours.keys[r, :, :n] = theirs.keys[:, :, :n]
        ours.values[r, :, :n] = theirs.values[:, :, :n]
        ours.pos[r] = -1
        ours.pos[r, :, :n] = theirs.pos[:, :, :n]
        for name, m in theirs.memory.items():
            ours.memory[name][r, :, :n] = m[:, :, :n]
    state.t[r] = other.t
    state._length = max(state.length, other.length)


def unique(policies) -> list:
    """The distinct policies of a list, in order of first appearance."""
    out = []
    for p in policies:
        if p not in out:
            out.append(p)
    return out


def check_policy(policy, shape: Shape):
    """A policy a multi-state of `shape` can hold (or a list of them, one per row): a Policy
    whose budgets are valid for every layer (and, in one process, every KV head: a rank holds
    only some), each smaller than the model's range."""
    for p in unique(policy if isinstance(policy, (list, tuple)) else [policy]):
        if not isinstance(p, Policy):
            raise TypeError(f"policy must be an msrnn.policies.Policy (e.g. "
                            f"msrnn.policies.TOVA(64)), or a list of them with one per row, "
                            f"got {p!r}")
        check_fits(p, shape.positions, f"the model's range of {shape.positions} positions",
                   layers=shape.layers, kv_heads=shape.kv_heads if shape.group is None else None)


def check(state, token_ids, dims: int, shape: Shape, vocab_size: int):
    """Clear errors for token ids of the wrong shape, type or range (a step: [B]; a prompt:
    [B, T], T >= 1), and for a multi-state made for another model or batch: what every backend
    checks before a step or a prompt pass."""
    what = "[B]" if dims == 1 else "[B, T]"
    if not torch.is_tensor(token_ids) or token_ids.dim() != dims:
        got = tuple(token_ids.shape) if torch.is_tensor(token_ids) else type(token_ids).__name__
        raise ValueError(f"token_ids must be a LongTensor of shape {what}, got {got}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or \
            token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must hold integer token ids, got dtype {token_ids.dtype}")
    if dims == 2 and token_ids.shape[1] == 0:
        raise ValueError("empty prompt: give at least one token")
    if token_ids.numel() and not (0 <= int(token_ids.min()) and
                                  int(token_ids.max()) < vocab_size):
        raise ValueError(f"token ids must be in 0..{vocab_size - 1} (the model's "
                         f"vocabulary), got {int(token_ids.min())}..{int(token_ids.max())}")
    if not isinstance(state, MultiState):
        raise TypeError(f"state must be a MultiState from model.init_state, got "
                        f"{type(state).__name__}")
    if state.shape != shape:
        raise ValueError(f"this multi-state was made by another model: "
                         f"{state.shape.differences(shape)}; make it with this model's "
                         f"init_state")
    if token_ids.shape[0] != state.batch_size:
        raise ValueError(f"token_ids has batch size {token_ids.shape[0]}, but the multi-state "
                         f"was made for {state.batch_size} (model.init_state(batch_size=...))")
    groups.same(token_ids, shape.group)

"""The plain reference (tests/reference_families.py, over tests/reference.py) with budgets run
literally, and the rules of the policies in examples/policies/. Nothing here imports msrnn.

    ref = Budgeted(hf, Rule.tova(16), budgets=[24, 8])        # layer 0 keeps 24, layer 1 keeps 8
    ref = Budgeted(hf, Rule("duo", 16, sinks=2, per_head=True),
                   budgets=[[16, 6], [6, 16]], retrieval={(0, 0), (1, 1)})

budgets[l] is layer l's k: an int (the layer's), or a list with one k per KV head. Each KV head
has its own list of states (reference.py) and evicts one when it holds more than its own k, by
the rule; a layer-wise rule makes one choice for all heads (their budgets are one int).

The examples' rules, beside reference.py's kinds:
  snapkv  decoding: TOVA per KV head. oneshot: score_j = the mean over the KV head's query
          group and the last `observation` queries i of a_{h,i}(j), then the max of score over
          the positions j - kernel//2 .. j + kernel//2 (those in the prompt); positions < sinks
          first, then the best by that, ties keeping the newer.
  duo     per KV head: the heads in `retrieval` ((layer, head) pairs) rank as TOVA per KV head,
          the others as Window (the oldest leaves); positions < sinks are never evicted.
  hash    a seeded pseudo-random draw per (layer, position, step), integers throughout:
          x = (seed 1000003 + layer 7919 + p 104729 + t 15485863) mod M, then twice
          x = (x^2 + c) mod M (c = 12345, then 67890), M = 2^24 - 3; the lowest x leaves
          (ties: the oldest), positions < sinks never.
"""

from reference_families import Reference

M = 2 ** 24 - 3


def draw(seed: int, layer: int, p: int, t: int) -> int:
    """The `hash` rule's number for position p at step t (see the module docstring)."""
    x = (seed * 1_000_003 + layer * 7_919 + p * 104_729 + t * 15_485_863) % M
    for c in (12_345, 67_890):
        x = (x * x + c) % M
    return x


class Budgeted(Reference):
    """The reference with one k per layer (or per layer and KV head), and the examples' rules."""

    def __init__(self, hf, rule, budgets, positions="original", observation=1, kernel=1,
                 retrieval=()):
        super().__init__(hf, rule, positions)
        assert len(budgets) == self.n_layers
        for b in budgets:
            assert isinstance(b, int) or (rule.per_head and len(b) == self.n_kv)
        self.budgets, self.observation, self.kernel = budgets, observation, kernel
        self.retrieval = set(retrieval)
        self.l = 0

    def heads_of(self, kv):
        """The query heads that read KV head kv (its group)."""
        return list(range(kv * self.group, (kv + 1) * self.group))

    def k(self, l, kv):
        """KV head kv of layer l keeps at most this many states."""
        b = self.budgets[l]
        return b if isinstance(b, int) else b[kv]

    def layer_step(self, l, x, t, evict):
        self.l = l                                   # which layer's budgets evict (below)
        return super().layer_step(l, x, t, evict)

    # ------------------------------------------------------------------------------ eviction

    def evict(self, C, a, t):
        """As Reference.evict, each KV head against its own k: |C_g| > k(l, kv) -> one leaves."""
        rule, l = self.rule, self.l
        assert rule.kind != "h2o", "budgets are checked with rules that keep no memory"
        if rule.per_head:
            return [[s for s in C[kv] if s.pos != self.choose(C[kv], a, kv, t)]
                    if len(C[kv]) > self.k(l, kv) else C[kv] for kv in range(self.n_kv)]
        if len(C[0]) <= self.k(l, 0):
            return C
        assert all([s.pos for s in C[kv]] == [s.pos for s in C[0]] for kv in range(self.n_kv))
        victim = self.choose(C[0], a, 0, t)
        return [[s for s in C[kv] if s.pos != victim] for kv in range(self.n_kv)]

    def choose(self, cands, a, kv, t):
        """The evicted position among one KV head's candidates (ties: the oldest)."""
        rule, l = self.rule, self.l
        eligible = [s for s in cands if s.pos >= rule.sinks]
        if rule.kind == "hash":
            return min(eligible, key=lambda s: (draw(rule.seed, l, s.pos, t), s.pos)).pos
        if rule.kind == "duo" and (l, kv) not in self.retrieval:
            return min(s.pos for s in eligible)                # a streaming head: the oldest
        if rule.kind in ("duo", "snapkv"):                     # decoding: TOVA per KV head
            heads = self.heads_of(kv)
            return min(eligible, key=lambda s: (self.mean_attention(a, s.pos, heads),
                                                s.pos)).pos
        return self.victim(cands, a, kv)                        # reference.py's kinds

    # ------------------------------------------------------------------------------ prompts

    def oneshot(self, tokens):
        """reference.py's `oneshot` with each head's own k, and the examples' rankings."""
        T = len(tokens)
        logits, layers = self.prompt_attention(tokens)
        for l, attention in enumerate(layers):
            self.H[l] = [[s for s in self.H[l][kv] if s.pos in self.keep(attention, l, kv, T)]
                         for kv in range(self.n_kv)]
        return logits

    def keep(self, attention, l, kv, T):
        """The prompt positions KV head kv of layer l keeps: ranked best first, ties newer."""
        rule, k = self.rule, self.k(l, kv)
        if T <= k:
            return set(range(T))
        protected = list(range(rule.sinks))
        if rule.kind == "window" or (rule.kind == "duo" and (l, kv) not in self.retrieval) \
                or rule.kind == "sinks":
            return set(protected + list(range(T - (k - len(protected)), T)))
        if rule.kind == "hash":
            score = {j: draw(rule.seed, l, j, T - 1) for j in range(T)}
        elif rule.kind in ("tova", "duo", "snapkv"):
            heads = self.heads_of(kv) if rule.per_head else list(range(self.n_heads))
            w = self.observation
            score = {j: sum(float(attention[h][i][j]) for h in heads for i in range(T - w, T))
                     / (len(heads) * w) for j in range(T)}
            r = self.kernel // 2                               # SnapKV: pooled over neighbours
            score = {j: max(score[i] for i in range(max(0, j - r), min(T, j + r + 1)))
                     for j in range(T)}
        else:
            raise ValueError(f"no budgeted oneshot rule for {rule.kind!r}")
        rest = sorted(range(rule.sinks, T), key=lambda j: (-score[j], -j))
        return set(protected + rest[:k - len(protected)])

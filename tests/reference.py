"""A plain, independent reference for DESIGN.md's semantics: the transformer as a multi-state RNN
with a compression policy, computed one token at a time from a Hugging Face model's weights.

Nothing here imports msrnn. It is written to be obviously correct, not fast: Python lists of
states, one loop per layer, per head, per candidate, float64 throughout, and each piece quotes
the rule of DESIGN.md it implements. Tests compare msrnn against it.

    ref = Reference(hf_model, Rule.tova(16))      # hf_model: LlamaForCausalLM / MistralForCausalLM
    logits = ref.step(token_id)                   # [V] float64
    ref.kept(layer)                               # [[positions of KV head 0], [.. head 1], ...]

The multi-state of layer l is `ref.H[l]`: one Python list of states per KV head (layer-wise
policies evict the same position from every KV head's list, so the lists stay identical). A state
is a `State`: absolute position, key (after RoPE at that position, never re-rotated), value, and
the H2O accumulated score.
"""

import math
import random
from dataclasses import dataclass

import torch


# ------------------------------------------------------------------------------------ policies

@dataclass(frozen=True)
class Rule:
    """Which compression policy to apply (DESIGN.md, "Policies").

    kind: "full" | "window" | "sinks" | "h2o" | "tova" | "random"
    size: k, the multi-state size (None for full)
    sinks: i, positions < i are never evicted (sinks, TOVA+i)
    per_head: True: each KV head chooses on its own, scoring with the mean over its query group
              (H2O, TOVA-head); False: one choice per layer, mean over all query heads
              (H2O-layer, TOVA). Window/Sinks do not look at attention; their choice is shared.
    seed: for "random" only (the reference's own random numbers; they cannot match msrnn's).
    """

    kind: str
    size: int | None = None
    sinks: int = 0
    per_head: bool = False
    seed: int = 0

    @staticmethod
    def full():
        return Rule("full")

    @staticmethod
    def window(k):
        return Rule("window", k)

    @staticmethod
    def sinks_(k, i):
        return Rule("sinks", k, sinks=i)

    @staticmethod
    def h2o(k):
        return Rule("h2o", k, per_head=True)

    @staticmethod
    def h2o_layer(k):
        return Rule("h2o", k, per_head=False)

    @staticmethod
    def tova(k, sinks=0):
        return Rule("tova", k, sinks=sinks)

    @staticmethod
    def tova_head(k):
        return Rule("tova", k, per_head=True)

    @staticmethod
    def random(k, seed=0):
        return Rule("random", k, seed=seed)


@dataclass
class State:
    """One state of the multi-state, for one KV head: (absolute position p, K_p after RoPE at p,
    V_p), plus A_p, the attention it has received summed over the steps since it entered (H2O)."""

    pos: int
    key: torch.Tensor
    value: torch.Tensor
    acc: float = 0.0


# ------------------------------------------------------------------------------ the arithmetic

def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps)."""
    return weight * (x / math.sqrt(float((x * x).mean()) + eps))


def rope(x, p, theta):
    """RoPE at position p in Hugging Face's rotate-half layout: with D = len(x) and
    theta_i = theta^(-2i/D), i < D/2, the pair (x_i, x_{i+D/2}) is rotated by the angle p*theta_i:

        out_i       = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i)
        out_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)
    """
    D = x.shape[0]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = p * theta ** (-2.0 * i / D)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def softmax(scores):
    """a_j = exp(s_j) / sum_i exp(s_i), over a Python list of floats."""
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    z = sum(e)
    return [x / z for x in e]


def silu(x):
    return x * torch.sigmoid(x)


# ------------------------------------------------------------------------------- the reference

class Reference:
    """The model as an MSRNN, (x_t, H_{t-1}) -> (y_t, H_t), with one policy (a `Rule`)."""

    def __init__(self, hf, rule: Rule):
        cfg = hf.config
        self.rule = rule
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or self.n_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        # transformers 5 keeps theta and the RoPE type in rope_parameters (alias rope_scaling).
        rope_params = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                       or {})
        if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            raise NotImplementedError("the reference computes default RoPE only")
        self.theta = float(rope_params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        if getattr(cfg, "sliding_window", None) is not None:
            raise NotImplementedError("the reference has no native sliding window; "
                                      "build the Mistral model with sliding_window=None")

        def w(t):
            return t.detach().to(torch.float64).clone()

        m = hf.model
        self.embed = w(m.embed_tokens.weight)
        self.final_norm = w(m.norm.weight)
        self.lm_head = w(hf.lm_head.weight)
        self.layers = [dict(attn_norm=w(L.input_layernorm.weight),
                            q=w(L.self_attn.q_proj.weight), k=w(L.self_attn.k_proj.weight),
                            v=w(L.self_attn.v_proj.weight), o=w(L.self_attn.o_proj.weight),
                            mlp_norm=w(L.post_attention_layernorm.weight),
                            gate=w(L.mlp.gate_proj.weight), up=w(L.mlp.up_proj.weight),
                            down=w(L.mlp.down_proj.weight))
                       for L in m.layers]
        for L in m.layers:
            for proj in (L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj,
                         L.self_attn.o_proj):
                assert proj.bias is None, "the reference has bias-free projections only"
        self.rng = random.Random(rule.seed)
        self.t = 0
        # H[l][g]: layer l's multi-state for KV head g, a list of States (empty: H_0).
        self.H = [[[] for _ in range(self.n_kv)] for _ in range(self.n_layers)]

    # ------------------------------------------------------------------------------ reading

    def kept(self, layer):
        """The positions layer `layer` keeps, per KV head, ascending: [[p, ...], ...]."""
        return [sorted(s.pos for s in states) for states in self.H[layer]]

    def kv_head(self, h):
        """GQA: query head h reads KV head h // (H / H_kv)."""
        return h // self.group

    def heads_of(self, g):
        """The query heads that read KV head g (its group)."""
        return [h for h in range(self.n_heads) if self.kv_head(h) == g]

    # ------------------------------------------------------------------------------ one step

    def step(self, token: int, evict: bool = True):
        """One token at position t: every layer is an MSRNN cell, then final norm and LM head.
        Returns the logits [V] (float64). evict=False keeps every candidate (used by `oneshot`)."""
        t = self.t
        x = self.embed[token].clone()
        self.last_rows = []
        for l in range(self.n_layers):
            x = self.layer_step(l, x, t, evict)
        self.t += 1
        return self.lm_head @ rms_norm(x, self.final_norm, self.eps)

    def layer_step(self, l, x, t, evict):
        W, D = self.layers[l], self.head_dim
        h_in = rms_norm(x, W["attn_norm"], self.eps)
        # 1. q_t, k_t, v_t; RoPE at position t.
        q_all, k_all, v_all = W["q"] @ h_in, W["k"] @ h_in, W["v"] @ h_in
        q = [rope(q_all[h * D:(h + 1) * D], t, self.theta) for h in range(self.n_heads)]
        k = [rope(k_all[g * D:(g + 1) * D], t, self.theta) for g in range(self.n_kv)]
        v = [v_all[g * D:(g + 1) * D] for g in range(self.n_kv)]
        # 2. candidates C = H^l_{t-1} ∪ {t}, per KV head.
        C = [self.H[l][g] + [State(t, k[g], v[g])] for g in range(self.n_kv)]
        # a_h = softmax(q_h · K_C / sqrt(d)) over C; 3. y_h = Σ_j a_h(j) V_j.
        # a[h] maps each candidate position to query head h's attention weight on it.
        a, outputs = [], []
        for h in range(self.n_heads):
            cands = C[self.kv_head(h)]
            probs = softmax([float(q[h] @ s.key) / math.sqrt(D) for s in cands])
            a.append({s.pos: p for s, p in zip(cands, probs)})
            y_h = torch.zeros(D, dtype=torch.float64)
            for s, p in zip(cands, probs):
                y_h = y_h + p * s.value
            outputs.append(y_h)
        self.last_rows.append(a)
        x = x + W["o"] @ torch.cat(outputs)
        # 4. if |C| > k the policy evicts one candidate: H^l_t = C \ {e}.
        self.H[l] = self.evict(C, a, t) if evict else C
        h_mlp = rms_norm(x, W["mlp_norm"], self.eps)
        return x + W["down"] @ (silu(W["gate"] @ h_mlp) * (W["up"] @ h_mlp))

    # ------------------------------------------------------------------------------ eviction

    def mean_attention(self, a, pos, heads):
        """mean over the query heads `heads` of a_h(pos)."""
        return sum(a[h][pos] for h in heads) / len(heads)

    def scoring_heads(self, g):
        """The heads whose attention a KV head's choice averages: its own query group for
        head-wise policies (H2O, TOVA-head), all query heads for layer-wise ones."""
        return self.heads_of(g) if self.rule.per_head else list(range(self.n_heads))

    def evict(self, C, a, t):
        rule, k = self.rule, self.rule.size
        if rule.kind == "h2o":
            # "A_j = Σ_s mean_{h∈group} a^s_h(j), summed over every step s since j entered, this
            # one included" (H2O-layer: mean over all heads). Accumulate at every step.
            for g in range(self.n_kv):
                for s in C[g]:
                    s.acc += self.mean_attention(a, s.pos, self.scoring_heads(g))
        if k is None or len(C[0]) <= k:      # Full, or |C| <= k: nothing leaves
            return C
        if rule.per_head:
            victims = [self.victim(C[g], a, g) for g in range(self.n_kv)]
        else:
            # One choice for the whole layer, made once (the KV heads' lists hold the same
            # positions; for H2O-layer the same scores), applied to every KV head.
            assert all([s.pos for s in C[g]] == [s.pos for s in C[0]] for g in range(self.n_kv))
            victims = [self.victim(C[0], a, 0)] * self.n_kv
        return [[s for s in C[g] if s.pos != victims[g]] for g in range(self.n_kv)]

    def victim(self, cands, a, g):
        """The evicted position among `cands` (one KV head's candidates; a layer-wise policy
        passes any head's, they are identical). Ties break toward the oldest position: among
        the eligible candidates with the minimal score, the smallest position is evicted."""
        rule, k = self.rule, self.rule.size
        if rule.kind == "window":
            # Window(k): "the oldest position".
            eligible, score = cands, (lambda s: s.pos)
        elif rule.kind == "sinks":
            # Sinks(k, i): "the oldest position >= i (the first i tokens are never evicted)".
            eligible, score = [s for s in cands if s.pos >= rule.sinks], (lambda s: s.pos)
        elif rule.kind == "h2o":
            # H2O(k): "among candidates other than the k//2 most recent (the new token counts as
            # one of them): lowest accumulated score A_j".
            by_age = sorted(cands, key=lambda s: s.pos, reverse=True)   # newest first
            eligible, score = by_age[k // 2:], (lambda s: s.acc)
        elif rule.kind == "tova":
            # TOVA(k): "argmin_j mean over all query heads of a_h(j)"; TOVA-head: per KV head,
            # the mean over that head's query group. TOVA+i protects positions < i.
            heads = self.scoring_heads(g)
            eligible = [s for s in cands if s.pos >= rule.sinks]
            score = (lambda s: self.mean_attention(a, s.pos, heads))
        elif rule.kind == "random":
            # Random(k): any candidate (the new token included) with equal probability.
            eligible = [s for s in cands if s.pos >= rule.sinks]
            return self.rng.choice(sorted(s.pos for s in eligible))
        else:
            raise ValueError(f"unknown rule {rule.kind!r}")
        return min(eligible, key=lambda s: (score(s), s.pos)).pos

    # ------------------------------------------------------------------------------ prompts

    def oneshot(self, tokens):
        """DESIGN.md's `oneshot` prompt mode: "full causal attention over the whole prompt, then
        each layer keeps the k states ranked best by the policy from the last prompt token's
        attention row (Window: the last k; Sinks: first i + last k-i; H2O: column sums over all
        prompt queries)". The multi-state must be empty. Returns the prompt's logits [T, V].

        Stepping the prompt with nothing evicted *is* full causal attention: step t's attention
        row over candidates 0..t is row t of the causal attention matrix."""
        assert self.t == 0, "oneshot compresses a prompt into an empty multi-state"
        T = len(tokens)
        rows = []                                  # rows[t][l][h] = {pos: a_h(pos)} at query t
        logits = []
        for tok in tokens:
            logits.append(self.step(tok, evict=False))
            rows.append(self.last_rows)
        for l in range(self.n_layers):
            # attention[h][i][j]: query i's weight on key j (0 above the diagonal).
            attention = [[[rows[i][l][h].get(j, 0.0) for j in range(T)] for i in range(T)]
                         for h in range(self.n_heads)]
            keep = oneshot_keep(attention, self.rule, self.n_kv)
            new = []
            for g in range(self.n_kv):
                states = [s for s in self.H[l][g] if s.pos in keep[g]]
                if self.rule.kind == "h2o":
                    # Decoding goes on accumulating from the prompt's column sums.
                    heads = self.scoring_heads(g)
                    for s in states:
                        s.acc = sum(attention[h][i][s.pos] for h in heads
                                    for i in range(T)) / len(heads)
                new.append(states)
            self.H[l] = new
        return torch.stack(logits)


def oneshot_keep(attention, rule: Rule, n_kv: int):
    """Which prompt positions a layer keeps under `oneshot`, per KV head: a list of n_kv sorted
    lists. attention: [H][T][T] nested lists or a tensor, attention[h][i][j] = query i's causal
    attention weight on key j (e.g. Hugging Face's output_attentions for one layer and row).

    Ranked best first by the policy's score, ties keeping the newer position:
      Full: everything. Window: the last k. Sinks: the first i + the last k - i.
      TOVA: positions < sinks, then the best by the last row averaged over all heads
            (TOVA-head: over the KV head's query group).
      H2O:  the k//2 most recent, then the best of the rest by column sums over all prompt
            queries, averaged over the KV head's query group (H2O-layer: over all heads)."""
    H, T = len(attention), len(attention[0])
    group = H // n_kv
    k = rule.size
    if k is None or T <= k:
        return [list(range(T)) for _ in range(n_kv)]

    def a(h, i, j):
        return float(attention[h][i][j])

    result = []
    for g in range(n_kv):
        heads = [h for h in range(H) if h // group == g] if rule.per_head else list(range(H))
        if rule.kind == "window":
            keep = list(range(T - k, T))
        elif rule.kind == "sinks":
            keep = list(range(rule.sinks)) + list(range(T - (k - rule.sinks), T))
        elif rule.kind == "tova":
            protected = list(range(rule.sinks))
            score = {j: sum(a(h, T - 1, j) for h in heads) / len(heads) for j in range(T)}
            rest = sorted(range(rule.sinks, T), key=lambda j: (-score[j], -j))
            keep = protected + rest[:k - len(protected)]
        elif rule.kind == "h2o":
            recent = list(range(T - k // 2, T))
            score = {j: sum(a(h, i, j) for h in heads for i in range(T)) / len(heads)
                     for j in range(T)}
            rest = sorted(range(T - k // 2), key=lambda j: (-score[j], -j))
            keep = recent + rest[:k - len(recent)]
        else:
            raise ValueError(f"oneshot has no rule for {rule.kind!r}")
        result.append(sorted(keep))
    return result

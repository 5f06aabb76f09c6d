"""A plain, independent reference for docs/design.md's semantics: the transformer as a multi-state RNN
with a compression policy, computed one token at a time from a Hugging Face model's weights.

Nothing here imports msrnn. It is written to be obviously correct, not fast: Python lists of
states, one loop per layer, per head, per candidate, float64 throughout, and each piece quotes
the rule of docs/design.md it implements. Tests compare msrnn against it.

    ref = Reference(hf_model, Rule.tova(16))      # hf_model: LlamaForCausalLM / MistralForCausalLM
    logits = ref.step(token_id)                   # [V] float64
    ref.kept(layer)                               # [[positions of KV head 0], [.. head 1], ...]
    Reference(hf_model, Rule.tova(16), positions="cache")    # a position scheme (see below)

The multi-state of layer l is `ref.H[l]`: one Python list of states per KV head (layer-wise
policies evict the same position from every KV head's list, so the lists stay identical). A state
is a `State`: absolute position, key (before RoPE), value, and the H2O accumulated score. At every
step each candidate's key is rotated by RoPE at the rotary position the scheme gives it, computed
afresh from the positions the KV head keeps (`rotary_positions`), and each query at its KV head's
query position: `original`, the absolute positions; `cache`, the ranks 0..|C|-1; `compressed`,
the running sums of the compressed gaps.
"""

import math
import random
from dataclasses import dataclass

import torch


# ------------------------------------------------------------------------------------ policies

@dataclass(frozen=True)
class Rule:
    """Which compression policy to apply (docs/design.md, "Policies").

    kind: "full" | "window" | "sinks" | "h2o" | "tova" | "keynorm" | "random"
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
    def keynorm(k, sinks=0):
        return Rule("keynorm", k, sinks=sinks, per_head=True)

    @staticmethod
    def random(k, seed=0):
        return Rule("random", k, seed=seed)


@dataclass
class State:
    """One state of the multi-state, for one KV head: (absolute position p, K_p before RoPE,
    V_p), plus acc_p, the attention it has received summed over the steps since it entered (H2O).
    `rotated` remembers the key's last rotation (rotary position, rotated key), since under most
    schemes a key keeps its rotary position for many steps."""

    pos: int
    key: torch.Tensor
    value: torch.Tensor
    acc: float = 0.0
    rotated: tuple = (None, None)


def rotary_positions(states, scheme: str):
    """The rotary positions of one KV head's candidates C under a position scheme (docs/design.md,
    "Positions"): ({absolute position: rotary position}, the query's). With p_1 < p_2 < ... the
    absolute positions of C:
      original:   p_i.
      cache:      i - 1 (0, 1, ..., |C| - 1).
      compressed: the running sum of ceil(g(d_j)), j <= i, over the gaps d_1 = p_1,
                  d_j = p_j - p_{j-1}, with g(d) = d for d <= 10, 10 + ln(ln(d - 10 + e)) above.
    The query is the newest candidate's (the new token's)."""
    p = sorted(s.pos for s in states)
    if scheme == "original":
        r = list(p)
    elif scheme == "cache":
        r = list(range(len(p)))
    elif scheme == "compressed":
        r, total, previous = [], 0, 0
        for x in p:
            d = x - previous
            total += d if d <= 10 else math.ceil(10 + math.log(math.log(d - 10 + math.e)))
            r.append(total)
            previous = x
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return dict(zip(p, r)), r[-1]


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


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


# ------------------------------------------------------------------------------- the reference

class Reference:
    """The model as an MSRNN, (x_t, H_{t-1}) -> (y_t, H_t), with one policy (a `Rule`)."""

    def __init__(self, hf, rule: Rule, positions: str = "original"):
        cfg = hf.config
        self.rule, self.scheme = rule, positions
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
        self.family = cfg.model_type
        gemma = self.family == "gemma2"
        # Sliding-window attention, per layer: a query at t sees positions p with t - p < window
        # (Mistral: every layer; Gemma2: the layers config.layer_types marks "sliding_attention").
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.n_layers
        if self.family == "mistral" and window is not None:
            raise NotImplementedError("the reference has no native sliding window for Mistral; "
                                      "build the Mistral model with sliding_window=None")
        self.windows = [window if kind == "sliding_attention" else None for kind in types]
        # Gemma2: scores scaled by query_pre_attn_scalar^-1/2 and soft-capped,
        # cap * tanh(s / cap); logits soft-capped the same way; embeddings times sqrt(width).
        self.scale = (cfg.query_pre_attn_scalar ** -0.5 if gemma
                      else 1.0 / math.sqrt(self.head_dim))
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.embed_scale = math.sqrt(cfg.hidden_size) if gemma else 1.0
        # The MLP's activation: SiLU, or Gemma's tanh-approximated GELU.
        self.act = gelu_tanh if gemma else silu

        def w(t):
            return t.detach().to(torch.float64).clone()

        def norm_weight(norm):
            """Gemma's RMSNorm multiplies by (1 + w); LLaMA's by w."""
            return 1.0 + w(norm.weight) if gemma else w(norm.weight)

        def bias(proj, n):
            """A projection's bias (Qwen2: q, k, v have one), zeros if it has none."""
            return w(proj.bias) if proj.bias is not None else torch.zeros(n, dtype=torch.float64)

        def layer(L):
            A, M, D = L.self_attn, L.mlp, self.head_dim
            nq, nkv = self.n_heads * D, self.n_kv * D
            if hasattr(A, "qkv_proj"):        # Phi3: q, k, v stacked in one matrix, in that order
                qkv = w(A.qkv_proj.weight)
                q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
                qkv_b = bias(A.qkv_proj, nq + 2 * nkv)
                bq, bk, bv = qkv_b[:nq], qkv_b[nq:nq + nkv], qkv_b[nq + nkv:]
            else:
                q, k, v = w(A.q_proj.weight), w(A.k_proj.weight), w(A.v_proj.weight)
                bq, bk, bv = bias(A.q_proj, nq), bias(A.k_proj, nkv), bias(A.v_proj, nkv)
            if hasattr(M, "gate_up_proj"):    # Phi3: gate and up stacked, gate first
                gate_up = w(M.gate_up_proj.weight)
                gate, up = gate_up[:gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
            else:
                gate, up = w(M.gate_proj.weight), w(M.up_proj.weight)
            assert A.o_proj.bias is None, "the reference has a bias-free output projection only"
            d = dict(attn_norm=norm_weight(L.input_layernorm), q=q, k=k, v=v, bq=bq, bk=bk, bv=bv,
                     o=w(A.o_proj.weight), gate=gate, up=up, down=w(M.down_proj.weight),
                     # Qwen3: each head's q and k are RMS-normalized (over D) before RoPE.
                     q_norm=w(A.q_norm.weight) if hasattr(A, "q_norm") else None,
                     k_norm=w(A.k_norm.weight) if hasattr(A, "k_norm") else None)
            if gemma:
                # Gemma2: the attention output and the MLP are normed before their residual add,
                # and the MLP's input norm is pre_feedforward_layernorm.
                d.update(post_attn_norm=norm_weight(L.post_attention_layernorm),
                         mlp_norm=norm_weight(L.pre_feedforward_layernorm),
                         post_mlp_norm=norm_weight(L.post_feedforward_layernorm))
            else:
                d.update(mlp_norm=norm_weight(L.post_attention_layernorm))
            return d

        m = hf.model
        self.embed = w(m.embed_tokens.weight)
        self.final_norm = norm_weight(m.norm)
        self.lm_head = w(hf.lm_head.weight)
        self.layers = [layer(L) for L in m.layers]
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
        x = self.embed[token].clone() * self.embed_scale
        self.last_rows = []
        for l in range(self.n_layers):
            x = self.layer_step(l, x, t, evict)
        self.t += 1
        logits = self.lm_head @ rms_norm(x, self.final_norm, self.eps)
        if self.final_softcap is not None:
            logits = self.final_softcap * torch.tanh(logits / self.final_softcap)
        return logits

    def layer_step(self, l, x, t, evict):
        W, D = self.layers[l], self.head_dim
        h_in = rms_norm(x, W["attn_norm"], self.eps)
        # 1. q_t, k_t, v_t (RoPE comes after 2, at the scheme's positions; `original`: t).
        q_all = W["q"] @ h_in + W["bq"]
        k_all = W["k"] @ h_in + W["bk"]
        v_all = W["v"] @ h_in + W["bv"]
        q = [q_all[h * D:(h + 1) * D] for h in range(self.n_heads)]
        k = [k_all[g * D:(g + 1) * D] for g in range(self.n_kv)]
        if W["q_norm"] is not None:       # Qwen3: RMSNorm over each head, before RoPE
            q = [rms_norm(x_h, W["q_norm"], self.eps) for x_h in q]
            k = [rms_norm(x_g, W["k_norm"], self.eps) for x_g in k]
        v = [v_all[g * D:(g + 1) * D] for g in range(self.n_kv)]
        # 2. candidates C = H^l_{t-1} ∪ {t}, per KV head; keys kept before RoPE.
        C = [self.H[l][g] + [State(t, k[g], v[g])] for g in range(self.n_kv)]
        # RoPE at the scheme's positions, recomputed from the positions each KV head keeps:
        # its candidates' keys, and the query heads that read it at its query position.
        keys = {}                          # (KV head, position) -> rotated key
        query_at = []
        for g in range(self.n_kv):
            at, query = rotary_positions(C[g], self.scheme)
            query_at.append(query)
            for s in C[g]:
                if s.rotated[0] != at[s.pos]:
                    s.rotated = (at[s.pos], rope(s.key, at[s.pos], self.theta))
                keys[g, s.pos] = s.rotated[1]
        q = [rope(x_h, query_at[self.kv_head(h)], self.theta) for h, x_h in enumerate(q)]
        # a_h = softmax(q_h · K_C * scale) over C; 3. o_h = Σ_j a_h(j) V_j.
        # A layer with a sliding window attends only to candidates with t - p < window; the
        # others get attention 0 (they stay candidates for the policy).
        # a[h] maps each candidate position to query head h's attention weight on it.
        window = self.windows[l]
        a, outputs = [], []
        for h in range(self.n_heads):
            cands = C[self.kv_head(h)]
            seen = [s for s in cands if window is None or t - s.pos < window]
            scores = [float(q[h] @ keys[self.kv_head(h), s.pos]) * self.scale for s in seen]
            if self.softcap is not None:
                scores = [self.softcap * math.tanh(x / self.softcap) for x in scores]
            probs = softmax(scores)
            a.append({s.pos: 0.0 for s in cands})
            a[h].update({s.pos: p for s, p in zip(seen, probs)})
            y_h = torch.zeros(D, dtype=torch.float64)
            for s, p in zip(seen, probs):
                y_h = y_h + p * s.value
            outputs.append(y_h)
        self.last_rows.append(a)
        attn = W["o"] @ torch.cat(outputs)
        if "post_attn_norm" in W:         # Gemma2
            attn = rms_norm(attn, W["post_attn_norm"], self.eps)
        x = x + attn
        # 4. if |C| > k the policy evicts one candidate: H^l_t = C \ {e}.
        self.H[l] = self.evict(C, a, t) if evict else C
        h_mlp = rms_norm(x, W["mlp_norm"], self.eps)
        mlp = W["down"] @ (self.act(W["gate"] @ h_mlp) * (W["up"] @ h_mlp))
        if "post_mlp_norm" in W:          # Gemma2
            mlp = rms_norm(mlp, W["post_mlp_norm"], self.eps)
        return x + mlp

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
            # "acc_j = Σ_τ mean_{h∈group} a_{τ,h}(j), summed over every step τ since j
            # entered, this one included" (H2O-layer: mean over all heads). Accumulate at every step.
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
            # one of them): lowest accumulated score acc_j".
            by_age = sorted(cands, key=lambda s: s.pos, reverse=True)   # newest first
            eligible, score = by_age[k // 2:], (lambda s: s.acc)
        elif rule.kind == "tova":
            # TOVA(k): "argmin_j mean over all query heads of a_h(j)"; TOVA-head: per KV head,
            # the mean over that head's query group. TOVA+i protects positions < i.
            heads = self.scoring_heads(g)
            eligible = [s for s in cands if s.pos >= rule.sinks]
            score = (lambda s: self.mean_attention(a, s.pos, heads))
        elif rule.kind == "keynorm":
            # KeyNorm(k): per KV head, the candidate whose key has the largest L2 norm (lowest
            # score = minus the norm); positions < sinks protected.
            eligible = [s for s in cands if s.pos >= rule.sinks]
            score = (lambda s: -math.sqrt(sum(float(x) ** 2 for x in s.key)))
        elif rule.kind == "random":
            # Random(k): any candidate (the new token included) with equal probability.
            eligible = [s for s in cands if s.pos >= rule.sinks]
            return self.rng.choice(sorted(s.pos for s in eligible))
        else:
            raise ValueError(f"unknown rule {rule.kind!r}")
        return min(eligible, key=lambda s: (score(s), s.pos)).pos

    # ------------------------------------------------------------------------------ prompts

    def oneshot(self, tokens):
        """docs/design.md's `oneshot` prompt mode: "full causal attention over the whole prompt, then
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
            norms = [{s.pos: math.sqrt(sum(float(x) ** 2 for x in s.key)) for s in states}
                     for states in self.H[l]]
            keep = oneshot_keep(attention, self.rule, self.n_kv, norms)
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


def oneshot_keep(attention, rule: Rule, n_kv: int, key_norms=None):
    """Which prompt positions a layer keeps under `oneshot`, per KV head: a list of n_kv sorted
    lists. attention: [H][T][T] nested lists or a tensor, attention[h][i][j] = query i's causal
    attention weight on key j (e.g. Hugging Face's output_attentions for one layer and row).

    Ranked best first by the policy's score, ties keeping the newer position:
      Full: everything. Window: the last k. Sinks: the first i + the last k - i.
      TOVA: positions < sinks, then the best by the last row averaged over all heads
            (TOVA-head: over the KV head's query group).
      H2O:  the k//2 most recent, then the best of the rest by column sums over all prompt
            queries, averaged over the KV head's query group (H2O-layer: over all heads).
      KeyNorm: positions < sinks, then the smallest key norms (key_norms[g][j], per KV head)."""
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
        elif rule.kind == "keynorm":
            protected = list(range(rule.sinks))
            rest = sorted(range(rule.sinks, T), key=lambda j: (key_norms[g][j], -j))
            keep = protected + rest[:k - len(protected)]
        else:
            raise ValueError(f"oneshot has no rule for {rule.kind!r}")
        result.append(sorted(keep))
    return result
